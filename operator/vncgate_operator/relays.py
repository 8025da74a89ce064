"""The relay replicas as one fleet: single-route changes, the full resync, session counts.

Talks to relays only through `vncgate.common.client.RelayClient`. No kopf here: the fleet is given
two views of the cluster's state, `route_of(key)` (the route a target should have now, None if it
should have none: deleted, leaving or invalid) and `desired()` (the whole table), and reads
them at the moment it sends, never before an await. That, and one lock per replica around every
write, is what makes a deleted target unreachable once its deletion is handled:

- a single change (`converge(key)`) looks up the route under the replica's lock and sends a PUT
  or a DELETE: a deletion handled while a full table is on its way waits for that table and then
  removes the route from it;
- a full table is computed under the lock after the replica's summary was read, and sent with
  `If-Match` on the revision that summary reported: if anything else changed the replica in
  between, the relay refuses it (412) and the next pass reads again;
- a deletion that a replica did not confirm stays a tombstone, retried at every pass, until that
  replica confirms (a DELETE, or a full table without it).

Every `poll_interval` the fleet reads each replica's summary (revision, boot id, sessions): a
replica that restarted (new boot id) or holds something else than what the fleet sent it is
resynced at once, so a restarted replica has its routes back within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import aiohttp

from vncgate.common.client import RelayClient, RelayError, TableSnapshot
from vncgate.common.model import LoginOutcome, Route, table_revision, xor_digest
from vncgate.operator.status import Registration

logger = logging.getLogger("vncgate.operator.relays")

RouteOf = Callable[[str], "Route | None"]
Desired = Callable[[], "list[Route]"]


@dataclass(frozen=True, slots=True)
class FanOut:
    """The outcome of one request sent to every replica."""

    replicas: int
    failed: dict[str, str]

    @property
    def all_failed(self) -> bool:
        return self.replicas > 0 and len(self.failed) == self.replicas


class _Replica:
    """What the fleet knows of one replica: the routes it sent and that the replica accepted."""

    def __init__(self, client: RelayClient) -> None:
        self.client = client
        self.lock = asyncio.Lock()
        self.held: dict[str, Route] = {}
        self._revision = bytes(32)  # table_revision(held), kept up to date per change
        self.boot: str | None = None
        self.sessions: dict[str, int] | None = None
        self.viewers: dict[str, list[str]] = {}
        self.logins: dict[str, LoginOutcome] = {}

    @property
    def revision(self) -> str:
        return self._revision.hex()

    def hold(self, route: Route) -> None:
        old = self.held.get(route.key)
        if old == route:
            return
        if old is not None:
            self._revision = xor_digest(self._revision, old.digest())
        self.held[sys.intern(route.key)] = route
        self._revision = xor_digest(self._revision, route.digest())

    def drop(self, key: str) -> None:
        old = self.held.pop(key, None)
        if old is not None:
            self._revision = xor_digest(self._revision, old.digest())

    def hold_exactly(self, routes: Iterable[Route], revision: str) -> None:
        self.held = {sys.intern(route.key): route for route in routes}
        self._revision = bytes.fromhex(revision)

    def forget_all(self) -> None:
        self.held = {}
        self._revision = bytes(32)


class RelayFleet:
    def __init__(self, session: aiohttp.ClientSession, token: str, urls: Iterable[str] = (),
                 timeout: float = 5.0, *, route_of: RouteOf | None = None,
                 desired: Desired | None = None) -> None:
        self._session = session
        self._token = token
        self._timeout = timeout
        self._replicas: dict[str, _Replica] = {}
        self.route_of: RouteOf = route_of or (lambda _key: None)
        self.desired: Desired = desired or list
        self.urls: frozenset[str] = frozenset()
        # Per replica: why the last request failed. Cleared by the next success.
        self.failures: dict[str, str] = {}
        # Deleted targets that some replicas have not confirmed removing yet.
        self.tombstones: dict[str, set[str]] = {}
        # Called (no arguments) when what the replicas hold changed behind the fleet's back
        # (a replica restarted, or came or went): the status of every target may be stale.
        self.on_upheaval: Callable[[], None] = lambda: None
        # Called with a target's key when a replica reports a new login outcome for it.
        self.on_login: Callable[[str], None] = lambda key: None
        # Called with a target whose sessions (count or viewers) changed on a replica.
        self.on_sessions: Callable[[str], None] = lambda key: None
        self._kick = asyncio.Event()
        # Set once kopf's indexes hold every VncTarget and Service: before that, the desired
        # table may be partial, and a full PUT of it would remove live routes from the relays.
        self.views_ready = asyncio.Event()
        self.synced_once = asyncio.Event()
        self.full_passes = 0  # full resync passes finished (a test waits for some)
        self.set_urls(urls)

    # -- the replica set ---------------------------------------------------------------------

    def set_urls(self, urls: Iterable[str]) -> frozenset[str]:
        """Replace the replica set (discovery); returns the replicas that are new."""
        new_urls = frozenset(urls)
        added = new_urls - self.urls
        for gone in self.urls - new_urls:
            self._replicas.pop(gone, None)
            self.failures.pop(gone, None)
            for waiting in self.tombstones.values():
                waiting.discard(gone)
        for url in added:
            self._replicas[url] = _Replica(RelayClient(self._session, url, self._token,
                                                       timeout=self._timeout))
        changed = new_urls != self.urls
        self.urls = new_urls
        if changed:
            self.kick()
        return added

    def kick(self) -> None:
        """Run the full resync now instead of at the end of the interval."""
        self._kick.set()

    def views_complete(self, discovered: Iterable[str] | None = None) -> None:
        """kopf's indexes hold every VncTarget and Service now (a full resync is safe).

        `discovered`: the replicas that discovery (--relay-service) sees now; None with a
        fixed --relay-url set."""
        if discovered is not None:
            before = self.urls
            self.set_urls(discovered)
            if self.urls != before:
                logger.info("relay replicas: %s", ", ".join(sorted(self.urls)) or "none")
        self.views_ready.set()

    # -- what the fleet knows ---------------------------------------------------------------

    def holds(self, route: Route) -> bool:
        """Whether every replica is known to hold exactly this route."""
        return bool(self._replicas) and all(
            replica.held.get(route.key) == route for replica in self._replicas.values())

    def holds_any(self, key: str) -> bool:
        """Whether some replica may hold a route for `key` (or its deletion is unconfirmed)."""
        return key in self.tombstones or any(key in r.held for r in self._replicas.values())

    def sessions(self, key: str) -> int | None:
        """Open sessions over every replica; None until a replica's table was read."""
        read = [r.sessions for r in self._replicas.values() if r.sessions is not None]
        if not read:
            return None
        return sum(table.get(key, 0) for table in read)

    def last_login(self, key: str) -> LoginOutcome | None:
        """The latest login any replica made for `key` (credentials/TLS routes), if any."""
        seen = [r.logins[key] for r in self._replicas.values() if key in r.logins]
        return max(seen, key=lambda outcome: outcome.at) if seen else None

    def viewers(self, key: str) -> str | None:
        """Who is viewing, over every replica: "alice, bob", at most 256 characters; None until
        a replica's table was read."""
        if all(r.sessions is None for r in self._replicas.values()):
            return None
        names = sorted({name for r in self._replicas.values() for name in r.viewers.get(key, [])})
        text = ", ".join(names)
        return text if len(text) <= 256 else text[:250] + ", ..."

    def answering(self) -> list[str]:
        """The replicas whose last request succeeded (every known one, until one fails)."""
        return sorted(u for u in self.urls if u not in self.failures)

    def registration(self, route: Route) -> Registration | None:
        """The Registered condition of a route, from what the fleet last saw; None while it
        cannot know (after a restart, before the first full resync): keep what status says,
        rather than flap a Ready target to Pending and back.

        Judged over the replicas that answer: one replica that stops answering (killed,
        rolled, partitioned) is the fleet's condition (`relays_probe`, the operator's log),
        not every target's: the others serve its viewers, and writing every target Pending and
        back would cost two status writes and two Events per target. The message does not
        count the ones that answer, for the same reason. Only when none answers is the target
        Pending (`RelayUnavailable`)."""
        if not self.urls:
            return Registration(False, "NoRelayReplicas",
                                "no relay replica is known: check that the relay pods run "
                                "(--relay-service) or that --relay-url is right")
        answering = self.answering()
        if not answering:
            first = min(self.urls)
            return Registration(False, "RelayUnavailable",
                                f"none of the {len(self.urls)} relay replicas answered "
                                f"({self.failures[first]}); the operator retries at every "
                                "resync")
        if not all(self._replicas[url].held.get(route.key) == route for url in answering):
            if not self.synced_once.is_set():
                return None
            return Registration(False, "NotRegistered", "waiting for the relays to take the "
                                                        "route (next resync)")
        return Registration(True, "Registered",
                            f"route {route.address} held by every relay replica that answers "
                            f"({len(self.urls)} known)")

    def _shared(self, route: Route, besides: _Replica) -> Route:
        """An equal Route that another replica holds already, else `route`: every route is
        computed anew for each replica (at send time), and without this R replicas would keep R
        copies of every target's route (about 0.4 KiB each, 4 KiB per target at 10 replicas)."""
        for other in self._replicas.values():
            if other is not besides:
                held = other.held.get(route.key)
                if held is not None and held == route:
                    return held
        return route

    # -- single changes ----------------------------------------------------------------------

    async def _converge_one(self, url: str, replica: _Replica, key: str) -> None:
        async with replica.lock:
            route = self.route_of(key)  # at send time, under the lock
            if route is None:
                await replica.client.delete_route(*key.split("/", 1))
                replica.drop(key)
                waiting = self.tombstones.get(key)
                if waiting is not None:
                    waiting.discard(url)
                    if not waiting:
                        del self.tombstones[key]
            else:
                if replica.held.get(key) != route:
                    await replica.client.put_route(route)
                    replica.hold(self._shared(route, replica))
                waiting = self.tombstones.get(key)  # deleted, then created again
                if waiting is not None:
                    waiting.discard(url)
                    if not waiting:
                        del self.tombstones[key]

    async def converge(self, key: str, *, deleted: bool = False) -> FanOut:
        """Make every replica hold what `route_of(key)` says now: the route, or nothing.

        `deleted`: the target is gone; it stays a tombstone until every replica confirmed."""
        if deleted:
            self.tombstones[key] = set(self.urls)
        urls = sorted(self._replicas)
        results = await asyncio.gather(*(self._converge_one(u, self._replicas[u], key)
                                         for u in urls), return_exceptions=True)
        failed: dict[str, str] = {}
        for url, result in zip(urls, results, strict=True):
            if isinstance(result, RelayError):
                failed[url] = str(result)
                self.failures[url] = str(result)
                replica = self._replicas.get(url)
                if replica is not None:
                    replica.drop(key)  # unknown now: the resync compares and repairs
            elif isinstance(result, BaseException):
                raise result
            else:
                self.failures.pop(url, None)
        if failed:
            logger.warning("%s: %s failed on %d of %d relay replicas: %s", key,
                           "DELETE" if deleted else "PUT", len(failed), len(urls),
                           "; ".join(failed.values()))
            self.kick()
        return FanOut(replicas=len(urls), failed=failed)

    async def offer(self, key: str, route: Route | None) -> None:
        """`key` should have `route` now (None: no route, e.g. its spec is invalid).

        After the first full resync a change is sent at once; before it, the resync carries
        it (sending single routes into tables that are about to be replaced is wasted)."""
        if route is not None and self.holds(route):
            return
        if self.synced_once.is_set():
            await self.converge(key)
        elif route is not None:
            self.kick()

    async def remove(self, key: str, *, gone: bool) -> None:
        """Take `key`'s route off every replica: the target is `gone` (deleted), or leaving
        (a deletion timestamp; only if some replica may still hold it)."""
        if not gone and not self.holds_any(key):
            return
        sent = await self.converge(key, deleted=True)
        if gone:
            logger.info("%s: deleted; route removed from %d of %d relay replicas", key,
                        sent.replicas - len(sent.failed), sent.replicas)

    # -- the full resync ----------------------------------------------------------------------

    def _forget_sessions(self, replica: _Replica) -> None:
        """A replica that does not answer holds no sessions that status may count: a dead
        one's viewers are gone, and a live one's come back with its next summary."""
        if replica.sessions is None:
            return
        keys = set(replica.sessions) | set(replica.viewers)
        replica.sessions, replica.viewers = None, {}
        for key in sorted(keys):
            self.on_sessions(key)

    def _note_summary(self, url: str, replica: _Replica, snapshot: TableSnapshot) -> bool:
        """Record sessions and boot id; True if the replica restarted since the last look."""
        before, before_viewers = replica.sessions or {}, replica.viewers
        replica.sessions = snapshot.sessions
        replica.viewers = snapshot.viewers
        # A viewer came or went: its target's status (activeSessions, viewers) is written now,
        # not at the target's next look.
        now = snapshot.sessions or {}
        for key in sorted({key for key in before.keys() | now.keys()
                           if before.get(key) != now.get(key)}
                          | {key for key in before_viewers.keys() | snapshot.viewers.keys()
                             if before_viewers.get(key) != snapshot.viewers.get(key)}):
            self.on_sessions(key)
        if snapshot.logins != replica.logins:
            changed = {key for key in snapshot.logins.keys() | replica.logins.keys()
                       if snapshot.logins.get(key) != replica.logins.get(key)}
            replica.logins = snapshot.logins
            for key in sorted(changed):
                outcome = snapshot.logins.get(key)
                logger.debug("%s: relay %s reports its last login: %s", key, url,
                             outcome.result if outcome is not None else "none")
                self.on_login(key)
        restarted = replica.boot is not None and snapshot.boot != replica.boot
        replica.boot = snapshot.boot
        if restarted:
            logger.warning("relay %s restarted (it holds %d routes): sending its table again",
                           url, snapshot.route_count)
            replica.forget_all()
        return restarted

    async def sync_replica(self, url: str, only_if_unsynced: bool = False) -> bool:
        """Make one replica hold exactly the desired table; sends it only when revisions
        differ. The table is computed after the summary is read, under the replica's lock."""
        replica = self._replicas.get(url)
        if replica is None:
            return False
        try:
            async with replica.lock:
                snapshot = await replica.client.get_summary()
                restarted = self._note_summary(url, replica, snapshot)
                if restarted:
                    self.on_upheaval()
                if only_if_unsynced and snapshot.synced:
                    return False
                desired = self.desired()  # at send time: nothing awaited from here to the PUT
                revision = table_revision(desired)
                if snapshot.revision != revision or not snapshot.synced:
                    logger.info("relay %s holds %d routes (revision %s…), want %d (%s…): "
                                "replacing its table", url, snapshot.route_count,
                                snapshot.revision[:12], len(desired), revision[:12])
                    got = await replica.client.replace_table(desired,
                                                             if_revision=snapshot.revision)
                    if got != revision:
                        logger.warning("relay %s reports revision %s… after the resync, "
                                       "expected %s…: are the relay and operator versions "
                                       "compatible?", url, got[:12], revision[:12])
                replica.hold_exactly((self._shared(route, replica) for route in desired),
                                     revision)
                for key in [k for k, waiting in self.tombstones.items() if url in waiting]:
                    self.tombstones[key].discard(url)
                    if not self.tombstones[key]:
                        del self.tombstones[key]
        except RelayError as exc:
            self.failures[url] = str(exc)
            if exc.status == 412:
                logger.info("relay %s changed while its table was computed; reading it again",
                            url)
                self.kick()
            else:
                logger.warning("resync of relay %s failed: %s", url, exc)
                self._forget_sessions(replica)
            return False
        self.failures.pop(url, None)
        return True

    async def sync_all(self, only_if_unsynced: bool = False) -> bool:
        """Resync every replica concurrently; True if every one now holds the desired table."""
        urls = sorted(self.urls)
        results = await asyncio.gather(*(self.sync_replica(u, only_if_unsynced) for u in urls))
        self.full_passes += 1
        if urls and all(results):
            if not self.synced_once.is_set():
                self.synced_once.set()
                self.on_upheaval()  # statuses that waited for the first pass
            return True
        return False

    async def poll(self) -> None:
        """Read every replica's summary: sessions for status; a replica that restarted or holds
        something else than the fleet sent it is resynced now."""
        async def one(url: str, replica: _Replica) -> None:
            try:
                snapshot = await replica.client.get_summary()
            except RelayError as exc:
                if url not in self.failures:
                    logger.warning("relay %s does not answer: %s", url, exc)
                    self.on_upheaval()
                self.failures[url] = str(exc)
                self._forget_sessions(replica)
                return
            recovered = self.failures.pop(url, None) is not None
            restarted = self._note_summary(url, replica, snapshot)
            if (restarted or recovered or not snapshot.synced
                    or (not replica.lock.locked() and snapshot.revision != replica.revision)):
                self.kick()
            if restarted or recovered:
                self.on_upheaval()

        await asyncio.gather(*(one(u, r) for u, r in list(self._replicas.items())))

    async def run(self, interval: float, poll_interval: float, startup_grace: float) -> None:
        """The anti-entropy loop: a full pass every `interval` (or on a kick), a summary read
        of every replica every `poll_interval`.

        Until kopf's indexes are complete, the loop only fills replicas that never had a table
        (after `startup_grace`), so that an operator with nothing to watch still lets fresh
        relays turn ready, while a relay that holds routes is never shrunk by a partial view.
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.views_ready.wait(), timeout=startup_grace)
        loop = asyncio.get_running_loop()
        next_full = loop.time()
        while True:
            if self._kick.is_set() or loop.time() >= next_full:
                self._kick.clear()
                next_full = loop.time() + interval
                started = time.monotonic()
                try:
                    await self.sync_all(only_if_unsynced=not self.views_ready.is_set())
                except Exception:  # the loop must outlive any one bad pass
                    logger.exception("resync pass failed; retrying in %gs", interval)
                logger.debug("resync pass: %.3fs", time.monotonic() - started)
            else:
                try:
                    await self.poll()
                except Exception:
                    logger.exception("reading the relays' summaries failed")
            wakers = [asyncio.ensure_future(self._kick.wait())]
            if not self.views_ready.is_set():
                wakers.append(asyncio.ensure_future(self.views_ready.wait()))
            try:
                await asyncio.wait(wakers, timeout=min(poll_interval, interval),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waker in wakers:
                    waker.cancel()

