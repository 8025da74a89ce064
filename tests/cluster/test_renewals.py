"""One renewal of an OpenID sign-in at a time across relay replicas, on the real API server.

A provider that rotates refresh tokens and detects their reuse (oidc-provider's
`rotateRefreshToken`, Auth0's, Dex's) ends the whole sign-in when a refresh token is spent twice.
Two replicas that each hold a console of one sign-in renew it at the same moment, with the same
refresh token from the same cookie; the relay's `KubeRenewalLedger` (a Lease per sign-in) lets one
of them spend it and hands its result to the other.

The ledger's own tests stand the provider in with `SingleUseTokens`, which keeps the one rule
that matters (a refresh token works once; using it again is refused); the last test is the whole
relay twice over, with the real oidc-provider, a real Xvnc and the real kube-apiserver.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest

from harness.cluster import ControlPlane, free_port
from harness.waiting import eventually
from harness.xvnc import XvncServer
from tests.conftest import RelayFactory
from tests.relay.test_auth import write_kubeconfig
from tests.relay.test_oidc_refresh import (
    Lab,
    browser_like,  # noqa: F401 - a fixture
    lab_factory,  # noqa: F401 - a fixture
    open_console,
    payload,
    relay_options,
    renewed_until,
    screen_arrives,
    sign_in,
    status_with,
)
from vncgate.common.addresses import Address
from vncgate.common.kube import KubeClient, kube_connection
from vncgate.relay.access.oidc import OidcRefused, RefreshGrant, SignedInPerson
from vncgate.relay.replicas import (
    ANNOTATION_EXPIRES,
    ANNOTATION_RENEWING,
    KIND_RENEWAL,
    KubeMarks,
    KubeRenewalLedger,
    mark_name,
)
from vncgate.relay.session.consoles import LABEL_KIND

NAMESPACE = "vncgate-renewals"
KEY = b"s" * 32


class SingleUseTokens:
    """A provider's token endpoint as far as refresh tokens go: each works once, and a new one
    comes with every renewal. `asked` is every refresh token it was sent, in order."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.spent: set[str] = set()
        self.asked: list[str] = []
        self.asked_at: list[float] = []

    async def ask(self, grant: RefreshGrant) -> tuple[SignedInPerson, RefreshGrant]:
        self.asked.append(grant.refresh_token)
        self.asked_at.append(time.time())
        # A provider takes a while: the other replica looks at the Lease meanwhile.
        await asyncio.sleep(0.3)
        if grant.refresh_token in self.spent:
            raise OidcRefused("invalid_grant: the refresh token was used before")
        self.spent.add(grant.refresh_token)
        person = SignedInPerson(user="alice@example.test", groups=("oidc:devs",),
                                expires=time.time() + self.ttl, subject="alice")
        return person, RefreshGrant(f"rt-{len(self.spent)}", "alice")


@pytest.fixture
def leases(control_plane: ControlPlane) -> ControlPlane:
    if control_plane.kubectl("get", "namespace", NAMESPACE, check=False).returncode != 0:
        control_plane.kubectl("create", "namespace", NAMESPACE)
    return control_plane


@pytest.fixture
async def ledgers(leases: ControlPlane) -> AsyncIterator[Callable[..., KubeRenewalLedger]]:
    """`ledgers(identity)`: a replica's ledger on the real API server, with the shared key."""
    clients: list[KubeClient] = []

    def make(identity: str, key: bytes = KEY, **timing: float) -> KubeRenewalLedger:
        client = KubeClient(kube_connection(leases.admin_kubeconfig))
        clients.append(client)
        return KubeRenewalLedger(KubeMarks(client, NAMESPACE, identity), key, **timing)

    yield make
    for client in clients:
        await client.close()


def a_sign_in() -> str:
    return f"sid-{time.monotonic_ns()}"


async def test_two_replicas_spend_a_refresh_token_once_and_share_the_result(
        ledgers: Callable[..., KubeRenewalLedger]) -> None:
    provider = SingleUseTokens(ttl=600)
    a, b = ledgers("relay-a"), ledgers("relay-b")
    sid, first = a_sign_in(), RefreshGrant("rt-0", "alice")
    ends = time.time() + 3600
    (person_a, grant_a), (person_b, grant_b) = await asyncio.gather(
        a.spend(sid, first, ends, provider.ask), b.spend(sid, first, ends, provider.ask))
    assert provider.asked == ["rt-0"]
    assert (person_a, grant_a) == (person_b, grant_b)
    assert grant_a.refresh_token == "rt-1"
    # A cookie still holding the spent token, on a third replica: the newest renewal, no spend.
    person_c, grant_c = await ledgers("relay-c").spend(sid, first, ends, provider.ask)
    assert (person_c, grant_c) == (person_a, grant_a) and provider.asked == ["rt-0"]


async def test_an_expired_renewal_is_renewed_with_the_newest_refresh_token(
        ledgers: Callable[..., KubeRenewalLedger]) -> None:
    provider = SingleUseTokens(ttl=1)
    a, b = ledgers("relay-a"), ledgers("relay-b")
    sid, first = a_sign_in(), RefreshGrant("rt-0", "alice")
    ends = time.time() + 3600
    person, _ = await a.spend(sid, first, ends, provider.ask)
    while time.time() <= person.expires:  # bounded: the ID token lasts a second
        await asyncio.sleep(0.1)
    # Replica b still has the first token (from the cookie): the ledger spends the newest.
    renewed, grant = await b.spend(sid, first, ends, provider.ask)
    assert provider.asked == ["rt-0", "rt-1"]
    assert grant.refresh_token == "rt-2" and renewed.expires > person.expires


async def test_a_renewal_sealed_with_another_key_is_not_believed(
        ledgers: Callable[..., KubeRenewalLedger]) -> None:
    """What the Lease holds opens only with the replicas' session key: a writer of Leases
    without it cannot hand a replica a person or a refresh token."""
    provider = SingleUseTokens(ttl=600)
    sid, first = a_sign_in(), RefreshGrant("rt-0", "alice")
    ends = time.time() + 3600
    await ledgers("relay-a").spend(sid, first, ends, provider.ask)
    stranger = ledgers("relay-x", key=b"k" * 32)
    with pytest.raises(OidcRefused):
        await stranger.spend(sid, first, ends, provider.ask)
    assert provider.asked == ["rt-0", "rt-0"]


async def test_a_turn_left_by_a_replica_that_died_is_taken_when_it_runs_out(
        leases: ControlPlane, ledgers: Callable[..., KubeRenewalLedger]) -> None:
    provider = SingleUseTokens(ttl=600)
    sid = a_sign_in()
    until = int(time.time()) + 3
    leases.apply([{"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                   "metadata": {"name": mark_name(KIND_RENEWAL, sid), "namespace": NAMESPACE,
                                "labels": {LABEL_KIND: KIND_RENEWAL},
                                "annotations": {ANNOTATION_RENEWING: str(until),
                                                ANNOTATION_EXPIRES: str(until + 3600)}},
                   "spec": {"holderIdentity": "relay-gone", "leaseDurationSeconds": 30}}])
    _, grant = await ledgers("relay-b").spend(sid, RefreshGrant("rt-0", "alice"),
                                              time.time() + 3600, provider.ask)
    assert grant.refresh_token == "rt-1" and provider.asked == ["rt-0"]
    assert provider.asked_at[0] >= until  # it waited for the dead replica's turn to end


async def test_without_the_api_server_a_replica_renews_on_its_own(tmp_path: Path) -> None:
    provider = SingleUseTokens(ttl=600)
    config = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{free_port()}")
    client = KubeClient(kube_connection(config))
    try:
        ledger = KubeRenewalLedger(KubeMarks(client, NAMESPACE, "relay-a"), KEY)
        _, grant = await ledger.spend(a_sign_in(), RefreshGrant("rt-0", "alice"),
                                      time.time() + 3600, provider.ask)
    finally:
        await client.close()
    assert grant.refresh_token == "rt-1" and provider.asked == ["rt-0"]


@pytest.mark.timeout(300)  # two renewals of the real provider's ID tokens, on a loaded machine
async def test_two_relays_keep_a_sign_in_whose_refresh_tokens_are_single_use(
        leases: ControlPlane, make_relay: RelayFactory, xvnc: XvncServer,
        lab_factory: Callable[..., Lab],  # noqa: F811 - the fixture imported above
        browser_like: aiohttp.ClientSession,  # noqa: F811
        ) -> None:
    """The real provider rotates refresh tokens and revokes the sign-in's grant when one is
    used twice. Each relay holds a console of the sign-in and renews it when its ID token
    expires, at the same moment: both consoles stay open through two renewals, and the cookie
    (holding the first refresh token) still works on either relay."""
    lab = lab_factory(refresh=True, rotate=True)
    options = relay_options(lab, xvnc)
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(make_relay(
            **options, kubeconfig=leases.admin_kubeconfig, lease_namespace=NAMESPACE,
            identity="relay-a"))
        b = await stack.enter_async_context(make_relay(
            **{**options, "listen": Address("127.0.0.1", free_port())},
            kubeconfig=leases.admin_kubeconfig, lease_namespace=NAMESPACE, identity="relay-b"))
        cookie = await sign_in(browser_like, a)
        first_expiry, sid = payload(cookie)["ie"], payload(cookie)["sid"]
        console_a, console_b = await open_console(browser_like, a), \
            await open_console(browser_like, b)

        def renewed_past(expiry: float) -> bool:
            for replica in (a, b):  # a refused renewal ends the sign-in: fail at once
                assert sid not in replica.state.revocations, "the provider ended the sign-in"
            return all(renewed_until(replica, sid) > expiry for replica in (a, b))

        await eventually(lambda: renewed_past(first_expiry),
                         "both relays to renew the consoles' sign-in", timeout=120)
        second_expiry = max(renewed_until(a, sid), renewed_until(b, sid))
        await eventually(lambda: renewed_past(second_expiry), "both relays to renew it again",
                         timeout=120)
        await screen_arrives(console_a)
        await screen_arrives(console_b)
        for replica in (a, b):
            answer = await status_with(browser_like, replica, cookie)
            assert answer.status == 200, answer.headers.get("Location")
