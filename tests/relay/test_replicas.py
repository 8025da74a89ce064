"""What the replicas share, where one relay can show it: a single-use link that cannot be
checked is refused (fail closed), a peer's sign-out is learned over the internal port, and the
internal port checks what it is told. Across real replicas and the API server:
tests/cluster/test_replicas.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from kubernetes import client as kubernetes_client
from yarl import URL

from harness.cluster import free_port
from harness.servers import GREETING, TcpServer
from tests.conftest import API_TOKEN, RelayFactory
from tests.relay.test_auth import (
    ALICE_PASSWORD,
    KEY,
    USERS,
    exchange,
    jar_session,
    sign_in,
    targets,
)
from vncgate.common.kube import KubeClient, KubeConnection
from vncgate.common.model import Route
from vncgate.common.spec import Interactive, SessionPolicy
from vncgate.relay import closecodes
from vncgate.relay.access import links
from vncgate.relay.access.cookies import SESSION_COOKIE, read_session_cookie, revocation_key
from vncgate.relay.access.identity import AuthMode
from vncgate.relay.access.ratelimit import retry_after_ages
from vncgate.relay.replicas import KubeLinkClaims, KubeMarks
from vncgate.relay.session.consoles import KubeConsoles
from vncgate.relay.session.peers import peer_urls_from_slice
from vncgate.relay.session.seats import KubeSeats
from vncgate.relay.settings import AuthSettings
from vncgate.relay.web.server import RelayServer

SESSION_KEY = b"s" * 32


@pytest.fixture
async def relay(make_relay: RelayFactory, backend: TcpServer) -> AsyncIterator[RelayServer]:
    auth = AuthSettings(mode=AuthMode.TOKEN, users=USERS, session_secret=SESSION_KEY,
                        link_keys=(KEY,))
    async with make_relay(routes=targets(backend.port), auth=auth) as server:
        yield server


def unreachable_api() -> KubeClient:
    """An API server address where nothing listens: every request fails to connect."""
    return KubeClient(KubeConnection(server=f"http://127.0.0.1:{free_port()}", ssl_context=False,
                                     configuration=kubernetes_client.Configuration()))


async def test_a_single_use_link_that_cannot_be_checked_is_refused(relay: RelayServer) -> None:
    api = unreachable_api()
    relay.state.link_claims = KubeLinkClaims(KubeMarks(api, "vncgate", "relay-0"))
    once, _ = links.mint(KEY, "lab/open", 600, once=True)
    many, _ = links.mint(KEY, "lab/open", 600)
    try:
        async with jar_session() as http:
            status, reply = await exchange(http, relay, "open", once)
            assert status == 503 and "cannot be checked right now" in reply["error"], reply
            assert not http.cookie_jar.filter_cookies(URL(relay.public_url))
            # A link for many uses needs no shared state and still opens the console.
            assert (await exchange(http, relay, "open", many))[0] == 200
    finally:
        await api.close()


async def test_a_peers_sign_out_closes_sessions_here_and_refuses_the_cookie(
        relay: RelayServer) -> None:
    async with jar_session() as http:
        assert (await sign_in(http, relay, "alice", ALICE_PASSWORD)).status == 303
        cookie = http.cookie_jar.filter_cookies(URL(relay.public_url))[SESSION_COOKIE].value
        claim = read_session_cookie(SESSION_KEY, cookie)
        assert claim is not None
        ws = await http.ws_connect(f"{relay.public_url}/t/lab/open/websockify",
                                   origin=relay.public_url)
        assert await ws.receive_bytes(timeout=5) == GREETING
        async with aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {API_TOKEN}"}) as api, api.post(
                f"{relay.internal_url}/api/v1/revocations",
                json={"key": revocation_key(claim.sid), "expires": claim.expires}) as resp:
            assert resp.status == 200, await resp.text()
        closed = await ws.receive(timeout=10)
        assert (closed.data, closed.extra) == (closecodes.UNAUTHENTICATED, "you signed out")
        await ws.close()
        async with http.get(f"{relay.public_url}/", allow_redirects=False) as page:
            assert page.status == 302 and page.headers["Location"] == "login"


async def test_the_internal_port_checks_what_a_peer_says(relay: RelayServer) -> None:
    url = f"{relay.internal_url}/api/v1/revocations"
    async with aiohttp.ClientSession() as anyone, anyone.post(
            url, json={"key": "0" * 40, "expires": 2**31}) as resp:
        assert resp.status == 401
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_TOKEN}"}) as api:
        for body in ({"key": "a cookie id", "expires": 2**31}, {"key": "0" * 40},
                     {"key": "0" * 40, "expires": True}, ["0" * 40]):
            async with api.post(url, json=body) as resp:
                assert resp.status == 400, body
                assert "40 lower-case hex digits" in (await resp.json())["error"]
    assert len(relay.state.revoked) == 0


def test_failures_counted_together_wait_for_the_limit_th_newest() -> None:
    # Ages in seconds, from two replicas; 5 a minute.
    assert retry_after_ages([1.0, 2.0, 3.0, 4.0], 5, 60.0) == 0.0
    assert retry_after_ages([1.0, 2.0, 3.0, 4.0, 50.0], 5, 60.0) == 10.0
    assert retry_after_ages([1.0, 2.0, 3.0, 4.0, 5.0, 59.0], 5, 60.0) == 55.0
    assert retry_after_ages([1.0, 2.0, 3.0, 4.0, 60.0], 5, 60.0) == 0.0  # out of the window


async def test_the_internal_port_gives_failure_ages_and_checks_the_question(
        relay: RelayServer) -> None:
    relay.state.account_failures.failed("user:alice")
    url = f"{relay.internal_url}/api/v1/failures"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_TOKEN}"}) as api:
        async with api.post(url, json={"checks": {"account": "user:alice",
                                                  "login": "127.0.0.9"}}) as resp:
            reply = await resp.json()
        assert len(reply["ages"]["account"]) == 1 and reply["ages"]["login"] == []
        for body in ({"checks": {"cookie": "x"}}, {"checks": {}}, {"checks": {"login": 1}},
                     {"login": "x"}):
            async with api.post(url, json=body) as resp:
                assert resp.status == 400, body
                assert "account, bearer, device, login" in (await resp.json())["error"]


def test_sign_in_counts_leave_out_peers_the_slice_says_are_not_ready() -> None:
    def pod(name: str, address: str, **conditions: bool) -> dict[str, object]:
        return {"addresses": [address], "targetRef": {"kind": "Pod", "name": name},
                **({"conditions": conditions} if conditions else {})}

    body = {"addressType": "IPv4", "ports": [{"name": "internal", "port": 8081}], "endpoints": [
        pod("me", "10.0.0.1", ready=True), pod("b", "10.0.0.2", ready=True),
        pod("c", "10.0.0.3", ready=False), pod("d", "10.0.0.4", terminating=True),
        pod("e", "10.0.0.5")]}
    assert peer_urls_from_slice(body, "me") == [
        "http://10.0.0.2:8081", "http://10.0.0.3:8081", "http://10.0.0.5:8081"]
    assert peer_urls_from_slice(body, "me", ready_only=True) == [
        "http://10.0.0.2:8081", "http://10.0.0.5:8081"]


async def test_a_seat_that_cannot_be_taken_refuses_the_viewer(
        make_relay: RelayFactory, backend: TcpServer) -> None:
    """maxViewers or interactive: first with the API server out of reach: the viewer is
    refused with 4503 (fail closed), not admitted past a limit nobody checked; other consoles
    are not affected."""
    routes = [Route("lab", "limited", "127.0.0.1", backend.port,
                    sessions=SessionPolicy(max_viewers=2)),
              Route("lab", "first", "127.0.0.1", backend.port,
                    sessions=SessionPolicy(interactive=Interactive.FIRST)),
              Route("lab", "open", "127.0.0.1", backend.port)]
    async with make_relay(routes=routes) as relay:
        api = unreachable_api()
        relay.state.admission.seats = KubeSeats(KubeConsoles(api, "vncgate", "relay-0"))
        try:
            async with aiohttp.ClientSession() as http:
                for name in ("limited", "first"):
                    async with http.ws_connect(f"{relay.public_url}/t/lab/{name}/websockify",
                                               origin=relay.public_url) as ws:
                        closed = await ws.receive(timeout=10)
                        assert (closed.data, closed.extra) == (
                            closecodes.OVER_CAPACITY,
                            f"could not check the viewers of lab/{name}; try again in a "
                            "moment"), closed
                async with http.ws_connect(f"{relay.public_url}/t/lab/open/websockify",
                                           origin=relay.public_url) as ws:
                    assert await ws.receive_bytes(timeout=5) == GREETING
            assert relay.state.sessions.count_for("lab/limited") == 0
            assert relay.state.sessions.count_for("lab/first") == 0
        finally:
            await api.close()
