"""What the relay's replicas share, so that several of them behave as one relay.

Each piece of state picks the mechanism its promise needs (docs/ARCHITECTURE.md, "State that
spans replicas", says why):

- A single-use link is used once across every replica and restart: its exchange creates a Lease
  named from the link's id in the relay's namespace; the API server lets exactly one create of a
  name succeed (409 Conflict for every other), and the Lease stays until the link would expire.
  When the API server cannot be asked, the exchange is refused (fail closed).
- A sign-out is refused everywhere and survives restarts: the replica that took it tells every
  peer over the internal port (they close that sign-in's consoles with 4401 at once) and writes
  a Lease per revoked sign-in until its cookie would have expired; every replica reads these at
  start (before it serves) and watches them, which also reaches a replica the broadcast missed.
- `maxViewers` and `interactive: first` are seats held as Leases (relay/session/seats.py), not
  counts. The list page's viewer counts are the sum over the peers; a peer that does not answer
  counts as none (fail open: only what a page shows depends on it). Without Leases
  (`--peer-url` alone) that sum still decides `maxViewers` and `interactive: first`.
- Failed sign-ins, bearer tokens and share links are counted on every replica and summed when
  one is checked: a peer that does not answer refuses the sign-in or the failed credential
  (fail closed), so a limit cannot be escaped by making a replica unreachable.

- An OpenID sign-in is renewed by one replica at a time: a Lease per sign-in holds whose turn
  it is and, sealed with the session key, the newest renewal (the person and the next refresh
  grant), which every other replica that needs it takes instead of spending the same refresh
  token again (`KubeRenewalLedger`). When the API server cannot be asked, the replica renews on
  its own (as without Leases): a double spend can end the sign-in, nothing more.

Standalone (no `--lease-namespace`) the link and revocation stores are this process's memory,
with the same interface; peers (`--peer-url`) still get sign-outs and give counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp

from vncgate.common.kube import KubeClient, KubeError
from vncgate.common.tasks import cancel_and_wait
from vncgate.relay.access.cookies import Revoked, seal, unseal
from vncgate.relay.access.links import LinkGrant, UsedLinks
from vncgate.relay.access.oidc import OidcUnavailable, RefreshGrant, SignedInPerson
from vncgate.relay.access.ratelimit import FailureLimiter, retry_after_ages
from vncgate.relay.access.renewals import AskProvider
from vncgate.relay.session.consoles import LABEL_KIND
from vncgate.relay.session.peers import Peers

log = logging.getLogger("vncgate.replicas")

ANNOTATION_EXPIRES = "vncgate.io/expires"
KIND_LINK = "link"
KIND_SIGNOUT = "signout"
KIND_RENEWAL = "renewal"
# How often each replica deletes the marks whose time has passed (any replica may; a 404 is
# someone else having been first).
COLLECT_SECONDS = 600.0
# A mark outlives what it marks by this much, for clocks a little apart.
CLOCK_SLACK = 60


class SharedStateUnavailable(Exception):
    """The shared store could not be asked; the message says what failed."""


def mark_name(kind: str, value: str) -> str:
    """`vncgate-<kind>-<digest>`: a valid Lease name, whatever `value` holds."""
    return f"vncgate-{kind}-{hashlib.sha256(value.encode()).hexdigest()[:40]}"


def _rfc3339(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def expiry_of(lease: dict[str, Any]) -> float | None:
    notes = (lease.get("metadata") or {}).get("annotations") or {}
    try:
        return float(notes[ANNOTATION_EXPIRES])
    except (KeyError, TypeError, ValueError):
        return None


class KubeMarks:
    """Leases that state a fact until a time: "this link was used", "this sign-in ended".

    Written once each (create; a 409 means the fact was already stated), read at start and
    watched, deleted after their time by whichever replica collects first.
    """

    def __init__(self, client: KubeClient, namespace: str, identity: str) -> None:
        self.client = client
        self.namespace = namespace
        self.identity = identity
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"

    async def create(self, kind: str, name: str, expires: float, now: float | None = None
                     ) -> bool:
        """True if this call stated the fact, False if it was stated before (409).

        SharedStateUnavailable when the API server could not be asked."""
        moment = now if now is not None else time.time()
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": self.namespace,
                             "labels": {LABEL_KIND: kind},
                             "annotations": {ANNOTATION_EXPIRES: str(int(expires))}},
                "spec": {"holderIdentity": self.identity, "acquireTime": _rfc3339(moment),
                         "leaseDurationSeconds": max(1, min(2**31 - 1,
                                                            int(expires - moment)))}}
        return await self.ask("POST", self.path, body, absent=(409,)) is not None

    async def ask(self, method: str, path: str, body: Any = None, *,
                  absent: tuple[int, ...] = ()) -> Any | None:
        """The API server's reply; None for a status in `absent` (a 404 or a lost 409);
        SharedStateUnavailable for any other refusal, or when it could not be reached."""
        try:
            reply = await self.client.request(method, path, body)
        except KubeError as exc:
            if exc.status in absent:
                return None
            raise SharedStateUnavailable(f"the API server refused: {exc}") from None
        except (OSError, TimeoutError, aiohttp.ClientError) as exc:
            raise SharedStateUnavailable(
                f"the API server could not be reached: {type(exc).__name__}") from None
        return reply if reply is not None else {}

    async def list(self, kind: str) -> tuple[list[dict[str, Any]], str]:
        """Every mark of `kind`, and the resourceVersion to watch from."""
        reply = await self.client.request(
            "GET", f"{self.path}?labelSelector={quote(f'{LABEL_KIND}={kind}', safe='')}")
        return list(reply.get("items") or ()), str(
            (reply.get("metadata") or {}).get("resourceVersion") or "")

    def watch_path(self, kind: str, version: str) -> str:
        selector = quote(f"{LABEL_KIND}={kind}", safe="")
        return f"{self.path}?labelSelector={selector}&resourceVersion={quote(version)}"

    async def collect(self, kinds: tuple[str, ...], now: float | None = None) -> int:
        """Delete the marks of `kinds` whose time (and the slack) has passed; how many."""
        moment = now if now is not None else time.time()
        deleted = 0
        for kind in kinds:
            items, _ = await self.list(kind)
            for item in items:
                expires = expiry_of(item)
                if expires is None or expires + CLOCK_SLACK > moment:
                    continue
                name = (item.get("metadata") or {}).get("name", "")
                try:
                    await self.client.request("DELETE", f"{self.path}/{name}")
                    deleted += 1
                except KubeError as exc:
                    if exc.status != 404:
                        raise
        return deleted


class LinkClaims(Protocol):
    async def claim(self, grant: LinkGrant) -> bool:
        """True the first time a single-use link is exchanged, on any replica; False after.
        SharedStateUnavailable when that cannot be known (the exchange is refused)."""
        ...


class LocalLinkClaims:
    """One process: the used links in memory (the standalone relay)."""

    def __init__(self) -> None:
        self.used = UsedLinks()

    async def claim(self, grant: LinkGrant) -> bool:
        return self.used.claim(grant)


class KubeLinkClaims:
    """Across replicas and restarts: a Lease `vncgate-link-<digest of the link id>`."""

    def __init__(self, marks: KubeMarks) -> None:
        self.marks = marks

    async def claim(self, grant: LinkGrant) -> bool:
        if not grant.link_id:
            raise SharedStateUnavailable("this link carries no id")
        return await self.marks.create(KIND_LINK, mark_name(KIND_LINK, grant.link_id),
                                       grant.expires + CLOCK_SLACK)


# Called with a revocation key: close the sessions of that sign-in on this replica.
OnRevoked = Callable[[str], None]
REVOCATIONS_PATH = "/api/v1/revocations"


class Revocations:
    """Sign-outs: known to this replica, told to its peers, and (with Kubernetes) kept as
    Leases that every replica reads at start and watches."""

    def __init__(self, revoked: Revoked, peers: Peers, marks: KubeMarks | None,
                 on_revoked: OnRevoked, retry_seconds: float = 5.0) -> None:
        self.revoked = revoked
        self.peers = peers
        self.marks = marks
        self.on_revoked = on_revoked
        self.retry_seconds = retry_seconds
        self._unwritten: dict[str, float] = {}  # key -> expiry, for the API server
        self._tasks: list[asyncio.Task[None]] = []
        self._version = ""

    def __contains__(self, credential_id: str) -> bool:
        return credential_id in self.revoked

    async def start(self) -> None:
        """Read every revocation kept (before the replica serves: a failure stops the start)."""
        if self.marks is None:
            return
        await self._load()
        self._tasks = [asyncio.create_task(self._watch_loop()),
                       asyncio.create_task(self._upkeep_loop())]

    async def close(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks = []

    async def revoke(self, credential_id: str, expires: float) -> list[str]:
        """End one sign-in everywhere; returns the peers that could not be told (the Lease,
        once written, still reaches them)."""
        key = self.revoked.revoke(credential_id, expires)
        self.on_revoked(key)
        _, missing = await asyncio.gather(self._keep(key, expires), self._tell_peers(key, expires))
        return missing

    def learn(self, key: str, expires: float) -> None:
        """A revocation made on another replica."""
        if expires <= time.time():
            return
        self.revoked.add(key, expires)
        self.on_revoked(key)

    async def _tell_peers(self, key: str, expires: float) -> list[str]:
        _, missing = await self.peers.ask("POST", REVOCATIONS_PATH,
                                          {"key": key, "expires": int(expires)})
        return missing

    async def _keep(self, key: str, expires: float) -> None:
        if self.marks is None:
            return
        try:
            await self.marks.create(KIND_SIGNOUT, f"vncgate-{KIND_SIGNOUT}-{key}",
                                    expires + CLOCK_SLACK)
        except SharedStateUnavailable as exc:
            log.error("could not keep a sign-out in the API server; retrying",
                      extra={"fields": {"error": str(exc)}})
            self._unwritten[key] = expires

    def _learn_lease(self, lease: dict[str, Any]) -> None:
        name = str((lease.get("metadata") or {}).get("name") or "")
        expires = expiry_of(lease)
        prefix = f"vncgate-{KIND_SIGNOUT}-"
        if name.startswith(prefix) and expires is not None:
            key = name.removeprefix(prefix)
            if not self.revoked.has_key(key):
                self.learn(key, expires)

    async def _load(self) -> None:
        assert self.marks is not None
        items, self._version = await self.marks.list(KIND_SIGNOUT)
        for item in items:
            self._learn_lease(item)

    async def _watch_loop(self) -> None:
        assert self.marks is not None
        while True:
            try:
                async for event in self.marks.client.watch(
                        self.marks.watch_path(KIND_SIGNOUT, self._version)):
                    lease = event.get("object") or {}
                    if event.get("type") == "ERROR":  # e.g. 410 Gone: read them all again
                        raise KubeError(int(lease.get("code") or 410), str(lease)[:200])
                    version = (lease.get("metadata") or {}).get("resourceVersion")
                    if version:
                        self._version = str(version)
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        self._learn_lease(lease)
            except (KubeError, OSError, TimeoutError, ValueError, aiohttp.ClientError) as exc:
                log.warning("watching sign-outs failed; reading them again",
                            extra={"fields": {"error": str(exc)}})
                await asyncio.sleep(self.retry_seconds)
                with contextlib.suppress(KubeError, OSError, TimeoutError, ValueError,
                                         aiohttp.ClientError):
                    await self._load()

    async def _upkeep_loop(self) -> None:
        assert self.marks is not None
        collected = time.monotonic()
        while True:
            await asyncio.sleep(self.retry_seconds)
            for key, expires in list(self._unwritten.items()):
                if expires <= time.time():
                    del self._unwritten[key]
                    continue
                try:
                    await self.marks.create(KIND_SIGNOUT, f"vncgate-{KIND_SIGNOUT}-{key}",
                                            expires + CLOCK_SLACK)
                except SharedStateUnavailable:
                    break
                del self._unwritten[key]
            if time.monotonic() - collected > COLLECT_SECONDS:
                collected = time.monotonic()
                try:
                    await self.marks.collect((KIND_LINK, KIND_SIGNOUT, KIND_RENEWAL))
                except (KubeError, OSError, TimeoutError, aiohttp.ClientError) as exc:
                    log.warning("deleting expired link, sign-out and renewal Leases failed",
                                extra={"fields": {"error": str(exc)}})


# The renewal Lease of a sign-in: its newest renewal, sealed, and whose turn it is until when.
ANNOTATION_RENEWAL = "vncgate.io/renewal"
ANNOTATION_RENEWING = "vncgate.io/renewing-until"
# A replica's turn to ask the provider lasts this long (the provider's HTTP timeout is 10 s);
# another replica waits for it at most WAIT, asking the API server every POLL.
RENEWAL_TURN_SECONDS = 30.0
RENEWAL_WAIT_SECONDS = 40.0
RENEWAL_POLL_SECONDS = 0.25
# How many spent refresh tokens (digests) a sign-in's Lease remembers: a replica or a cookie
# holding one of them takes the newest renewal instead of spending it again.
SPENT_KEPT = 64


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class NewestRenewal:
    spent: tuple[str, ...]
    person: SignedInPerson
    grant: RefreshGrant

    def knows(self, grant: RefreshGrant) -> bool:
        """`grant` is this renewal's or one spent before it."""
        return (grant.refresh_token == self.grant.refresh_token
                or token_digest(grant.refresh_token) in self.spent)


class KubeRenewalLedger:
    """Renewals of OpenID sign-ins one at a time across replicas, and their results shared:
    a Lease `vncgate-renewal-<digest of the sign-in's id>` in the relay's namespace.

    A replica that needs a renewal reads the Lease. If the newest renewal recorded there was
    made with its refresh token or a later one and its ID token still holds, it takes that.
    Otherwise it takes the turn (create, or a merge patch carrying the `resourceVersion` it
    read, so that of two replicas one wins and the other reads again), asks the provider with
    the newest refresh token, and records the result sealed with the session key (bound to the
    sign-in: it opens nowhere else, and the browser's cookie seal cannot stand in for it). A turn
    held by another replica is waited for; one not ended within its time is taken over.
    """

    def __init__(self, marks: KubeMarks, key: bytes,
                 turn_seconds: float = RENEWAL_TURN_SECONDS,
                 wait_seconds: float = RENEWAL_WAIT_SECONDS,
                 poll_seconds: float = RENEWAL_POLL_SECONDS) -> None:
        self.marks = marks
        self.key = key
        self.turn_seconds = turn_seconds
        self.wait_seconds = wait_seconds
        self.poll_seconds = poll_seconds

    async def spend(self, sid: str, grant: RefreshGrant, ends: float, ask: AskProvider
                    ) -> tuple[SignedInPerson, RefreshGrant]:
        name = mark_name(KIND_RENEWAL, sid)
        deadline = time.monotonic() + self.wait_seconds
        try:
            for _ in range(int(self.wait_seconds / self.poll_seconds) + 10):
                lease = await self._get(name)
                newest = self._newest(sid, lease)
                if newest is not None and newest.knows(grant):
                    if newest.person.expires > time.time():
                        return newest.person, newest.grant
                    grant = newest.grant
                holder, until = _turn(lease)
                if holder and holder != self.marks.identity and until > time.time():
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(self.poll_seconds)
                    continue
                version = await self._take_turn(name, lease, ends)
                if version is not None:
                    return await self._spend(sid, name, version, newest, grant, ask)
                if time.monotonic() > deadline:
                    break
        except SharedStateUnavailable as exc:
            log.warning("the renewal of a sign-in cannot be shared with the other replicas; "
                        "renewing here alone", extra={"fields": {"error": str(exc)}})
            return await ask(grant)
        raise OidcUnavailable("another relay replica is renewing this sign-in and has not "
                              "finished; try again")

    async def _spend(self, sid: str, name: str, version: str, newest: NewestRenewal | None,
                     grant: RefreshGrant, ask: AskProvider
                     ) -> tuple[SignedInPerson, RefreshGrant]:
        try:
            person, following = await ask(grant)
        except BaseException:
            await self._end_turn(name, version, None)
            raise
        spent = (*(newest.spent if newest is not None else ()),
                 token_digest(grant.refresh_token))[-SPENT_KEPT:]
        record = seal(self.key, f"renewal/{sid}", {
            "spent": list(spent), "grant": following.as_dict(),
            "person": {"u": person.user, "g": list(person.groups), "e": person.expires,
                       "s": person.subject, "n": person.nonce}})
        await self._end_turn(name, version, record)
        return person, following

    def _newest(self, sid: str, lease: dict[str, Any] | None) -> NewestRenewal | None:
        """The renewal recorded on the Lease, if it opens with this key for this sign-in."""
        notes = ((lease or {}).get("metadata") or {}).get("annotations") or {}
        sealed = notes.get(ANNOTATION_RENEWAL)
        opened = unseal(self.key, f"renewal/{sid}", sealed) if isinstance(sealed, str) else None
        if opened is None:
            return None
        try:
            who, grant = opened["person"], RefreshGrant.from_dict(opened["grant"])
            person = SignedInPerson(user=str(who["u"]), groups=tuple(str(g) for g in who["g"]),
                                    expires=float(who["e"]), subject=str(who["s"]),
                                    nonce=str(who["n"]))
            spent = tuple(str(d) for d in opened["spent"])
        except (KeyError, TypeError, ValueError):
            return None
        return NewestRenewal(spent, person, grant) if grant is not None else None

    async def _get(self, name: str) -> dict[str, Any] | None:
        reply = await self.marks.ask("GET", f"{self.marks.path}/{name}", absent=(404,))
        return reply if isinstance(reply, dict) else None

    async def _take_turn(self, name: str, lease: dict[str, Any] | None, ends: float
                         ) -> str | None:
        """This replica's turn: the Lease's new resourceVersion, or None if another replica
        wrote it first (read it again)."""
        now = time.time()
        expires = int(ends + CLOCK_SLACK)
        notes = {ANNOTATION_RENEWING: str(int(now + self.turn_seconds))}
        spec = {"holderIdentity": self.marks.identity, "acquireTime": _rfc3339(now),
                "leaseDurationSeconds": int(self.turn_seconds)}
        if lease is None:
            body: dict[str, Any] = {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": self.marks.namespace,
                             "labels": {LABEL_KIND: KIND_RENEWAL},
                             "annotations": {**notes, ANNOTATION_EXPIRES: str(expires)}},
                "spec": spec}
            method, path = "POST", self.marks.path
        else:
            known = expiry_of(lease) or 0
            body = {"metadata": {"resourceVersion": _resource_version(lease), "annotations": {
                **notes, ANNOTATION_EXPIRES: str(int(max(known, expires)))}}, "spec": spec}
            method, path = "PATCH", f"{self.marks.path}/{name}"
        reply = await self.marks.ask(method, path, body, absent=(404, 409))
        return _resource_version(reply) or None

    async def _end_turn(self, name: str, version: str, record: str | None) -> None:
        """Record the renewal (None: none was made) and end the turn, if the Lease is still
        as this replica wrote it; best effort (a turn not ended runs out)."""
        notes: dict[str, str | None] = {ANNOTATION_RENEWING: None}
        if record is not None:
            notes[ANNOTATION_RENEWAL] = record
        body = {"metadata": {"resourceVersion": version, "annotations": notes}}
        try:
            await self.marks.client.request("PATCH", f"{self.marks.path}/{name}", body)
        except (KubeError, OSError, TimeoutError, aiohttp.ClientError) as exc:
            log.warning("could not record a sign-in's renewal for the other replicas",
                        extra={"fields": {"error": str(exc)[:200]}})


def _resource_version(lease: Any) -> str:
    return str(((lease or {}).get("metadata") or {}).get("resourceVersion") or "")


def _turn(lease: dict[str, Any] | None) -> tuple[str, float]:
    """Which replica is renewing on this Lease, and until when (epoch seconds; 0: none)."""
    if lease is None:
        return "", 0.0
    notes = (lease.get("metadata") or {}).get("annotations") or {}
    try:
        until = float(notes.get(ANNOTATION_RENEWING) or 0)
    except (TypeError, ValueError):
        until = 0.0
    return str((lease.get("spec") or {}).get("holderIdentity") or ""), until


VIEWERS_PATH = "/api/v1/viewers"


class ViewerCounts:
    """The sessions the other replicas hold, asked of them when a count decides something
    (`maxViewers` and `interactive: first` of a relay without Leases: with them, seats).

    A peer that does not answer counts as none (fail open): what a count decides is whether
    one more viewer may watch, or may type, never who may open the console at all.
    """

    def __init__(self, peers: Peers) -> None:
        self.peers = peers

    async def of_target(self, namespace: str, name: str) -> int:
        answers, missing = await self.peers.ask("GET", f"{VIEWERS_PATH}/{namespace}/{name}")
        if missing:
            log.warning("counting viewers without the replicas that did not answer",
                        extra={"fields": {"target": f"{namespace}/{name}", "peers": missing}})
        return sum(_count(answer.body.get("sessions")) for answer in answers
                   if isinstance(answer.body, dict))


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


FAILURES_PATH = "/api/v1/failures"


class SignInLimits:
    """The failed sign-ins of a key (an address, an account, a device), and the failed bearer
    tokens and share links (per address, shared with sign-ins, and overall) counted on every
    replica: each replica keeps its own failures, and the one that checks a sign-in asks every
    peer for the ages of theirs. A peer that does not answer refuses the check (fail closed:
    a limit that a dead or partitioned replica could lift is no limit). A replica whose
    EndpointSlice says it is not ready is not asked: the Service sends it nobody, and a crashed
    one lost its failures with its memory; so a pod in CrashLoopBackOff does not keep everyone
    out.
    """

    def __init__(self, peers: Peers, limiters: dict[str, FailureLimiter]) -> None:
        self.peers = peers
        self.limiters = limiters

    def local_ages(self, checks: dict[str, str]) -> dict[str, list[float]]:
        return {name: self.limiters[name].ages(key) for name, key in checks.items()
                if name in self.limiters}

    async def retry_after(self, checks: dict[str, str]) -> float:
        """Seconds until the sign-in may be tried (0: now); `checks`: limiter name -> key.

        SharedStateUnavailable when a peer could not be asked."""
        ages = self.local_ages(checks)
        if self.peers.enabled:
            answers, missing = await self.peers.ask("POST", FAILURES_PATH, {"checks": checks},
                                                    ready_only=True)
            if missing:
                raise SharedStateUnavailable(
                    "the failed sign-ins on " + ", ".join(missing) + " could not be counted")
            for answer in answers:
                theirs = answer.body.get("ages") if isinstance(answer.body, dict) else None
                for name in ages:
                    values = theirs.get(name) if isinstance(theirs, dict) else None
                    ages[name].extend(float(v) for v in values or ()
                                      if isinstance(v, (int, float)) and not isinstance(v, bool)
                                      and v >= 0)
        return max((retry_after_ages(found, self.limiters[name].limit,
                                     self.limiters[name].window)
                    for name, found in ages.items()), default=0.0)
