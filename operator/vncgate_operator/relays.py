"""The relay replicas as one fleet: single-route changes, the periodic full resync, session counts.

Talks to relays only through `relay.client.RelayClient`. No kopf here: the handlers give it the
desired table (a function over kopf's indexes) and a signal that those indexes are complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import aiohttp

from relay.client import RelayClient, RelayError
from relay.model import Route, table_revision
from vncgate_operator.status import Registration

logger = logging.getLogger("vncgate.operator.relays")


@dataclass(frozen=True, slots=True)
class FanOut:
    """The outcome of one request sent to every replica."""

    replicas: int
    failed: dict[str, str]

    @property
    def all_failed(self) -> bool:
        return self.replicas > 0 and len(self.failed) == self.replicas


class RelayFleet:
    def __init__(self, session: aiohttp.ClientSession, token: str, urls: Iterable[str] = (),
                 timeout: float = 5.0) -> None:
        self._session = session
        self._token = token
        self._timeout = timeout
        self._clients: dict[str, RelayClient] = {}
        self.urls: frozenset[str] = frozenset(urls)
        # Per replica: why the last request failed. Cleared by the next success.
        self.failures: dict[str, str] = {}
        # Routes that every replica is known to hold (by a PUT or a matching table revision).
        self.confirmed: dict[str, Route] = {}
        self._sessions: dict[str, dict[str, int]] = {}
        self._viewers: dict[str, dict[str, list[str]]] = {}
        self._kick = asyncio.Event()
        # Set once kopf's indexes hold every VncTarget and Service: before that, the desired
        # table may be partial, and a full PUT of it would remove live routes from the relays.
        self.views_ready = asyncio.Event()
        self.synced_once = asyncio.Event()

    def _client(self, url: str) -> RelayClient:
        client = self._clients.get(url)
        if client is None:
            client = self._clients[url] = RelayClient(self._session, url, self._token,
                                                      timeout=self._timeout)
        return client

    def set_urls(self, urls: Iterable[str]) -> frozenset[str]:
        """Replace the replica set (discovery); returns the replicas that are new."""
        new_urls = frozenset(urls)
        added = new_urls - self.urls
        for gone in self.urls - new_urls:
            self._clients.pop(gone, None)
            self.failures.pop(gone, None)
            self._sessions.pop(gone, None)
            self._viewers.pop(gone, None)
        self.urls = new_urls
        if added:
            # A new replica may be empty: what the others hold is no longer held by all.
            self.confirmed.clear()
            self.kick()
        return added

    def kick(self) -> None:
        """Run the full resync now instead of at the end of the interval."""
        self._kick.set()

    def sessions(self, key: str) -> int | None:
        """Open sessions over every replica; None until a replica's table was read."""
        if not self._sessions:
            return None
        return sum(table.get(key, 0) for table in self._sessions.values())

    def viewers(self, key: str) -> str | None:
        """Who is viewing, over every replica: "alice, bob", at most 256 characters; None until
        a replica's table was read."""
        if not self._viewers:
            return None
        names = sorted({name for table in self._viewers.values() for name in table.get(key, [])})
        text = ", ".join(names)
        return text if len(text) <= 256 else text[:250] + ", ..."

    async def _fan_out(self, what: str, call: Callable[[RelayClient], Awaitable[object]]) -> FanOut:
        urls = sorted(self.urls)
        results = await asyncio.gather(*(call(self._client(u)) for u in urls),
                                       return_exceptions=True)
        failed: dict[str, str] = {}
        for url, result in zip(urls, results, strict=True):
            if isinstance(result, RelayError):
                failed[url] = str(result)
                self.failures[url] = str(result)
            elif isinstance(result, BaseException):
                raise result
            else:
                self.failures.pop(url, None)
        if failed:
            logger.warning("%s failed on %d of %d relay replicas: %s", what, len(failed),
                           len(urls), "; ".join(failed.values()))
        return FanOut(replicas=len(urls), failed=failed)

    async def put_route(self, route: Route) -> FanOut:
        result = await self._fan_out(f"PUT {route.key}", lambda c: c.put_route(route))
        if result.failed:
            self.confirmed.pop(route.key, None)
            self.kick()  # the resync repairs the replicas that missed it
        elif result.replicas:
            self.confirmed[route.key] = route
        return result

    async def delete_route(self, namespace: str, name: str) -> FanOut:
        result = await self._fan_out(f"DELETE {namespace}/{name}",
                                     lambda c: c.delete_route(namespace, name))
        self.confirmed.pop(f"{namespace}/{name}", None)
        if result.failed:
            self.kick()
        return result

    def registration(self, route: Route) -> Registration | None:
        """The Registered condition of a route, from what the fleet last saw; None while it
        cannot know (after a restart, before the first full resync): keep what status says,
        rather than flap a Ready target to Pending and back."""
        if not self.urls:
            return Registration(False, "NoRelayReplicas",
                                "no relay replica is known: check that the relay pods run "
                                "(--relay-service) or that --relay-url is right")
        failing = sorted(u for u in self.failures if u in self.urls)
        if failing:
            return Registration(False, "RelayUnavailable",
                                f"{len(failing)} of {len(self.urls)} relay replicas did not "
                                f"answer ({self.failures[failing[0]]}); the operator retries at "
                                "every resync")
        if self.confirmed.get(route.key) != route:
            if not self.synced_once.is_set():
                return None
            return Registration(False, "NotRegistered", "waiting for the next resync")
        return Registration(True, "Registered",
                            f"route {route.address} served by {len(self.urls)} relay "
                            f"replica{'s' if len(self.urls) != 1 else ''}")

    async def sync_replica(self, url: str, desired: list[Route], revision: str,
                           only_if_unsynced: bool = False) -> bool:
        """Make one replica hold exactly `desired`; sends the table only when revisions differ."""
        client = self._client(url)
        try:
            snapshot = await client.get_summary()
            self._sessions[url] = snapshot.sessions
            self._viewers[url] = snapshot.viewers
            if only_if_unsynced and snapshot.synced:
                return False
            if snapshot.revision != revision or not snapshot.synced:
                logger.info("relay %s holds %d routes (revision %s…), want %d (%s…): replacing "
                            "its table", url, snapshot.route_count, snapshot.revision[:12],
                            len(desired), revision[:12])
                got = await client.replace_table(desired)
                if got != revision:
                    logger.warning("relay %s reports revision %s… after the resync, expected "
                                   "%s…: are the relay and operator versions compatible?",
                                   url, got[:12], revision[:12])
        except RelayError as exc:
            self.failures[url] = str(exc)
            logger.warning("resync of relay %s failed: %s", url, exc)
            return False
        self.failures.pop(url, None)
        return True

    async def sync_all(self, desired: list[Route], only_if_unsynced: bool = False) -> bool:
        """Resync every replica concurrently; True if every one now holds `desired`."""
        revision = table_revision(desired)
        urls = sorted(self.urls)
        results = await asyncio.gather(*(self.sync_replica(u, desired, revision, only_if_unsynced)
                                         for u in urls))
        if urls and all(results):
            self.confirmed = {route.key: route for route in desired}
            self.synced_once.set()
            return True
        return False

    async def run_resync(self, desired: Callable[[], list[Route]], interval: float,
                         startup_grace: float) -> None:
        """The anti-entropy loop: every `interval` (or on a kick), every replica converges.

        Until kopf's indexes are complete, the loop only fills replicas that never had a table
        (after `startup_grace`), so that an operator with nothing to watch still lets fresh
        relays turn ready, while a relay that holds routes is never shrunk by a partial view.
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.views_ready.wait(), timeout=startup_grace)
        while True:
            self._kick.clear()
            try:
                await self.sync_all(desired(), only_if_unsynced=not self.views_ready.is_set())
            except Exception:  # the loop must outlive any one bad pass
                logger.exception("resync pass failed; retrying in %gs", interval)
            wakers = [asyncio.ensure_future(self._kick.wait())]
            if not self.views_ready.is_set():
                wakers.append(asyncio.ensure_future(self.views_ready.wait()))
            try:
                await asyncio.wait(wakers, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waker in wakers:
                    waker.cancel()
