"""The kopf handlers: thin glue between kopf's watch events and this package's plain functions.

`build_registry(settings)` returns a fresh kopf registry with every handler bound to those
settings (the CLI runs it; each test builds its own). The flow:

- Indexes keep what the whole-table views need: every VncTarget (parsed spec, generation and
  status), every Service's ports, which targets use which Service, and (with --relay-service)
  the relay replicas. kopf fills them completely before it calls any other handler, which is
  what makes a full resync safe.
- `target_event` (every watch event of a VncTarget) only tells the scheduler: look at this
  target now (new, or its spec changed: `metadata.generation` differs from
  `status.observedGeneration`), or some time within the probe interval (seen at start). A
  deletion removes the route from every relay before the handler returns.
- One `Scheduler` runs every target's evaluation: resolve, register the route if the relays do
  not hold it, probe (unless live sessions prove the server), write status. There is no kopf
  timer, no task per target, and no finalizer (kopf needs one only for timers and mandatory
  deletion handlers): deleting a VncTarget or its namespace never waits for the operator.
- Status is written by the operator's own API client as a merge patch of the fields that
  changed; a phase change is recorded in `status.phaseTransition` and then posted as an Event
  named after it, so that posting it again (after a crash between the two) is a no-op.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import kopf

from vncgate.common.kube import KubeClient, KubeConnection, KubeError
from vncgate.common.model import Route
from vncgate.common.spec import API_GROUP, API_VERSION, PLURAL, ServiceRef, VncTargetSpec
from vncgate.operator import credentials
from vncgate.operator.discovery import relay_urls_from_slice, union_urls
from vncgate.operator.kubeapi import OLD_FINALIZER, TargetApi, operator_connection
from vncgate.operator.probe import ProbeResult, probe_rfb
from vncgate.operator.relays import RelayFleet
from vncgate.operator.resolve import (
    ServiceInfo,
    TargetInvalid,
    evaluate,
    first,
    parse_target_spec,
    service_info,
)
from vncgate.operator.scheduler import Scheduler
from vncgate.operator.settings import OperatorSettings
from vncgate.operator.status import (
    Observation,
    Transition,
    build_status,
    now_precise,
    now_rfc3339,
    record_transition,
    status_changes,
    transition_of,
)

Prober = Callable[[str, int, float], Awaitable[ProbeResult]]
Connect = Callable[[], KubeConnection]
# After a restart, the Event of a phase change recorded this recently is posted again (a no-op
# if it was posted: Events are named after their transition). Covers a crash between writing
# status and posting its Event.
EVENT_REPLAY_WINDOW = 600.0
# How often the relays' summaries are read (sessions, restarts).
RELAY_POLL_INTERVAL = 2.0

logger = logging.getLogger("vncgate.operator")


@dataclass(frozen=True, slots=True)
class IndexedTarget:
    """A VncTarget as the operator needs it (a kopf index value): nothing else is kept."""

    spec: VncTargetSpec | TargetInvalid
    generation: int | None
    uid: str
    resource_version: str
    status: Mapping[str, Any]


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _rv(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def _age(stamp: str) -> float:
    try:
        at = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return float("inf")
    return (datetime.datetime.now(datetime.UTC) - at).total_seconds()


def needs_reconcile(body: Mapping[str, Any]) -> bool:
    """New, or its spec changed since status was written."""
    status = body.get("status") or {}
    generation = (body.get("metadata") or {}).get("generation")
    return not status.get("phase") or status.get("observedGeneration") != generation


class Runtime:
    """Long-lived state of one operator run, kept in kopf's memo."""

    def __init__(self, config: OperatorSettings, session: aiohttp.ClientSession,
                 prober: Prober, api: TargetApi) -> None:
        self.config = config
        self.session = session
        self.api = api
        self.fleet = RelayFleet(session, config.api_token, config.relay_urls,
                                timeout=config.relay_timeout, route_of=self.route_of,
                                desired=self.desired_routes)
        self.scheduler = Scheduler(self.evaluate_target, config.probe_interval,
                                   config.probe_concurrency, exists=self.exists)
        self.fleet.on_upheaval = self.scheduler.refresh_all
        self.fleet.on_login = lambda key: self.scheduler.schedule(key, 0.0, probe=False)
        self._prober = prober
        self._probe_slots = asyncio.Semaphore(config.probe_concurrency)
        # Status this operator wrote that the watch has not brought back yet: (rv, status).
        self._written: dict[str, tuple[int, dict[str, Any]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._replays: asyncio.Queue[tuple[str, str, Transition]] = asyncio.Queue()
        # kopf's live indexes, given to the startup handler (filled later by kopf).
        self.targets: Mapping[Any, Any] = {}
        self.services: Mapping[Any, Any] = {}
        self.relay_slices: Mapping[Any, Any] = {}

    # -- views over kopf's indexes --------------------------------------------------------

    def lookup_service(self, namespace: str, name: str) -> ServiceInfo | None:
        info = first(self.services.get((namespace, name)))
        return info if isinstance(info, ServiceInfo) else None

    def entry(self, key: str) -> IndexedTarget | None:
        namespace, _, name = key.partition("/")
        found = first(self.targets.get((namespace, name)))
        return found if isinstance(found, IndexedTarget) else None

    def exists(self, key: str) -> bool:
        return self.entry(key) is not None

    def evaluate(self, namespace: str, name: str, spec: Any) -> tuple[str, Route | TargetInvalid]:
        return evaluate(namespace, name, spec, self.lookup_service, self.config.policy,
                        self.config.cluster_domain)

    def route_of(self, key: str) -> Route | None:
        """The route `key` should have now; None if deleted, leaving or invalid."""
        entry = self.entry(key)
        if entry is None:
            return None
        namespace, _, name = key.partition("/")
        outcome = self.evaluate(namespace, name, entry.spec)[1]
        return outcome if isinstance(outcome, Route) else None

    def desired_routes(self) -> list[Route]:
        """The table every replica should hold: each valid, resolvable VncTarget's route."""
        routes: list[Route] = []
        for (namespace, name), store in list(self.targets.items()):
            entry = first(store)
            if not isinstance(entry, IndexedTarget):
                continue
            outcome = self.evaluate(namespace, name, entry.spec)[1]
            if isinstance(outcome, Route):
                routes.append(outcome)
        return routes

    def views_ready(self) -> None:
        """Called by every resource handler: kopf calls them only once its indexes are full."""
        if self.config.relay_service is not None:
            self.fleet.set_urls(union_urls(self.relay_slices.get("relays") or ()))
        self.fleet.views_ready.set()

    def current_status(self, key: str, entry: IndexedTarget) -> Mapping[str, Any]:
        """Status as last written: the watch's copy, or ours while the watch lags behind."""
        written = self._written.get(key)
        if written is not None:
            if written[0] > _rv(entry.resource_version):
                return written[1]
            del self._written[key]
        return entry.status

    # -- one target's evaluation (the scheduler calls it) ----------------------------------

    async def probe(self, route: Route) -> ProbeResult:
        async with self._probe_slots:
            return await self._prober(route.host, route.port, self.config.probe_timeout)

    async def evaluate_target(self, key: str, probe: bool) -> None:
        entry = self.entry(key)
        if entry is None:
            return  # deleted: target_event removed its route
        namespace, _, name = key.partition("/")
        current = self.current_status(key, entry)
        endpoint, outcome = self.evaluate(namespace, name, entry.spec)
        if isinstance(outcome, TargetInvalid):
            if self.fleet.synced_once.is_set():
                await self.fleet.converge(key)  # it may have been valid: no route now
            obs = Observation(endpoint, invalid=outcome)
        else:
            route = outcome
            if not self.fleet.holds(route):
                if self.fleet.synced_once.is_set():
                    await self.fleet.converge(key)
                else:
                    self.fleet.kick()  # the first full resync carries it
            registration = self.fleet.registration(route)
            if registration is None and not current.get("phase"):
                # The first full resync is under way and will carry this route: writing
                # Pending now would only add a write and an Event before Ready.
                self.scheduler.schedule(key, 0.5, probe)
                return
            sessions = self.fleet.sessions(key)
            result: ProbeResult | None = None
            if sessions:
                # A session through the relay reached the server: that proves it without a
                # probe, which some servers count as a failed login.
                result = ProbeResult(True, "LiveSession",
                                     f"{sessions} session{'s' if sessions != 1 else ''} open "
                                     "through the relays", current.get("serverVersion"))
            elif probe:
                result = await self.probe(route)
            result = (await self.credentials_check(route)
                      or credentials.login_verdict(route, self.fleet.last_login(key)) or result)
            obs = Observation(endpoint, registration=registration,
                              probe=result, sessions=sessions, viewers=self.fleet.viewers(key),
                              tls_verified=(None if route.tls is None
                                            else not route.tls.insecure_skip_verify))
        await self.write_status(key, entry, current, obs)

    async def credentials_check(self, route: Route) -> ProbeResult | None:
        """Not Reachable (reason CredentialsNotReadable) while the relay may not read the
        route's Secret; None when it may, or when nothing is to be checked."""
        account = self.config.relay_service_account
        if account is None or not credentials.references(route):
            return None
        try:
            problem = await credentials.unreadable(self.api.client, account,
                                                   self.config.relay_credentials_role, route)
        except (KubeError, OSError) as exc:
            logger.warning("%s: cannot check the relay's access to its Secret: %s", route.key, exc)
            return None
        if problem is None:
            return None
        return ProbeResult(False, credentials.NOT_READABLE, problem, None)

    async def write_status(self, key: str, entry: IndexedTarget, current: Mapping[str, Any],
                           obs: Observation) -> None:
        """Patch the status fields that changed; post the Event of a phase change once."""
        namespace, _, name = key.partition("/")
        desired = build_status(current, obs, generation=entry.generation,
                               url=self.config.target_url(namespace, name), now=now_rfc3339())
        transition = record_transition(current, desired, now_precise())
        changes = status_changes(current, desired)
        if not changes:
            return
        try:
            stored = await self.api.patch_status(namespace, name, changes)
        except KubeError as exc:
            if exc.status == 404:
                return  # deleted meanwhile
            logger.warning("%s: writing status failed (%s); trying again in %gs", key, exc,
                           self.config.retry_delay)
            self.scheduler.schedule(key, self.config.retry_delay)
            return
        meta = stored.get("metadata") or {}
        self._written[key] = (_rv(meta.get("resourceVersion")), dict(stored.get("status") or {}))
        if transition is not None:
            logger.info("%s: %s", key, transition.message)
            await self.post_event(namespace, name, entry.uid, transition)

    async def post_event(self, namespace: str, name: str, uid: str,
                         transition: Transition) -> None:
        try:
            await self.api.post_event(namespace=namespace, name=name, uid=uid,
                                      old=transition.old, new=transition.new, at=transition.at,
                                      reason=transition.reason, message=transition.message,
                                      warning=transition.warning)
        except (KubeError, aiohttp.ClientError, TimeoutError) as exc:
            logger.warning("%s/%s: posting the Event %r failed: %s", namespace, name,
                           transition.message, exc)

    # -- watch events ------------------------------------------------------------------------

    async def target_event(self, event_type: str | None, key: str,
                           body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        finalizers = list(meta.get("finalizers") or ())
        if OLD_FINALIZER in finalizers and event_type != "DELETED":
            try:
                namespace, _, name = key.partition("/")
                await self.api.drop_finalizer(namespace, name, finalizers,
                                              meta.get("resourceVersion"))
                logger.info("%s: removed the finalizer %s (no longer needed)", key,
                            OLD_FINALIZER)
            except KubeError as exc:
                if exc.status not in (404, 409):
                    logger.warning("%s: removing the finalizer %s failed: %s", key,
                                   OLD_FINALIZER, exc)
        if event_type == "DELETED" or meta.get("deletionTimestamp"):
            self.scheduler.forget(key)
            self._written.pop(key, None)
            if event_type == "DELETED" or self.fleet.holds_any(key):
                sent = await self.fleet.converge(key, deleted=True)
                if event_type == "DELETED":
                    logger.info("%s: deleted; route removed from %d of %d relay replicas", key,
                                sent.replicas - len(sent.failed), sent.replicas)
            return
        if event_type is None:  # the listing at start
            recorded = transition_of(body.get("status"))
            if recorded is not None and _age(recorded.at) < EVENT_REPLAY_WINDOW:
                # Posted by one background task, so that the listing's handlers (and the
                # bodies they hold) do not wait for thousands of POSTs.
                self._replays.put_nowait((key, str(meta.get("uid") or ""), recorded))
        if needs_reconcile(body):
            self.scheduler.schedule(key, 0.0)
        elif key not in self.scheduler:
            self.scheduler.schedule_first(key)

    async def replay_events(self) -> None:
        """Post again the Events of transitions recorded shortly before this start (a no-op
        for those already posted: an Event is named after its transition)."""
        while True:
            key, uid, transition = await self._replays.get()
            namespace, _, name = key.partition("/")
            await self.post_event(namespace, name, uid, transition)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self.fleet.run(self.config.resync_interval,
                                               min(RELAY_POLL_INTERVAL,
                                                   self.config.resync_interval),
                                               startup_grace=self.config.resync_interval),
                                name="vncgate resync"),
            asyncio.create_task(self.scheduler.run(), name="vncgate scheduler"),
            asyncio.create_task(self.replay_events(), name="vncgate event replay"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.api.client.close()
        await self.session.close()


def _runtime(memo: Any) -> Runtime:
    runtime = memo.get("vncgate")
    if not isinstance(runtime, Runtime):
        raise kopf.TemporaryError("the operator is still starting", delay=1)
    return runtime


def build_registry(config: OperatorSettings, *, prober: Prober = probe_rfb,
                   connect: Connect = operator_connection) -> kopf.OperatorRegistry:
    """A fresh registry with every vncgate handler bound to `config`.

    `connect` gives the credentials of the operator's own API client (status and Events)."""
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
        # kopf writes nothing to the objects: no finalizer (no timers, no mandatory deletion
        # handlers), no progress or diff-base annotations (only watch-event handlers), and no
        # Events (the runtime posts one per phase change itself).
        settings.persistence.finalizer = OLD_FINALIZER
        settings.posting.enabled = False
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
        api = TargetApi(KubeClient(connect(), timeout=config.api_timeout))
        runtime = Runtime(config, aiohttp.ClientSession(), prober, api)
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
    # Every handler below is `async def` though most do not await: kopf runs a sync handler in
    # its thread pool, which costs two thread hops per watch event (the indexes see every event
    # of every object), and would touch asyncio's primitives off the loop's thread.

    @kopf.index(*target_resource, registry=registry, id="vnctargets")
    async def index_target(*, namespace: str | None, name: str, body: kopf.Body,
                           **_: Any) -> dict[tuple[str, str], IndexedTarget] | None:
        namespace = namespace or ""  # namespaced resources always have one
        meta = body.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return None  # leaving: not in the desired table any more
        try:
            spec: VncTargetSpec | TargetInvalid = parse_target_spec(body.get("spec"))
        except TargetInvalid as exc:
            spec = TargetInvalid(exc.reason, exc.message)  # without the traceback's frames
        return {(namespace, name): IndexedTarget(
            spec=spec, generation=meta.get("generation"), uid=str(meta.get("uid") or ""),
            resource_version=str(meta.get("resourceVersion") or ""),
            status=_plain(body.get("status") or {}))}

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
            return  # the initial listing: the targets are scheduled by their own listing
        for target in kwargs["targets_by_service"].get((namespace, name)) or ():
            runtime.scheduler.schedule(f"{namespace}/{target}", 0.0)

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

    @kopf.on.event(*target_resource, registry=registry)
    async def target_event(*, type: str | None, namespace: str | None, name: str,
                           body: kopf.Body, memo: Any, **_: Any) -> None:
        runtime = _runtime(memo)
        runtime.views_ready()
        await runtime.target_event(type, f"{namespace or ''}/{name}", body)

    return registry
