"""What the fleet reports before it has read any relay: nothing it cannot know."""

from __future__ import annotations

import aiohttp

from vncgate.common.model import Route
from vncgate.operator.relays import RelayFleet

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
