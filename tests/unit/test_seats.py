"""Seats (relay/session/seats.py) against a Lease store that behaves as the API server does
where it matters here: a create or an update is written before its answer is read, and an
update that carries a stale resourceVersion is refused (409)."""

from __future__ import annotations

import asyncio
import copy
from typing import Any, cast

from vncgate.common.kube import KubeClient, KubeError
from vncgate.common.model import Route
from vncgate.common.spec import SessionPolicy
from vncgate.relay.session.consoles import Holder, KubeConsoles
from vncgate.relay.session.seats import KubeSeats, slot_name


class Leases:
    """Lease objects by name; `answers` (when set) holds back the answer of every create
    until it is set, after the Lease was written."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {}
        self.version = 0
        self.answers: asyncio.Event | None = None

    def _write(self, lease: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        lease["metadata"]["resourceVersion"] = str(self.version)
        self.items[lease["metadata"]["name"]] = lease
        return copy.deepcopy(lease)

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        name = path.rsplit("/", 1)[-1]
        if method == "POST":
            if body["metadata"]["name"] in self.items:
                raise KubeError(409, "already exists")
            written = self._write(copy.deepcopy(body))
            if self.answers is not None:
                await self.answers.wait()
            return written
        if method == "GET" and "?labelSelector=" in path:
            return {"items": [copy.deepcopy(item) for item in self.items.values()]}
        if name not in self.items:
            raise KubeError(404, "not found")
        if method == "GET":
            return copy.deepcopy(self.items[name])
        if method == "PATCH":  # a merge patch of the whole metadata and spec
            if body["metadata"]["resourceVersion"] != self.items[name]["metadata"][
                    "resourceVersion"]:
                raise KubeError(409, "the object has been modified")
            return self._write(copy.deepcopy(body))
        if method == "DELETE":
            del self.items[name]
            return {}
        raise AssertionError(f"{method} {path}")


def holder(session_id: str) -> Holder:
    return Holder(session_id=session_id, user=session_id, client="127.0.0.1", since=0.0,
                  replica="relay-0")


async def test_a_slot_whose_create_is_not_yet_answered_is_not_free_for_this_replica() -> None:
    """maxViewers: 1, two viewers of one replica at once. The first one's create is written
    but not yet answered when the second lists the slots: the second must see the slot held
    (it was taken for a release that failed, and both were admitted: CI saw three viewers of a
    console with maxViewers 2)."""
    leases = Leases()
    seats = KubeSeats(KubeConsoles(cast(KubeClient, leases), "vncgate", "relay-0"))
    route = Route("lab", "desk", "127.0.0.1", 5900, sessions=SessionPolicy(max_viewers=1))
    leases.answers = asyncio.Event()
    first = asyncio.create_task(seats.take_slot(route, holder("first")))
    while slot_name(route, 0) not in leases.items:  # written; its answer is held back
        await asyncio.sleep(0)
    second = await seats.take_slot(route, holder("second"))
    leases.answers.set()
    taken = await first
    assert second is None
    assert taken is not None and taken.session_id == "first"
    annotations = leases.items[slot_name(route, 0)]["metadata"]["annotations"]
    assert annotations["vncgate.io/session"] == "first"
