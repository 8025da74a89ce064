"""The kopf handlers: thin glue between kopf's events and this package's plain functions.

`build_registry(settings)` returns a fresh kopf registry with every handler bound to those
settings (the CLI runs it; each test builds its own). The flow:

- Indexes keep what the whole-table views need: every VncTarget's spec, every Service's ports,
  which targets use which Service, and (with --relay-service) the relay replicas. kopf fills
  them completely before it calls any other handler, which is what makes a full resync safe.
- `reconcile` (create / update / resume) parses, resolves, checks the policy, registers the route
  with every replica, probes, and writes status. On resume it registers nothing itself: one
  full resync compares revisions and sends only what differs.
- `refresh` (a timer per target) re-evaluates on a jittered interval or at once when the target's
  Service changes: it re-resolves, re-registers a route that changed, probes, writes status.
- `forget` (delete) removes the route; the periodic resync removes it from any replica that missed
  it, so the handler never blocks a deletion.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import kopf

from relay.model import Route
from relay.spec import API_GROUP, API_VERSION, PLURAL, ServiceRef, VncTargetSpec
from vncgate_operator.discovery import relay_urls_from_slice, union_urls
from vncgate_operator.probe import ProbeResult, next_probe_delay, probe_rfb
from vncgate_operator.relays import RelayFleet
from vncgate_operator.resolve import (
    ServiceInfo,
    TargetInvalid,
    evaluate,
    first,
    parse_target_spec,
    resolve_route,
    service_info,
)
from vncgate_operator.settings import OperatorSettings
from vncgate_operator.status import (
    READY,
    Observation,
    build_status,
    now_rfc3339,
    phase_of,
    ready_message,
    status_changes,
)

FINALIZER = f"{API_GROUP}/finalizer"
Prober = Callable[[str, int, float], Awaitable[ProbeResult]]
# kopf's own pause between two runs of a target's timer; the real interval is awaited inside
# the timer, so that a Service change can cut it short.
TIMER_FLOOR = 0.5

logger = logging.getLogger("vncgate.operator")


class InvalidTarget(kopf.PermanentError):
    """The spec cannot work as it stands; kopf must not retry until the object changes."""


@dataclass(frozen=True, slots=True)
class IndexedTarget:
    """A VncTarget as the full-table view needs it (a kopf index value)."""

    spec: VncTargetSpec | None


class Runtime:
    """Long-lived state of one operator run, kept in kopf's memo."""

    def __init__(self, config: OperatorSettings, session: aiohttp.ClientSession,
                 prober: Prober) -> None:
        self.config = config
        self.session = session
        self.fleet = RelayFleet(session, config.api_token, config.relay_urls,
                                timeout=config.relay_timeout)
        self._prober = prober
        self._probe_slots = asyncio.Semaphore(config.probe_concurrency)
        self._wakeups: dict[str, asyncio.Event] = {}
        self._ticked: set[str] = set()
        self._rng = random.Random()  # noqa: S311 - jitter, not a secret
        self._resync: asyncio.Task[None] | None = None
        # kopf's live indexes, given to the startup handler (filled later by kopf).
        self.targets: Mapping[Any, Any] = {}
        self.services: Mapping[Any, Any] = {}
        self.relay_slices: Mapping[Any, Any] = {}

    # -- views over kopf's indexes --------------------------------------------------------

    def lookup_service(self, namespace: str, name: str) -> ServiceInfo | None:
        info = first(self.services.get((namespace, name)))
        return info if isinstance(info, ServiceInfo) else None

    def evaluate(self, namespace: str, name: str,
                 spec: Mapping[str, Any] | None) -> tuple[str, Route | TargetInvalid]:
        return evaluate(namespace, name, spec, self.lookup_service, self.config.policy,
                        self.config.cluster_domain)

    def desired_routes(self) -> list[Route]:
        """The table every replica should hold: each valid, resolvable VncTarget's route."""
        routes: list[Route] = []
        for key, store in list(self.targets.items()):
            entry = first(store)
            if not isinstance(entry, IndexedTarget) or entry.spec is None:
                continue
            namespace, name = key
            service = (self.lookup_service(namespace, entry.spec.endpoint.name)
                       if isinstance(entry.spec.endpoint, ServiceRef) else None)
            try:
                routes.append(resolve_route(namespace, name, entry.spec, service,
                                            self.config.policy, self.config.cluster_domain))
            except TargetInvalid:
                continue
        return routes

    def views_ready(self) -> None:
        """Called by every resource handler: kopf calls them only once its indexes are full."""
        if self.config.relay_service is not None:
            self.fleet.set_urls(union_urls(self.relay_slices.get("relays") or ()))
        self.fleet.views_ready.set()

    # -- probes and the per-target schedule --------------------------------------------------

    async def probe(self, route: Route) -> ProbeResult:
        async with self._probe_slots:
            return await self._prober(route.host, route.port, self.config.probe_timeout)

    def wake(self, key: str) -> None:
        event = self._wakeups.get(key)
        if event is not None:
            event.set()

    async def wait_turn(self, key: str, stopped: Any) -> None:
        """Sleep until this target's next probe, a wake-up (its Service changed) or a stop."""
        event = self._wakeups.setdefault(key, asyncio.Event())
        delay = next_probe_delay(self.config.probe_interval, key not in self._ticked, self._rng)
        self._ticked.add(key)
        waiters = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(stopped.wait())]
        try:
            await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        event.clear()

    def forget(self, key: str) -> None:
        self._wakeups.pop(key, None)
        self._ticked.discard(key)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._resync = asyncio.create_task(
            self.fleet.run_resync(self.desired_routes, self.config.resync_interval,
                                  startup_grace=self.config.resync_interval),
            name="vncgate resync")

    async def close(self) -> None:
        if self._resync is not None:
            self._resync.cancel()
            await asyncio.gather(self._resync, return_exceptions=True)
        await self.session.close()


def _runtime(memo: Any) -> Runtime:
    runtime = memo.get("vncgate")
    if not isinstance(runtime, Runtime):
        raise kopf.TemporaryError("the operator is still starting", delay=1)
    return runtime


def write_status(runtime: Runtime, body: kopf.Body, patch: kopf.Patch, obs: Observation) -> str:
    """Patch the status fields that changed; post an Event when the phase changes."""
    meta = body.get("metadata") or {}
    current = body.get("status") or {}
    desired = build_status(current, obs, generation=meta.get("generation"),
                           url=runtime.config.target_url(meta["namespace"], meta["name"]),
                           now=now_rfc3339())
    for field, value in status_changes(current, desired).items():
        patch.status[field] = value
    old_phase, new_phase = phase_of(current), desired["phase"]
    if old_phase != new_phase:
        reason = next(c["reason"] for c in desired["conditions"] if c["type"] == "Ready")
        message = f"{old_phase or 'new'} -> {new_phase}: {ready_message(desired)}"
        if new_phase in (READY,) or (new_phase == "Pending" and old_phase is None):
            kopf.info(body, reason=reason, message=message)
        else:
            kopf.warn(body, reason=reason, message=message)
    return str(new_phase)


def build_registry(config: OperatorSettings, *,
                   prober: Prober = probe_rfb) -> kopf.OperatorRegistry:
    """A fresh registry with every vncgate handler bound to `config`."""
    registry = kopf.OperatorRegistry()
    target_resource = (API_GROUP, API_VERSION, PLURAL)

    # A bare OperatorRegistry has none of the login handlers that kopf's default registry adds,
    # and without one the operator cannot authenticate at all. This is kopf's own login: the
    # pod's ServiceAccount (token and CA files, KUBERNETES_SERVICE_HOST), else the kubeconfig
    # ($KUBECONFIG or ~/.kube/config). Errors are ignored as kopf ignores them for its own
    # fallbacks, so that another login handler (the emulator tests add one) can still succeed.
    @kopf.on.login(registry=registry, errors=kopf.ErrorsMode.IGNORED)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    async def startup(*, settings: kopf.OperatorSettings, memo: Any, **kwargs: Any) -> None:
        # kopf's progress and diff-base go to annotations so that status stays ours and
        # schema-closed (no status.kopf); the finalizer exists because kopf needs one for timers.
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=API_GROUP, key="last-handled-configuration")
        # Events only from explicit kopf.info/warn (phase transitions), never from log lines.
        settings.posting.enabled = True
        settings.posting.loggers = False
        settings.peering.name = config.peering_name
        settings.peering.priority = config.priority
        settings.peering.standalone = config.standalone or settings.peering.standalone
        # With exact --namespace names there is nothing to scan for: without this, kopf lists
        # namespaces and watches CRDs cluster-wide, which the chart's Roles rightly refuse, and
        # it retries the 403 for about a minute before it serves anything (issue #20).
        settings.scanning.disabled = bool(config.namespaces)
        settings.networking.connect_timeout = 10
        settings.networking.request_timeout = 60
        # A watch that silently stalls (a dead load balancer) is re-opened within minutes.
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        runtime = Runtime(config, aiohttp.ClientSession(), prober)
        runtime.targets = kwargs["vnctargets"]
        runtime.services = kwargs["services"]
        runtime.relay_slices = kwargs.get("relay_slices", {})
        memo["vncgate"] = runtime
        runtime.start()

    @kopf.on.cleanup(registry=registry)
    async def cleanup(*, memo: Any, **_: Any) -> None:
        runtime = memo.get("vncgate")
        if isinstance(runtime, Runtime):
            await runtime.close()

    @kopf.on.probe(registry=registry, id="relays")
    def relays_probe(*, memo: Any, **_: Any) -> dict[str, int]:
        runtime = memo.get("vncgate")
        if not isinstance(runtime, Runtime):
            return {}
        return {"replicas": len(runtime.fleet.urls), "failing": len(runtime.fleet.failures)}

    # -- indexes -----------------------------------------------------------------------------
    # Every handler below is `async def` though none awaits: kopf runs a sync handler in its thread
    # pool, which costs two thread hops per watch event (the indexes see every event of every
    # object), and would call `Runtime.wake`/`views_ready` (asyncio.Event.set) off the loop's
    # thread, where asyncio's primitives are not safe to touch.

    @kopf.index(*target_resource, registry=registry, id="vnctargets")
    async def index_target(*, namespace: str | None, name: str, body: kopf.Body,
                           **_: Any) -> dict[tuple[str, str], IndexedTarget] | None:
        namespace = namespace or ""  # namespaced resources always have one
        if body.get("metadata", {}).get("deletionTimestamp"):
            return None  # leaving: not in the desired table any more
        try:
            spec: VncTargetSpec | None = parse_target_spec(body.get("spec"))
        except TargetInvalid:
            spec = None
        return {(namespace, name): IndexedTarget(spec)}

    @kopf.index(*target_resource, registry=registry, id="targets_by_service")
    async def index_target_service(*, namespace: str | None, name: str, body: kopf.Body,
                                   **_: Any) -> dict[tuple[str, str], str] | None:
        namespace = namespace or ""  # namespaced resources always have one
        try:
            spec = parse_target_spec(body.get("spec"))
        except TargetInvalid:
            return None
        if isinstance(spec.endpoint, ServiceRef):
            return {(namespace, spec.endpoint.name): name}
        return None

    @kopf.index("v1", "services", registry=registry, id="services")
    async def index_service(*, namespace: str | None, name: str, body: kopf.Body,
                            **_: Any) -> dict[tuple[str, str], ServiceInfo]:
        namespace = namespace or ""  # namespaced resources always have one
        return {(namespace, name): service_info(body)}

    @kopf.on.event("v1", "services", registry=registry)
    async def service_changed(*, type: str, namespace: str | None, name: str, memo: Any,
                              **kwargs: Any) -> None:
        namespace = namespace or ""  # namespaced resources always have one
        runtime = _runtime(memo)
        runtime.views_ready()
        if type is None:
            return  # the initial listing: the targets' own handlers see these Services
        for target in kwargs["targets_by_service"].get((namespace, name)) or ():
            runtime.wake(f"{namespace}/{target}")

    if config.relay_service is not None:
        relay_namespace, relay_service = config.relay_service
        slice_filters: dict[str, Any] = {
            "labels": {"kubernetes.io/service-name": relay_service},
            "when": lambda namespace, **_: namespace == relay_namespace,
        }

        @kopf.index("discovery.k8s.io", "v1", "endpointslices", registry=registry,
                    id="relay_slices", **slice_filters)
        async def index_relay_slice(*, body: kopf.Body, **_: Any) -> dict[str, tuple[str, ...]]:
            return {"relays": relay_urls_from_slice(body, config.relay_port)}

        @kopf.on.event("discovery.k8s.io", "v1", "endpointslices", registry=registry,
                       **slice_filters)
        async def relay_slice_changed(*, memo: Any, **_: Any) -> None:
            runtime = _runtime(memo)
            before = runtime.fleet.urls
            runtime.views_ready()  # refreshes the replica set; a new replica kicks a resync
            if runtime.fleet.urls != before:
                logger.info("relay replicas: %s", ", ".join(sorted(runtime.fleet.urls)) or "none")

    # -- VncTargets --------------------------------------------------------------------------

    @kopf.on.resume(*target_resource, registry=registry)
    @kopf.on.create(*target_resource, registry=registry)
    @kopf.on.update(*target_resource, registry=registry)
    async def reconcile(*, reason: str, namespace: str | None, name: str, body: kopf.Body,
                        patch: kopf.Patch, memo: Any, **_: Any) -> None:
        namespace = namespace or ""  # namespaced resources always have one
        runtime = _runtime(memo)
        runtime.views_ready()
        endpoint, outcome = runtime.evaluate(namespace, name, body.get("spec"))
        if isinstance(outcome, TargetInvalid):
            if reason == kopf.Reason.UPDATE:
                await runtime.fleet.delete_route(namespace, name)  # it may have been valid
            write_status(runtime, body, patch, Observation(endpoint, invalid=outcome))
            raise InvalidTarget(f"{outcome.reason}: {outcome.message}")
        route = outcome
        if reason == kopf.Reason.RESUME:
            # After an operator restart: one revision compare per replica instead of one PUT
            # per target; status keeps its conditions until the timer looks again.
            runtime.fleet.kick()
            write_status(runtime, body, patch, Observation(endpoint))
            return
        sent = await runtime.fleet.put_route(route)
        probe = await runtime.probe(route)
        write_status(runtime, body, patch, Observation(
            endpoint, registration=runtime.fleet.registration(route), probe=probe,
            sessions=runtime.fleet.sessions(route.key),
            viewers=runtime.fleet.viewers(route.key)))
        if sent.all_failed:
            raise kopf.TemporaryError(
                f"no relay replica accepted {route.key}: {next(iter(sent.failed.values()))}",
                delay=config.retry_delay)

    @kopf.timer(*target_resource, registry=registry, id="refresh", interval=TIMER_FLOOR)
    async def refresh(*, namespace: str | None, name: str, body: kopf.Body, patch: kopf.Patch,
                      memo: Any, **kwargs: Any) -> None:
        namespace = namespace or ""  # namespaced resources always have one
        runtime = _runtime(memo)
        key = f"{namespace}/{name}"
        stopped = kwargs["stopped"]
        await runtime.wait_turn(key, stopped)
        if stopped or body.get("metadata", {}).get("deletionTimestamp"):
            runtime.forget(key)
            return
        runtime.views_ready()
        endpoint, outcome = runtime.evaluate(namespace, name, body.get("spec"))  # body is live
        if isinstance(outcome, TargetInvalid):
            if key in runtime.fleet.confirmed:  # its Service went away or changed
                await runtime.fleet.delete_route(namespace, name)
            write_status(runtime, body, patch, Observation(endpoint, invalid=outcome))
            return
        route = outcome
        if runtime.fleet.confirmed.get(key) != route:
            if runtime.fleet.synced_once.is_set():
                await runtime.fleet.put_route(route)
            else:
                runtime.fleet.kick()  # the first full resync will carry it
        probe = await runtime.probe(route)
        write_status(runtime, body, patch, Observation(
            endpoint, registration=runtime.fleet.registration(route), probe=probe,
            sessions=runtime.fleet.sessions(key), viewers=runtime.fleet.viewers(key)))

    @kopf.on.delete(*target_resource, registry=registry, optional=True)
    async def forget(*, namespace: str | None, name: str, memo: Any, **_: Any) -> None:
        namespace = namespace or ""  # namespaced resources always have one
        # optional=True: this handler never holds the object. A replica that misses the DELETE
        # (down, or the operator was down) drops the route at the next resync, because the
        # desired table no longer contains it.
        runtime = _runtime(memo)
        runtime.forget(f"{namespace}/{name}")
        await runtime.fleet.delete_route(namespace, name)

    return registry
