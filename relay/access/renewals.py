"""Renewing OpenID sign-ins with the provider's refresh tokens, once at a time per sign-in.

A sign-in whose provider issued a refresh token carries it sealed in its cookie
(vncgate.relay.access.cookies.seal). When the ID token's names expire, whichever replica sees
the sign-in next renews it: a request with the cookie (which then gets a new cookie), or the
replica holding one of its open consoles (whose session then lasts as long as the new ID token).
Several of these can want the same renewal at once (a page's parallel requests, two consoles of
one sign-in): on one replica they share one call to the provider, and its result is kept until
the new ID token expires, with the newest refresh token for the next renewal. Across replicas
a `RenewalLedger` (with --lease-namespace: relay.replicas.KubeRenewalLedger, a Lease per
sign-in) lets one replica at a time spend a sign-in's refresh token and hands its result to the
others, so a provider that refuses a refresh token used twice (rotation with reuse detection)
does not end the sign-in. Without a ledger (`--peer-url` alone) two replicas may each renew the
same sign-in once; such providers then need their grace period (docs/SECURITY.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from vncgate.relay.access.oidc import OidcClient, OidcRefused, RefreshGrant, SignedInPerson

# Asks the provider to renew with one grant: the person, and the grant for the next renewal.
AskProvider = Callable[[RefreshGrant], Awaitable[tuple[SignedInPerson, RefreshGrant]]]


class RenewalLedger(Protocol):
    """Renewals of one sign-in taken one at a time across replicas."""

    async def spend(self, sid: str, grant: RefreshGrant, ends: float, ask: AskProvider
                    ) -> tuple[SignedInPerson, RefreshGrant]:
        """The sign-in's newest renewal whose ID token has not expired, if a replica made it
        with `grant` or a later one; else `ask` with the newest grant known, while no other
        replica asks, and the result kept for the others. OidcRefused / OidcUnavailable as
        `ask` raises them, OidcUnavailable too when another replica's renewal does not end."""
        ...


@dataclass(frozen=True)
class _Renewed:
    person: SignedInPerson
    # The refresh token sent for this renewal, and the grant for the next one.
    used: str
    grant: RefreshGrant
    ends: float


class Renewals:
    """One replica's renewals of OpenID sign-ins, by the sign-in's cookie id."""

    def __init__(self, client: OidcClient, max_entries: int = 100_000,
                 ledger: RenewalLedger | None = None) -> None:
        self.client = client
        self.ledger = ledger
        self.max_entries = max_entries
        self._latest: dict[str, _Renewed] = {}
        self._pending: dict[str, asyncio.Task[_Renewed]] = {}

    async def renew(self, sid: str, grant: RefreshGrant, ends: float
                    ) -> tuple[SignedInPerson, RefreshGrant]:
        """The person the sign-in `sid` names now, and the grant to renew it next time.
        OidcRefused: the provider ended the sign-in; OidcUnavailable: it cannot be asked."""
        now = time.time()
        known = self._latest.get(sid)
        if known is not None and known.person.expires > now:
            return known.person, known.grant
        task = self._pending.get(sid)
        if task is None:
            # The newest refresh token this replica holds for the sign-in, unless the caller's
            # is one it has not seen (renewed by another replica since).
            use = grant
            if known is not None and grant.refresh_token in (known.used,
                                                             known.grant.refresh_token):
                use = known.grant
            task = asyncio.ensure_future(self._renew(sid, use, ends))
            self._pending[sid] = task
            task.add_done_callback(lambda done: self._settled(sid, done))
        renewed = await asyncio.shield(task)
        return renewed.person, renewed.grant

    async def _renew(self, sid: str, grant: RefreshGrant, ends: float) -> _Renewed:
        try:
            if self.ledger is not None:
                person, following = await self.ledger.spend(sid, grant, ends, self._ask)
            else:
                person, following = await self._ask(grant)
        except OidcRefused:
            self._latest.pop(sid, None)
            raise
        renewed = _Renewed(person, grant.refresh_token, following, ends)
        self._remember(sid, renewed)
        return renewed

    async def _ask(self, grant: RefreshGrant) -> tuple[SignedInPerson, RefreshGrant]:
        person, following = await self.client.renew(grant)
        if person.expires <= time.time():
            raise OidcRefused("the provider renewed the sign-in with an ID token that has "
                              "already expired (check the clocks)")
        return person, following

    def _settled(self, sid: str, task: asyncio.Task[_Renewed]) -> None:
        if self._pending.get(sid) is task:
            del self._pending[sid]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone

    def _remember(self, sid: str, renewed: _Renewed) -> None:
        if sid not in self._latest and len(self._latest) >= self.max_entries:
            now = time.time()
            self._latest = {k: v for k, v in self._latest.items() if v.ends > now}
            while len(self._latest) >= self.max_entries:  # still full: forget the oldest
                del self._latest[next(iter(self._latest))]
        self._latest[sid] = renewed

    def forget(self, sid: str) -> None:
        """The sign-in ended (signed out, refused): no renewal is kept for it."""
        self._latest.pop(sid, None)

    def __len__(self) -> int:
        return len(self._latest)
