"""The long-lived state of one operator run, and what it does with one VncTarget.

`Runtime` owns the relay fleet (relays.py), the scheduler (scheduler.py) and the operator's own
API client (kubeapi.py), and reads kopf's indexes through typed views. The kopf handlers
(handlers.py) only hand it watch events; the decisions are made here and in those services:

- resolution (spec -> route or why not): resolve.py; the desired table is every target's
  `route_of`, the same function that each single change uses;
- which relays get what, and when (at once, or by the first full resync): RelayFleet.offer,
  RelayFleet.remove;
- when to look at a target again: Scheduler.notice;
- what status says and which Event a phase change posts: status.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import kopf

from vncgate.common.model import Route
from vncgate.common.spec import SpecError, VncTargetSpec, parse_labels
from vncgate.operator import kubevirt, memory, secretaccess
from vncgate.operator.kubeapi import KubeError, KubeVirtApi, TargetApi
from vncgate.operator.kubevirt import KubeVirtWatch
from vncgate.operator.probe import SECURITY_TYPES_READ, ProbeResult, proven_by_sessions
from vncgate.operator.relayendpoints import union_urls
from vncgate.operator.relays import RelayFleet
from vncgate.operator.resolve import (
    ServiceInfo,
    TargetInvalid,
    evaluate,
    first,
    parse_target_spec,
)
from vncgate.operator.scheduler import Scheduler
from vncgate.operator.settings import OperatorSettings
from vncgate.operator.status import (
    CONSOLE_AVAILABLE,
    REACHABLE,
    Observation,
    Transition,
    build_status,
    kept_condition,
    now_precise,
    now_rfc3339,
    record_transition,
    replay_due,
    status_changes,
)

Prober = Callable[[str, int, float], Awaitable[ProbeResult]]
# After a restart, the Event of a phase change recorded this recently is posted again (a no-op
# if it was posted: Events are named after their transition). Covers a crash between writing
# status and posting its Event.
EVENT_REPLAY_WINDOW = 600.0
# How often the relays' summaries are read (sessions, restarts).
RELAY_POLL_INTERVAL = 2.0
# The key under which the runtime lives in kopf's memo.
MEMO_KEY = "vncgate"

ObjectKey = tuple[str, str]  # (namespace, name)

logger = logging.getLogger("vncgate.operator")


@dataclass(frozen=True, slots=True)
class IndexedTarget:
    """A VncTarget as the operator needs it (a kopf index value): nothing else is kept."""

    spec: VncTargetSpec | TargetInvalid
    generation: int | None
    uid: str
    resource_version: str
    status: Mapping[str, Any]
    # metadata.labels, sent with the route (the relays' console list filters by them).
    labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> IndexedTarget:
        meta = body.get("metadata") or {}
        try:
            spec: VncTargetSpec | TargetInvalid = parse_target_spec(body.get("spec"))
        except TargetInvalid as exc:
            spec = TargetInvalid(exc.reason, exc.message)  # without the traceback's frames
        try:
            labels = parse_labels(meta.get("labels"))
        except SpecError:  # the API server checks labels; a list is not worth a refusal
            labels = ()
        return cls(spec=spec, generation=meta.get("generation"), uid=str(meta.get("uid") or ""),
                   resource_version=str(meta.get("resourceVersion") or ""),
                   status=_plain(body.get("status") or {}), labels=labels)


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


def needs_reconcile(body: Mapping[str, Any]) -> bool:
    """New, or its spec changed since status was written."""
    status = body.get("status") or {}
    generation = (body.get("metadata") or {}).get("generation")
    return not status.get("phase") or status.get("observedGeneration") != generation


def _split(key: str) -> ObjectKey:
    namespace, _, name = key.partition("/")
    return namespace, name


def asks_for_password(current: Mapping[str, Any], endpoint: str) -> bool:
    """Whether status says that the server at `endpoint` asks for a password (the probe read
    its security types): such a server is not probed again (probe.SECURITY_TYPES_READ). Read
    from status, so that an operator's restart does not probe it again either."""
    if current.get("endpoint") != endpoint:
        return False
    for condition in current.get("conditions") or ():
        if isinstance(condition, Mapping) and condition.get("type") == REACHABLE:
            return bool(condition.get("status") == "True"
                        and condition.get("reason") == SECURITY_TYPES_READ)
    return False


class Runtime:
    """Long-lived state of one operator run, kept in kopf's memo."""

    def __init__(self, config: OperatorSettings, session: aiohttp.ClientSession,
                 prober: Prober, api: TargetApi, *,
                 targets: kopf.Index[ObjectKey, IndexedTarget],
                 services: kopf.Index[ObjectKey, ServiceInfo],
                 by_service: kopf.Index[ObjectKey, str],
                 relay_slices: kopf.Index[str, tuple[str, ...]] | None = None,
                 by_kubevirt: kopf.Index[ObjectKey, str] | None = None) -> None:
        self.config = config
        self.session = session
        self.api = api
        # kopf's live indexes (kopf fills them; complete before any other handler runs).
        self.targets = targets
        self.services = services
        self.by_service = by_service  # (namespace, Service) -> names of targets naming it
        self.relay_slices = relay_slices
        self.by_kubevirt = by_kubevirt  # (namespace, VM) -> names of targets naming it
        self.kubevirt_api = KubeVirtApi(api.client)
        # Started with the first KubeVirt target: clusters without any never watch KubeVirt.
        self.kubevirt_watch = KubeVirtWatch(
            self.kubevirt_api, config.namespaces, self.vm_changed, self.kubevirt_appeared,
            self.discover if config.kubevirt_discovery else None)
        self.fleet = RelayFleet(session, config.api_token, config.relay_urls,
                                timeout=config.relay_timeout, route_of=self.route_of,
                                desired=self.desired_routes)
        self.scheduler = Scheduler(self.evaluate_target, config.probe_interval,
                                   config.probe_concurrency, exists=self.exists)
        self.fleet.on_upheaval = self.scheduler.refresh_all
        self.fleet.on_login = lambda key: self.scheduler.schedule(key, 0.0, probe=False)
        self.fleet.on_sessions = lambda key: self.scheduler.schedule(key, 0.0, probe=False)
        self._prober = prober
        self._probe_slots = asyncio.Semaphore(config.probe_concurrency)
        # Since when (Unix time) the access reviews have said the relay may read a target's
        # Secrets, per target whose reviews say so (secretaccess.login_verdict).
        self._readable_since: dict[str, float] = {}
        # Status this operator wrote that the watch has not brought back yet: (rv, status).
        self._written: dict[str, tuple[int, dict[str, Any]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._replays: asyncio.Queue[tuple[str, str, Transition]] = asyncio.Queue()

    @staticmethod
    def of(memo: kopf.Memo) -> Runtime:
        """The runtime in kopf's memo; a handler that runs before startup finished retries."""
        runtime = memo.get(MEMO_KEY)
        if not isinstance(runtime, Runtime):
            raise kopf.TemporaryError("the operator is still starting", delay=1)
        return runtime

    # -- views over kopf's indexes --------------------------------------------------------

    def lookup_service(self, namespace: str, name: str) -> ServiceInfo | None:
        info = first(self.services.get((namespace, name)))
        return info if isinstance(info, ServiceInfo) else None

    def entry(self, key: str) -> IndexedTarget | None:
        found = first(self.targets.get(_split(key)))
        return found if isinstance(found, IndexedTarget) else None

    def exists(self, key: str) -> bool:
        return self.entry(key) is not None

    def evaluate(self, namespace: str, name: str, spec: Any,
                 labels: tuple[tuple[str, str], ...] = ()) -> tuple[str, Route | TargetInvalid]:
        endpoint, outcome = evaluate(namespace, name, spec, self.lookup_service,
                                     self.config.policy, self.config.cluster_domain,
                                     self.config.reach)
        if labels and isinstance(outcome, Route):
            outcome = replace(outcome, labels=labels)
        return endpoint, outcome

    def route_of(self, key: str) -> Route | None:
        """The route `key` should have now; None if deleted, leaving or invalid."""
        entry = self.entry(key)
        if entry is None:
            return None
        outcome = self.evaluate(*_split(key), entry.spec, entry.labels)[1]
        return outcome if isinstance(outcome, Route) else None

    def desired_routes(self) -> list[Route]:
        """The table every replica should hold: `route_of` of every VncTarget."""
        routes = (self.route_of(f"{namespace}/{name}") for namespace, name in list(self.targets))
        return [route for route in routes if route is not None]

    def targets_of_service(self, namespace: str, service: str) -> list[str]:
        """The targets whose endpoint names this Service."""
        return [f"{namespace}/{name}" for name in self.by_service.get((namespace, service), ())]

    def views_ready(self) -> None:
        """Called by every resource handler: kopf calls them only once its indexes are full."""
        discovered = None
        if self.config.relay_service is not None:
            slices = self.relay_slices.get("relays") if self.relay_slices is not None else None
            discovered = union_urls(slices or ())
        self.fleet.views_complete(discovered)

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
        current = self.current_status(key, entry)
        endpoint, outcome = self.evaluate(*_split(key), entry.spec, entry.labels)
        route = outcome if isinstance(outcome, Route) else None
        await self.fleet.offer(key, route)
        if route is None:
            assert isinstance(outcome, TargetInvalid)
            await self.write_status(key, entry, current, Observation(endpoint, invalid=outcome))
            return
        registration = self.fleet.registration(route)
        if registration is None and not current.get("phase"):
            # The first full resync is under way and will carry this route: writing
            # Pending now would only add a write and an Event before Ready.
            self.scheduler.schedule(key, 0.5, probe)
            return
        sessions = self.fleet.sessions(key)
        result: ProbeResult | None = None
        if route.kubevirt is not None:
            # Not probed (that would take the VM's one VNC connection): KubeVirt says.
            self.kubevirt_watch.start()
            result = await self.kubevirt_check(route)
        elif sessions:
            result = proven_by_sessions(sessions, current.get("serverVersion"))
        elif probe and not asks_for_password(current, endpoint):
            result = await self.probe(route)
        result = (await self.credentials_check(key, route)
                  or secretaccess.login_verdict(route, self.fleet.last_login(key),
                                                self._readable_since.get(key))
                  or result)
        # Read again after the probe and the reviews: the relays may have taken the route
        # meanwhile (None: the first full resync is on its way; keep what was seen before).
        registration = self.fleet.registration(route) or registration
        console = None
        if route.kubevirt is not None:
            console = (kubevirt.console_verdict(self.fleet.last_login(key))
                       or kept_condition(current, CONSOLE_AVAILABLE))
        await self.write_status(key, entry, current, Observation(
            endpoint, registration=registration, probe=result, sessions=sessions,
            viewers=self.fleet.viewers(key),
            tls_verified=None if route.tls is None else not route.tls.insecure_skip_verify,
            console=console))

    async def kubevirt_check(self, route: Route) -> ProbeResult | None:
        """Reachable from the VM's state; None (keep what status says) if the API failed."""
        assert route.kubevirt is not None
        try:
            return await kubevirt.check(self.kubevirt_api, route.namespace, route.kubevirt)
        except (KubeError, aiohttp.ClientError, TimeoutError) as exc:
            logger.warning("%s: cannot read its VirtualMachine: %s", route.key, exc)
            return None

    def vm_changed(self, namespace: str, vm: str) -> None:
        """A VirtualMachine or its instance changed: look at the targets that name it."""
        if self.by_kubevirt is None:
            return
        for name in self.by_kubevirt.get((namespace, vm), ()):
            self.scheduler.schedule(f"{namespace}/{name}", 0.0)

    async def discover(self, event_type: str, vm: Mapping[str, Any]) -> None:
        """--kubevirt-discovery: a labelled VM gets its VncTarget; unlabelled, the one made for
        it goes. A deleted VM's target is the garbage collector's (its owner reference)."""
        meta = vm.get("metadata") or {}
        namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
        exists = self.entry(f"{namespace}/{name}") is not None
        try:
            if event_type == "DELETED":
                return
            wanted = kubevirt.discovered_target(vm)
            if wanted is not None and not exists:
                try:
                    await self.api.create(wanted)
                    logger.info("%s/%s: created a VncTarget for the labelled VirtualMachine",
                                namespace, name)
                except KubeError as exc:
                    if exc.status != 409:  # 409: one of that name exists (ours or not)
                        raise
            elif wanted is None and exists and not kubevirt.wants_console(vm):
                target = await self.api.get(namespace, name)
                uid = str(meta.get("uid") or "")
                if target is not None and uid and kubevirt.owned_by(target, uid):
                    await self.api.delete(namespace, name,
                                          str((target.get("metadata") or {}).get("uid")))
                    logger.info("%s/%s: deleted the VncTarget of a VirtualMachine that is no "
                                "longer labelled %s", namespace, name, kubevirt.DISCOVERY_LABEL)
        except (KubeError, aiohttp.ClientError, TimeoutError) as exc:
            logger.warning("%s/%s: discovery of the VirtualMachine failed: %s", namespace,
                           name, exc)

    def kubevirt_appeared(self) -> None:
        """The kubevirt.io API came (or went): look at every KubeVirt target again."""
        if self.by_kubevirt is None:
            return
        for (namespace, _vm), names in list(self.by_kubevirt.items()):
            for name in names:
                self.scheduler.schedule(f"{namespace}/{name}", 0.0)

    async def credentials_check(self, key: str, route: Route) -> ProbeResult | None:
        """Not Reachable (reason CredentialsNotReadable) while the relay may not read the
        route's Secret; None when it may, or when nothing is to be checked. Keeps since when
        the reviews have said it may (a fresh review outranks an older `forbidden` of the
        relays)."""
        account = self.config.relay_service_account
        if account is None or not secretaccess.references(route):
            self._readable_since.pop(key, None)
            return None
        try:
            problem = await secretaccess.unreadable(self.api.client, account,
                                                   self.config.relay_credentials_role, route)
        except (KubeError, OSError) as exc:
            logger.warning("%s: cannot check the relay's access to its Secret: %s", route.key, exc)
            return None
        if problem is None:
            self._readable_since.setdefault(key, time.time())
            return None
        self._readable_since.pop(key, None)
        return ProbeResult(False, secretaccess.NOT_READABLE, problem, None)

    async def write_status(self, key: str, entry: IndexedTarget, current: Mapping[str, Any],
                           obs: Observation) -> None:
        """Patch the status fields that changed; post the Event of a phase change once."""
        namespace, name = _split(key)
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
        if event_type != "DELETED":
            await self.api.shed_old_finalizer(*_split(key), meta)
        if event_type == "DELETED" or meta.get("deletionTimestamp"):
            self.scheduler.forget(key)
            self._written.pop(key, None)
            self._readable_since.pop(key, None)
            await self.fleet.remove(key, gone=event_type == "DELETED")
            return
        if event_type is None:  # the listing at start
            replay = replay_due(body.get("status"), EVENT_REPLAY_WINDOW)
            if replay is not None:
                # Posted by one background task, so that the listing's handlers (and the
                # bodies they hold) do not wait for thousands of POSTs.
                self._replays.put_nowait((key, str(meta.get("uid") or ""), replay))
        self.scheduler.notice(key, changed=needs_reconcile(body))

    def service_changed(self, namespace: str, name: str) -> None:
        """A Service changed: look at the targets that name it."""
        for key in self.targets_of_service(namespace, name):
            self.scheduler.schedule(key, 0.0)

    async def replay_events(self) -> None:
        """Post again the Events of transitions recorded shortly before this start (a no-op
        for those already posted: an Event is named after its transition)."""
        while True:
            key, uid, transition = await self._replays.get()
            await self.post_event(*_split(key), uid, transition)

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
            asyncio.create_task(memory.release_after(self.fleet.synced_once.wait()),
                                name="vncgate start-up memory"),
        ]
        if self.config.kubevirt_discovery:
            self.kubevirt_watch.start()  # not only with the first kubevirt target

    async def close(self) -> None:
        """Stop the background work and close the clients; a second call does nothing."""
        if self.session.closed:
            return
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.kubevirt_watch.close()
        await self.api.client.close()
        await self.session.close()
