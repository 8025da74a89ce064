"""Prometheus metrics of the operator: handler runs, errors and latency, and process metrics.

`instrument(registry, metrics)` wraps every resource handler kopf would call (create, update,
resume, delete, event and timer handlers), so the handlers themselves carry no metrics code and
whatever handlers the registry holds are counted. `serve` exposes the metrics over HTTP
(`--metrics-listen`). One CollectorRegistry per OperatorMetrics, so tests can make several.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import kopf
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

# Handler latencies: a status patch takes milliseconds, a probe up to --probe-timeout (3 s), a
# registration waits for every relay replica.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def outcome_of(error: Exception | None) -> str:
    """The `outcome` label: success, retry (TemporaryError: kopf retries it later), permanent
    (PermanentError: a spec to fix; not retried) or error (anything else; kopf retries)."""
    if error is None:
        return "success"
    if isinstance(error, kopf.TemporaryError):
        return "retry"
    if isinstance(error, kopf.PermanentError):
        return "permanent"
    return "error"


@dataclass(frozen=True)
class OperatorMetrics:
    registry: CollectorRegistry
    handler_runs: Counter
    handler_seconds: Histogram

    @classmethod
    def create(cls, *, process: bool = True) -> OperatorMetrics:
        """New metrics; with `process`, also the standard process_*, python_info and
        python_gc_* metrics of this process (prometheus_client's own collectors)."""
        registry = CollectorRegistry(auto_describe=True)
        if process:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        return cls(
            registry=registry,
            handler_runs=Counter(
                "vncgate_operator_handler_runs",
                "Handler runs (reconciles, events, timer ticks), by handler and outcome: "
                "success, retry, permanent or error.",
                ["handler", "outcome"], registry=registry),
            handler_seconds=Histogram(
                "vncgate_operator_handler_seconds",
                "Time one handler run took, by handler, whatever its outcome.",
                ["handler"], buckets=LATENCY_BUCKETS, registry=registry),
        )

    @contextmanager
    def observe(self, handler: str) -> Iterator[None]:
        """Count one run of `handler` and its time; an exception is counted and re-raised.
        Cancellation (the operator stopping) is not a run."""
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            if error is None or isinstance(error, Exception):
                self.handler_seconds.labels(handler).observe(time.perf_counter() - start)
                self.handler_runs.labels(handler, outcome_of(error)).inc()


def _wrap(fn: Callable[..., Any], handler: str, metrics: OperatorMetrics) -> Callable[..., Any]:
    # functools.wraps keeps __wrapped__, which kopf follows to tell async from sync handlers.
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            with metrics.observe(handler):
                return await fn(*args, **kwargs)
        return run_async

    @functools.wraps(fn)
    def run_sync(*args: Any, **kwargs: Any) -> Any:
        with metrics.observe(handler):
            return fn(*args, **kwargs)
    return run_sync


def instrument(registry: kopf.OperatorRegistry, metrics: OperatorMetrics) -> list[str]:
    """Wrap the resource handlers of `registry` (create/update/resume/delete, event and timer
    handlers; not indexes, daemons or activities such as startup) so each run is counted and
    timed; returns the handler ids it wrapped. Call after every handler is registered."""
    wrapped: list[str] = []
    # kopf keeps the handlers of each kind in a list on its registries (kopf has no public way
    # to wrap a registered handler); the handlers are frozen dataclasses, so they are replaced.
    kinds: tuple[Any, ...] = (registry._changing, registry._watching, registry._spawning)
    for kind in kinds:
        handlers: list[Any] = kind._handlers
        for index, handler in enumerate(handlers):
            if type(handler).__name__ == "DaemonHandler":
                continue  # a daemon's run is its lifetime, not a reconcile
            name = str(handler.id)
            handlers[index] = dataclasses.replace(handler, fn=_wrap(handler.fn, name, metrics))
            wrapped.append(name)
    return wrapped


def serve(metrics: OperatorMetrics, host: str, port: int) -> Callable[[], None]:
    """Serve /metrics (any path) on host:port from a thread; returns a function that stops it."""
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    return stop
