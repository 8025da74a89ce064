"""Who holds an exclusive console: in this process, or across replicas as Kubernetes Leases.

An exclusive target has at most one holder. `acquire` makes the claimant the holder, or returns
the current holder (who, from where, since when) so the viewer can be told; a takeover replaces
the holder and the replica serving the old holder closes that session with 4409.

Across replicas (`KubeConsoles`) the holder is a Lease `vnc-<namespace>-<name>` in the relay's
namespace, written on acquire, takeover and release only. Liveness is one Lease per replica,
renewed on an interval: a target Lease whose holder replica's Lease has expired is free, so a
replica that dies frees its consoles at expiry without anyone writing per session. The liveness
Lease also names the process that renews it (`vncgate.io/incarnation`), so the seats of
relay/session/seats.py written by a replica's earlier process are free once it restarts. Each
replica watches the Leases of its namespace to learn of takeovers, and checks its own holds on
every renewal in case a watch event was missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from vncgate.common.kube import KubeClient, KubeError
from vncgate.common.model import Route
from vncgate.common.tasks import cancel_and_wait

log = logging.getLogger("vncgate.consoles")

LABEL_KIND = "vncgate.io/lease"
ANNOTATION_PREFIX = "vncgate.io/"
ANNOTATION_INCARNATION = f"{ANNOTATION_PREFIX}incarnation"


@dataclass(frozen=True, slots=True)
class Holder:
    session_id: str
    user: str
    client: str
    since: float  # seconds since the epoch
    replica: str

    def describe(self) -> str:
        who = self.user or self.client or "someone"
        when = datetime.fromtimestamp(self.since, UTC).strftime("%H:%M:%S UTC")
        return f"{who} since {when}"


# Told when a session of this replica lost its console to a takeover: (target, session id, taker).
TakenCallback = Callable[[str, str, Holder], None]
MayTake = Callable[[Holder], bool]


class Consoles(Protocol):
    async def acquire(self, route: Route, claimant: Holder, may_take: MayTake) -> Holder | None:
        """None when the claimant now holds the console; else the holder who keeps it."""

    async def release(self, route: Route, claimant: Holder) -> None: ...

    async def start(self, on_taken: TakenCallback) -> None: ...

    async def close(self) -> None: ...


class LocalConsoles:
    """One process (the standalone relay): the holders live in a dict."""

    def __init__(self) -> None:
        self._holders: dict[str, Holder] = {}
        self._on_taken: TakenCallback = lambda target, session, taker: None

    async def start(self, on_taken: TakenCallback) -> None:
        self._on_taken = on_taken

    async def close(self) -> None:
        self._holders.clear()

    async def acquire(self, route: Route, claimant: Holder, may_take: MayTake) -> Holder | None:
        holder = self._holders.get(route.key)
        if holder is not None and holder.session_id != claimant.session_id:
            if not may_take(holder):
                return holder
            self._on_taken(route.key, holder.session_id, claimant)
        self._holders[route.key] = claimant
        return None

    async def release(self, route: Route, claimant: Holder) -> None:
        holder = self._holders.get(route.key)
        if holder is not None and holder.session_id == claimant.session_id:
            del self._holders[route.key]


def lease_name(route: Route) -> str:
    """`vnc-<namespace>-<name>`, shortened with a hash where it would pass 253 characters."""
    name = f"vnc-{route.namespace}-{route.name}"
    if len(name) <= 253:
        return name
    digest = hashlib.sha256(route.key.encode()).hexdigest()[:16]
    return f"{name[:236]}-{digest}"


def _now() -> datetime:
    return datetime.now(UTC)


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


def holder_of(lease: dict[str, Any]) -> Holder | None:
    spec = lease.get("spec") or {}
    notes = (lease.get("metadata") or {}).get("annotations") or {}
    replica = spec.get("holderIdentity")
    session = notes.get(f"{ANNOTATION_PREFIX}session")
    if not replica or not session:
        return None
    return Holder(session_id=session, user=notes.get(f"{ANNOTATION_PREFIX}user", ""),
                  client=notes.get(f"{ANNOTATION_PREFIX}client", ""),
                  since=_parse_time(spec.get("acquireTime")) or time.time(), replica=replica)


def incarnation_of(lease: dict[str, Any]) -> str:
    """The process that wrote `lease` (empty for Leases written before it was recorded)."""
    notes = (lease.get("metadata") or {}).get("annotations") or {}
    return str(notes.get(ANNOTATION_INCARNATION) or "")


class KubeConsoles:
    """Exclusive holders as Leases in `namespace`; this replica is `identity`."""

    def __init__(self, client: KubeClient, namespace: str, identity: str,
                 lease_seconds: int = 30, renew_seconds: float = 10.0, *,
                 liveness: KubeClient | None = None) -> None:
        self.client = client
        # This replica's liveness Lease: on connections of its own, so that no burst of other
        # requests can hold its renewal back (relay/state.py RelayKube). `client` if not given.
        self.liveness = liveness or client
        self.namespace = namespace
        self.identity = identity
        self.lease_seconds = lease_seconds
        self.renew_seconds = renew_seconds
        self._path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        self._mine: dict[str, tuple[Route, Holder]] = {}  # target -> this replica's hold
        self._on_taken: TakenCallback = lambda target, session, taker: None
        self._tasks: list[asyncio.Task[None]] = []
        # replica -> (renewed in time, the process that renewed it, until when this is kept)
        self._alive_cache: dict[str, tuple[bool, str, float]] = {}
        # This process among the replica's restarts (same identity, a new process): a Lease
        # written by an earlier one is not held by this one.
        self.incarnation = secrets.token_hex(8)
        # Called when this replica's liveness Lease may have expired in the others' eyes (not
        # renewed for longer than `lease_seconds - renew_seconds`): what it holds (exclusive
        # consoles, seats) may be taken by now, so its sessions on them must end.
        self.on_lost: Callable[[], None] = lambda: None
        self._renewed_at = time.monotonic()

    @property
    def replica_lease(self) -> str:
        return f"vncgate-relay-{self.identity}"

    async def start(self, on_taken: TakenCallback) -> None:
        self._on_taken = on_taken
        await self._renew()
        self._tasks = [asyncio.create_task(self._renew_loop()),
                       asyncio.create_task(self._watch_loop()),
                       asyncio.create_task(self._fence_loop())]

    async def close(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks = []
        # Release this replica's holds and its liveness Lease, so consoles free at once.
        for route, holder in list(self._mine.values()):
            with contextlib.suppress(KubeError, OSError, TimeoutError):
                await self.release(route, holder)
        with contextlib.suppress(KubeError, OSError, TimeoutError):
            await self.liveness.request("DELETE", f"{self._path}/{self.replica_lease}")
        await self.client.close()
        if self.liveness is not self.client:
            await self.liveness.close()

    # --- liveness -------------------------------------------------------------------------

    async def _renew(self) -> None:
        started = time.monotonic()
        now = _rfc3339(_now())
        notes = {ANNOTATION_INCARNATION: self.incarnation}
        body: dict[str, Any] = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.replica_lease, "namespace": self.namespace,
                             "labels": {LABEL_KIND: "replica"}, "annotations": notes},
                "spec": {"holderIdentity": self.identity, "renewTime": now,
                         "leaseDurationSeconds": self.lease_seconds}}
        try:
            await self.liveness.request("PATCH", f"{self._path}/{self.replica_lease}",
                                        {"metadata": {"annotations": notes},
                                         "spec": body["spec"]})
        except KubeError as exc:
            if exc.status != 404:
                raise
            body["spec"]["acquireTime"] = now
            await self.liveness.request("POST", self._path, body)
        self._renewed_at = started

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.renew_seconds)
            try:
                await self._renew()
                await self._check_holds()
            except (KubeError, OSError, TimeoutError) as exc:
                log.warning("renewing this replica's lease failed; retrying",
                            extra={"fields": {"error": str(exc) or type(exc).__name__}})

    async def _fence_loop(self) -> None:
        """End what this replica holds before the others may count it free: when its
        liveness Lease went unrenewed for `lease_seconds - renew_seconds` (cut off from the
        API server), or at once after this process stood still longer (stopped, starved)."""
        while True:
            await asyncio.sleep(1.0)
            late = time.monotonic() - self._renewed_at
            if late > self.lease_seconds - self.renew_seconds:
                log.error("this replica's lease was not renewed in time; ending the sessions "
                          "that hold a console or a seat",
                          extra={"fields": {"seconds": round(late, 1)}})
                self.on_lost()

    async def alive(self, replica: str, incarnation: str = "") -> bool:
        """Whether `replica` renewed its Lease in time (and, given `incarnation`, is still the
        process that wrote it: a restarted replica holds none of its predecessor's Leases)."""
        if replica == self.identity and (not incarnation or incarnation == self.incarnation):
            return True
        cached = self._alive_cache.get(replica)
        now = time.monotonic()
        if cached is not None and cached[2] > now:
            renewed, process = cached[0], cached[1]
        else:
            try:
                lease = await self.client.request("GET", f"{self._path}/vncgate-relay-{replica}")
            except KubeError as exc:
                if exc.status != 404:
                    raise
                renewed, process = False, ""
            else:
                spec = lease.get("spec") or {}
                at = _parse_time(spec.get("renewTime"))
                duration = spec.get("leaseDurationSeconds") or self.lease_seconds
                renewed = at is not None and at + float(duration) > time.time()
                process = str(((lease.get("metadata") or {}).get("annotations") or {}).get(
                    ANNOTATION_INCARNATION) or "")
            self._alive_cache[replica] = (renewed, process, now + 1.0)
        return renewed and (not incarnation or not process or incarnation == process)

    # --- holds ----------------------------------------------------------------------------

    def _lease_body(self, route: Route, claimant: Holder, transitions: int) -> dict[str, Any]:
        now = _rfc3339(datetime.fromtimestamp(claimant.since, UTC))
        return {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {
                "name": lease_name(route), "namespace": self.namespace,
                "labels": {LABEL_KIND: "console"},
                "annotations": {f"{ANNOTATION_PREFIX}target": route.key,
                                f"{ANNOTATION_PREFIX}session": claimant.session_id,
                                f"{ANNOTATION_PREFIX}user": claimant.user,
                                f"{ANNOTATION_PREFIX}client": claimant.client,
                                ANNOTATION_INCARNATION: self.incarnation}},
            "spec": {"holderIdentity": self.identity, "acquireTime": now, "renewTime": now,
                     "leaseDurationSeconds": self.lease_seconds,
                     "leaseTransitions": transitions},
        }

    async def acquire(self, route: Route, claimant: Holder, may_take: MayTake) -> Holder | None:
        path = f"{self._path}/{lease_name(route)}"
        try:
            lease = await self.client.request("GET", path)
        except KubeError as exc:
            if exc.status != 404:
                raise
            try:
                await self.client.request("POST", self._path, self._lease_body(route, claimant, 0))
            except KubeError as conflict:
                if conflict.status != 409:
                    raise
                lease = await self.client.request("GET", path)  # someone was faster
            else:
                self._mine[route.key] = (route, claimant)
                return None
        holder = holder_of(lease)
        if holder is not None and holder.session_id != claimant.session_id and \
                await self.alive(holder.replica, incarnation_of(lease)):
            if not may_take(holder):
                return holder
        else:
            holder = None  # free: released, or its replica is gone
        transitions = int((lease.get("spec") or {}).get("leaseTransitions") or 0) + 1
        body = self._lease_body(route, claimant, transitions)
        # The resourceVersion makes a concurrent writer's update fail with 409 in a real cluster.
        body["metadata"]["resourceVersion"] = (lease.get("metadata") or {}).get("resourceVersion")
        try:
            await self.client.request("PATCH", path, body)
        except KubeError as exc:
            if exc.status != 409:
                raise
            current = holder_of(await self.client.request("GET", path))
            return current or holder or claimant  # lost the race: someone else holds it now
        if holder is not None and holder.replica == self.identity:
            self._on_taken(route.key, holder.session_id, claimant)
        self._mine[route.key] = (route, claimant)
        return None

    async def release(self, route: Route, claimant: Holder) -> None:
        mine = self._mine.get(route.key)
        if mine is not None and mine[1].session_id == claimant.session_id:
            del self._mine[route.key]
        path = f"{self._path}/{lease_name(route)}"
        try:
            lease = await self.client.request("GET", path)
            holder = holder_of(lease)
            if holder is None or holder.session_id != claimant.session_id:
                return  # taken over meanwhile: not ours to free
            await self.client.request("DELETE", path, {
                "preconditions": {"resourceVersion": (lease.get("metadata") or {}).get(
                    "resourceVersion")}})
        except KubeError as exc:
            if exc.status not in (404, 409):
                raise

    async def _check_holds(self) -> None:
        for target, (route, _) in list(self._mine.items()):
            try:
                lease = await self.client.request("GET", f"{self._path}/{lease_name(route)}")
            except KubeError as exc:
                if exc.status != 404:
                    raise
                continue
            self._notice(target, holder_of(lease))

    def _notice(self, target: str, holder: Holder | None) -> None:
        mine = self._mine.get(target)
        if mine is None or holder is None or holder.session_id == mine[1].session_id:
            return
        del self._mine[target]
        self._on_taken(target, mine[1].session_id, holder)

    async def _watch_loop(self) -> None:
        while True:
            try:
                async for event in self.client.watch(self._path):
                    lease = event.get("object") or {}
                    meta = lease.get("metadata") or {}
                    if (meta.get("labels") or {}).get(LABEL_KIND) != "console":
                        continue
                    target = (meta.get("annotations") or {}).get(f"{ANNOTATION_PREFIX}target")
                    if event.get("type") in ("ADDED", "MODIFIED") and target:
                        self._notice(target, holder_of(lease))
            except (KubeError, OSError, TimeoutError, ValueError) as exc:
                log.warning("watching console leases failed; retrying",
                            extra={"fields": {"error": str(exc)}})
                await asyncio.sleep(self.renew_seconds / 2)
