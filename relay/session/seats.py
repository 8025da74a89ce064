"""Seats on a shared console across replicas: `maxViewers` and `interactive: first` held as
Leases, so that they hold by construction, not by a count that two replicas may read at once.

- A route with `maxViewers: N` has N slot Leases per target, `vncgate-slot-<digest>-<i>`
  (i = 0..N-1; the digest is of `namespace/name`). A session holds one while it lives: it
  creates one at a random index (one round trip while the console is far from full), else
  lists them and creates a missing one or takes one whose holder is gone with a merge patch
  that carries the `resourceVersion` it read (the API server refuses a concurrent writer with
  409, and the loser tries the next). When none can be had the console has N viewers: 4409.
- A route with `interactive: first` has one control Lease per target, `vncgate-control-
  <digest>`. The session that holds it may type; every other session watches. It is released
  when its session ends; the next session to open the console takes it (those watching keep
  watching until they reconnect).

A seat's holder is a replica (`holderIdentity`) and a session of it (annotations), as for
exclusive consoles (relay/session/consoles.py), and it is alive while that replica's
liveness Lease is renewed by the same process (its incarnation): no per-session renewals,
and a SIGKILLed replica's seats are free when its liveness Lease expires (30 s). A seat that
names this replica's own process but none of its sessions is free too (a release that failed),
unless a session of this process is creating or taking it (its write may be stored before
its answer is read).
A release deletes the Lease with the `resourceVersion` this replica wrote (a 409 means it was
taken since: not ours to free); a failed release is retried every `retry_seconds`.

When the API server cannot be asked, `SeatsUnavailable`: the session is refused (fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiohttp

from vncgate.common.kube import KubeError
from vncgate.common.model import Route
from vncgate.common.tasks import cancel_and_wait
from vncgate.relay.session.consoles import (
    ANNOTATION_INCARNATION,
    ANNOTATION_PREFIX,
    LABEL_KIND,
    Holder,
    KubeConsoles,
    holder_of,
    incarnation_of,
)

log = logging.getLogger("vncgate.seats")

KIND_SLOT = "slot"
KIND_CONTROL = "control"
# Which target's seats a Lease is (a digest: a label value has at most 63 characters).
LABEL_SEAT_OF = f"{ANNOTATION_PREFIX}seat-of"


class SeatsUnavailable(Exception):
    """The API server could not be asked who holds a seat; the message says what failed."""


@dataclass(frozen=True, slots=True)
class Seat:
    """A Lease this replica holds for one session: its name and the version it wrote."""

    name: str
    version: str
    session_id: str
    kind: str  # KIND_SLOT or KIND_CONTROL


def target_digest(route: Route) -> str:
    return hashlib.sha256(route.key.encode()).hexdigest()[:40]


def slot_name(route: Route, index: int) -> str:
    return f"vncgate-{KIND_SLOT}-{target_digest(route)}-{index}"


def control_name(route: Route) -> str:
    return f"vncgate-{KIND_CONTROL}-{target_digest(route)}"


def _rfc3339(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _version(lease: Any) -> str:
    return str(((lease or {}).get("metadata") or {}).get("resourceVersion") or "")


class KubeSeats:
    """Slots and control as Leases in the namespace of `consoles` (its client and liveness)."""

    def __init__(self, consoles: KubeConsoles, retry_seconds: float = 10.0,
                 rounds: int = 3) -> None:
        self.consoles = consoles
        self.retry_seconds = retry_seconds
        self.rounds = rounds
        self._path = f"/apis/coordination.k8s.io/v1/namespaces/{consoles.namespace}/leases"
        self._held: dict[str, str] = {}  # Lease name -> session id, this process's seats
        # Lease name -> this process's sessions whose create or take of it is under way: the
        # API server may have written it before the answer is read here, and a session of
        # this process that lists it meanwhile must not take it for a failed release.
        self._claiming: dict[str, set[str]] = {}
        self._unreleased: dict[str, Seat] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._retry_loop())

    async def close(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    # --- taking ---------------------------------------------------------------------------

    async def take_slot(self, route: Route, holder: Holder) -> Seat | None:
        """One of the route's `maxViewers` slots for `holder`'s session; None when all are
        held. SeatsUnavailable when the API server cannot be asked."""
        limit = route.sessions.max_viewers
        assert limit is not None
        names = [slot_name(route, index) for index in range(limit)]
        # First a guess, one create: while the console is far from full, a slot picked at
        # random is free (no list). Not a secret, only a spread.
        seat = await self._create(route, holder, KIND_SLOT,
                                  names[random.randrange(limit)])  # noqa: S311
        if seat is not None:
            return seat
        selector = quote(f"{LABEL_KIND}={KIND_SLOT},{LABEL_SEAT_OF}={target_digest(route)}",
                         safe="")
        for _ in range(self.rounds):
            try:
                reply = await self._ask("GET", f"{self._path}?labelSelector={selector}")
            except KubeError as exc:
                raise SeatsUnavailable(f"the API server refused: {exc}") from None
            found = {str((item.get("metadata") or {}).get("name")): item
                     for item in reply.get("items") or ()}
            lost = False
            for name in names:  # the missing ones first: a create needs no liveness lookup
                if name not in found:
                    seat = await self._create(route, holder, KIND_SLOT, name)
                    if seat is not None:
                        return seat
                    lost = True
            for name in names:
                if name in found and await self._free(found[name]):
                    seat = await self._take(route, holder, KIND_SLOT, found[name])
                    if seat is not None:
                        return seat
                    lost = True
            if not lost:
                return None  # every slot is held by a live session
        return None  # others took each free slot first, round after round: as good as full

    async def take_control(self, route: Route, holder: Holder) -> Seat | None:
        """The route's control for `holder`'s session, or None when another session has it.
        SeatsUnavailable when the API server cannot be asked."""
        name = control_name(route)
        for _ in range(self.rounds):
            seat = await self._create(route, holder, KIND_CONTROL, name)
            if seat is not None:
                return seat
            try:  # it exists: free if its session is gone
                lease = await self._ask("GET", f"{self._path}/{name}")
            except KubeError as exc:
                if exc.status != 404:
                    raise SeatsUnavailable(f"the API server refused: {exc}") from None
                continue  # released meanwhile: create it again
            if not await self._free(lease):
                return None
            return await self._take(route, holder, KIND_CONTROL, lease)
        return None

    async def release(self, seat: Seat) -> None:
        """Free the seat (unless someone took it since); retried later when it fails."""
        if self._held.get(seat.name) == seat.session_id:
            del self._held[seat.name]
        try:
            await self._delete(seat)
        except SeatsUnavailable as exc:
            log.warning("could not release a seat; retrying",
                        extra={"fields": {"lease": seat.name, "error": str(exc)}})
            self._unreleased[seat.name] = seat

    # --- the Leases -----------------------------------------------------------------------

    async def _ask(self, method: str, path: str, body: Any = None) -> Any:
        """The API server's answer; KubeError for 404 and 409 (the caller's to read),
        SeatsUnavailable for anything else."""
        try:
            return await self.consoles.client.request(method, path, body)
        except KubeError as exc:
            if exc.status in (404, 409):
                raise
            raise SeatsUnavailable(f"the API server refused: {exc}") from None
        except (OSError, TimeoutError, aiohttp.ClientError) as exc:
            raise SeatsUnavailable(
                f"the API server could not be reached: {type(exc).__name__}") from None

    def _body(self, route: Route, holder: Holder, kind: str, name: str,
              transitions: int) -> dict[str, Any]:
        now = _rfc3339(holder.since)
        return {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {
                "name": name, "namespace": self.consoles.namespace,
                "labels": {LABEL_KIND: kind, LABEL_SEAT_OF: target_digest(route)},
                "annotations": {f"{ANNOTATION_PREFIX}target": route.key,
                                f"{ANNOTATION_PREFIX}session": holder.session_id,
                                f"{ANNOTATION_PREFIX}user": holder.user,
                                f"{ANNOTATION_PREFIX}client": holder.client,
                                ANNOTATION_INCARNATION: self.consoles.incarnation}},
            "spec": {"holderIdentity": self.consoles.identity, "acquireTime": now,
                     "renewTime": now, "leaseDurationSeconds": self.consoles.lease_seconds,
                     "leaseTransitions": transitions},
        }

    @contextlib.contextmanager
    def _claim(self, name: str, session_id: str) -> Iterator[None]:
        """While a create or take of `name` by `session_id` is under way (see _claiming)."""
        self._claiming.setdefault(name, set()).add(session_id)
        try:
            yield
        finally:
            sessions = self._claiming[name]
            sessions.discard(session_id)
            if not sessions:
                del self._claiming[name]

    async def _create(self, route: Route, holder: Holder, kind: str, name: str
                      ) -> Seat | None:
        with self._claim(name, holder.session_id):
            try:
                created = await self._ask("POST", self._path,
                                          self._body(route, holder, kind, name, 0))
            except KubeError as exc:  # 409: another session created it first
                if exc.status == 409:
                    return None
                raise SeatsUnavailable(f"the API server refused: {exc}") from None
            return self._hold(name, created, holder, kind)

    async def _take(self, route: Route, holder: Holder, kind: str, lease: dict[str, Any]
                    ) -> Seat | None:
        """Take a free seat over; None when another session wrote it since it was read."""
        name = str((lease.get("metadata") or {}).get("name"))
        transitions = int((lease.get("spec") or {}).get("leaseTransitions") or 0) + 1
        body = self._body(route, holder, kind, name, transitions)
        body["metadata"]["resourceVersion"] = _version(lease)
        with self._claim(name, holder.session_id):
            try:
                taken = await self._ask("PATCH", f"{self._path}/{name}", body)
            except KubeError as exc:  # 409: written since; 404: deleted since (released)
                if exc.status in (404, 409):
                    return None
                raise SeatsUnavailable(f"the API server refused: {exc}") from None
            return self._hold(name, taken, holder, kind)

    def _hold(self, name: str, lease: Any, holder: Holder, kind: str) -> Seat:
        self._held[name] = holder.session_id
        self._unreleased.pop(name, None)
        return Seat(name=name, version=_version(lease), session_id=holder.session_id,
                    kind=kind)

    async def _free(self, lease: dict[str, Any]) -> bool:
        """Whether a seat's Lease names no live session: its replica's process is gone, or it
        is this process and none of its sessions holds it or is taking it."""
        holder = holder_of(lease)
        if holder is None:
            return True
        incarnation = incarnation_of(lease)
        consoles = self.consoles
        if holder.replica == consoles.identity and incarnation == consoles.incarnation:
            name = str((lease.get("metadata") or {}).get("name"))
            return (self._held.get(name) != holder.session_id
                    and holder.session_id not in self._claiming.get(name, ()))
        try:
            return not await consoles.alive(holder.replica, incarnation)
        except KubeError as exc:
            raise SeatsUnavailable(f"the API server refused: {exc}") from None
        except (OSError, TimeoutError, aiohttp.ClientError) as exc:
            raise SeatsUnavailable(
                f"the API server could not be reached: {type(exc).__name__}") from None

    async def _delete(self, seat: Seat) -> None:
        body = {"preconditions": {"resourceVersion": seat.version}} if seat.version else None
        # 404: gone already; 409: taken over since, not ours to free.
        with contextlib.suppress(KubeError):
            await self._ask("DELETE", f"{self._path}/{seat.name}", body)
        self._unreleased.pop(seat.name, None)

    async def _retry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.retry_seconds)
            for seat in list(self._unreleased.values()):
                if self._held.get(seat.name) is not None:  # taken again by this process
                    self._unreleased.pop(seat.name, None)
                    continue
                try:
                    await self._delete(seat)
                except SeatsUnavailable:
                    break
