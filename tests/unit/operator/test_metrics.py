"""The operator's metrics: every resource handler of a kopf registry counted and timed by
outcome, and the process metrics, served over HTTP by `serve`."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from typing import Any

import kopf
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vncgate.operator.metrics import OperatorMetrics, instrument, serve
from vncgate.operator.settings import parse_args


def sample(metrics: OperatorMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def make_registry(calls: list[str]) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.create("vncgate.io", "v1alpha1", "vnctargets", registry=registry, id="reconcile")
    async def reconcile(*, spec: dict[str, Any], **_: Any) -> None:
        calls.append("reconcile")
        if spec.get("bad"):
            raise kopf.PermanentError("endpoint: fix it")
        if spec.get("later"):
            raise kopf.TemporaryError("relay down", delay=1)
        if spec.get("boom"):
            raise RuntimeError("boom")

    @kopf.on.event("v1", "services", registry=registry, id="service")
    def service_changed(**_: Any) -> None:
        calls.append("service")

    @kopf.on.startup(registry=registry)
    async def startup(**_: Any) -> None:
        calls.append("startup")

    return registry


def handler_fns(registry: kopf.OperatorRegistry) -> dict[str, Any]:
    return {str(h.id): h.fn for kind in (registry._changing, registry._watching)
            for h in kind._handlers}


async def test_handler_runs_are_counted_by_outcome() -> None:
    calls: list[str] = []
    registry = make_registry(calls)
    metrics = OperatorMetrics.create(process=False)
    assert sorted(instrument(registry, metrics)) == ["reconcile", "service"]
    fns = handler_fns(registry)
    # kopf tells async from sync handlers through __wrapped__: the wrappers keep both kinds.
    assert asyncio.iscoroutinefunction(fns["reconcile"].__wrapped__)
    assert not asyncio.iscoroutinefunction(fns["service"])

    await fns["reconcile"](spec={})
    await fns["reconcile"](spec={})
    for spec, error in (({"bad": 1}, kopf.PermanentError), ({"later": 1}, kopf.TemporaryError),
                        ({"boom": 1}, RuntimeError)):
        with pytest.raises(error):
            await fns["reconcile"](spec=spec)
    fns["service"]()

    assert calls == ["reconcile"] * 5 + ["service"]
    runs = "vncgate_operator_handler_runs_total"
    assert sample(metrics, runs, handler="reconcile", outcome="success") == 2
    assert sample(metrics, runs, handler="reconcile", outcome="permanent") == 1
    assert sample(metrics, runs, handler="reconcile", outcome="retry") == 1
    assert sample(metrics, runs, handler="reconcile", outcome="error") == 1
    assert sample(metrics, runs, handler="service", outcome="success") == 1
    assert sample(metrics, "vncgate_operator_handler_seconds_count", handler="reconcile") == 5


async def test_a_cancelled_run_is_not_counted() -> None:
    registry = kopf.OperatorRegistry()
    started = asyncio.Event()

    @kopf.timer("vncgate.io", "v1alpha1", "vnctargets", registry=registry, id="refresh",
                interval=60)
    async def refresh(**_: Any) -> None:
        started.set()
        await asyncio.sleep(3600)

    metrics = OperatorMetrics.create(process=False)
    assert instrument(registry, metrics) == ["refresh"]
    (handler,) = registry._spawning._handlers
    task = asyncio.ensure_future(handler.fn())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sample(metrics, "vncgate_operator_handler_seconds_count", handler="refresh") == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_served_with_process_metrics() -> None:
    metrics = OperatorMetrics.create()
    metrics.handler_runs.labels("reconcile", "success").inc()
    port = free_port()
    stop = serve(metrics, "127.0.0.1", port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    finally:
        stop()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["vncgate_operator_handler_runs"].samples[0].value == 1
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "python_info",
                 "python_gc_collections"):
        assert name in families, sorted(families)


def test_metrics_listen_flag_and_variable(tmp_path: Any) -> None:
    token = tmp_path / "token"
    token.write_text("0123456789abcdef")
    base = ["--relay-url=http://127.0.0.1:8081", f"--api-token-file={token}"]
    assert parse_args(base, environ={}).metrics_listen is None
    assert parse_args([*base, "--metrics-listen=0.0.0.0:8083"], environ={}).metrics_listen == \
        ("0.0.0.0", 8083)
    assert parse_args(base, environ={"VNCGATE_METRICS_LISTEN": "[::]:9000"}).metrics_listen == \
        ("::", 9000)
    with pytest.raises(SystemExit):
        parse_args([*base, "--metrics-listen=8083"], environ={})
