"""What the fleet reports before it has read any relay: nothing it cannot know."""

from __future__ import annotations

import dataclasses

import aiohttp

from vncgate.common.client import TableSnapshot
from vncgate.common.model import Route, table_revision
from vncgate.operator.relays import FanOut, RelayFleet

ROUTE = Route("lab", "desk-1", "10.0.0.5", 5900)


async def test_before_the_first_resync_the_fleet_claims_nothing() -> None:
    async with aiohttp.ClientSession() as session:
        fleet = RelayFleet(session, "t" * 32, ["http://127.0.0.1:9"])
        # After an operator restart: keep the status, do not flap Ready to Pending.
        assert fleet.registration(ROUTE) is None
        assert fleet.sessions(ROUTE.key) is None
        assert fleet.viewers(ROUTE.key) is None
        fleet.synced_once.set()
        registration = fleet.registration(ROUTE)
        assert registration is not None and registration.reason == "NotRegistered"
        fleet._replicas["http://127.0.0.1:9"].hold(ROUTE)  # as a PUT would
        registration = fleet.registration(ROUTE)
        assert registration is not None and registration.ok


async def test_a_replica_that_does_not_answer_leaves_the_others_registration_standing() -> None:
    """Registered is judged over the replicas that answer: one replica down is the fleet's
    condition, not every target's; only when none answers is a target Pending."""
    urls = ["http://127.0.0.1:9", "http://127.0.0.1:10", "http://127.0.0.1:11"]
    async with aiohttp.ClientSession() as session:
        fleet = RelayFleet(session, "t" * 32, urls)
        fleet.synced_once.set()
        for url in urls:
            fleet._replicas[url].hold(ROUTE)
        ready = fleet.registration(ROUTE)
        assert ready is not None and ready.ok
        fleet.failures[urls[2]] = "connection refused"  # as poll() records it
        fleet._replicas[urls[2]].forget_all()  # what it holds is unknown now
        assert fleet.answering() == sorted(urls[:2])
        # The same condition, word for word: no status write, no Event, for any target.
        assert fleet.registration(ROUTE) == ready
        # A replica that answers but lacks the route still holds a target back.
        fleet._replicas[urls[1]].drop(ROUTE.key)
        missing = fleet.registration(ROUTE)
        assert missing is not None and (missing.ok, missing.reason) == (False, "NotRegistered")
        fleet.failures[urls[0]] = "timed out"
        fleet.failures[urls[1]] = "connection refused"
        none = fleet.registration(ROUTE)
        assert none is not None and (none.ok, none.reason) == (False, "RelayUnavailable")
        assert "none of the 3 relay replicas answered (connection refused)" in none.message


async def test_before_the_first_resync_a_change_waits_for_it_and_after_it_is_sent() -> None:
    async with aiohttp.ClientSession() as session:
        sent: list[str] = []
        fleet = RelayFleet(session, "t" * 32, ["http://127.0.0.1:9"],
                           route_of=lambda key: ROUTE if key == ROUTE.key else None)

        async def converge(key: str, *, deleted: bool = False) -> FanOut:
            sent.append(f"{'DELETE' if deleted else 'PUT'} {key}")
            return FanOut(replicas=1, failed={})

        fleet.converge = converge  # type: ignore[method-assign]
        fleet._kick.clear()
        await fleet.offer(ROUTE.key, ROUTE)
        assert sent == [] and fleet._kick.is_set()  # the first full resync carries it
        await fleet.offer("lab/broken", None)
        assert sent == []  # nothing is held before the first resync: nothing to take back
        fleet.synced_once.set()
        await fleet.offer(ROUTE.key, ROUTE)
        await fleet.offer("lab/broken", None)  # it may have been valid before
        assert sent == [f"PUT {ROUTE.key}", "PUT lab/broken"]
        fleet._replicas["http://127.0.0.1:9"].hold(ROUTE)
        await fleet.offer(ROUTE.key, ROUTE)  # held already: nothing to send
        await fleet.remove("lab/other", gone=False)  # leaving, and no replica holds it
        await fleet.remove(ROUTE.key, gone=False)
        await fleet.remove("lab/other", gone=True)
        assert sent[2:] == [f"DELETE {ROUTE.key}", "DELETE lab/other"]


async def test_discovered_replicas_replace_the_set_once_the_views_are_complete() -> None:
    async with aiohttp.ClientSession() as session:
        fleet = RelayFleet(session, "t" * 32, ["http://127.0.0.1:9"])
        fleet.views_complete()  # --relay-url: a fixed set
        assert fleet.views_ready.is_set() and fleet.urls == {"http://127.0.0.1:9"}
        fleet.views_complete(["http://127.0.0.1:10", "http://127.0.0.1:11"])
        assert fleet.urls == {"http://127.0.0.1:10", "http://127.0.0.1:11"}


class _Accepting:
    """A relay client that accepts whatever it is sent (the fleet's bookkeeping is under test)."""

    async def put_route(self, route: Route) -> None:
        return None

    async def get_summary(self) -> TableSnapshot:
        return TableSnapshot(revision="0" * 64, synced=False, boot="b")

    async def replace_table(self, routes: list[Route], if_revision: str) -> str:
        return table_revision(routes)


async def test_the_replicas_share_one_route_object_per_target() -> None:
    """Each replica's route is computed anew at send time; what the fleet keeps of them is one
    object per target, not one per replica (memory at 10 replicas and 10,000 targets)."""
    urls = ["http://127.0.0.1:9", "http://127.0.0.1:10", "http://127.0.0.1:11"]
    other = Route("lab", "desk-2", "10.0.0.6", 5900)
    async with aiohttp.ClientSession() as session:
        fleet = RelayFleet(session, "t" * 32, urls,
                           route_of=lambda key: dataclasses.replace(ROUTE) if key == ROUTE.key
                           else None,
                           desired=lambda: [dataclasses.replace(ROUTE), dataclasses.replace(other)])
        for replica in fleet._replicas.values():
            replica.client = _Accepting()  # type: ignore[assignment]
        await fleet.converge(ROUTE.key)
        held = [replica.held[ROUTE.key] for replica in fleet._replicas.values()]
        assert all(route == ROUTE for route in held)
        assert len({id(route) for route in held}) == 1
        assert await fleet.sync_all()
        for key in (ROUTE.key, other.key):
            held = [replica.held[key] for replica in fleet._replicas.values()]
            assert len({id(route) for route in held}) == 1, key
        # A replica given a different route keeps its own; the others are untouched.
        moved = Route("lab", "desk-1", "10.0.0.7", 5900)
        fleet._replicas[urls[0]].hold(moved)
        assert fleet._replicas[urls[1]].held[ROUTE.key] == ROUTE
