"""Sessions across replicas and the admin API's guards, with relays in the test's event loop.

RBAC itself is decided on a real API server (tests/cluster/test_kubectl_vnc.py); here `--auth
none` lets everyone act, so that what is tested is the fan-out between replicas: a session on
one replica is listed and ended through another, a replica that does not answer is named, and
the API refuses what a browser page could forge.
"""

from __future__ import annotations

import aiohttp
import pytest

from harness.cluster import free_port
from harness.servers import TcpServer
from tests.conftest import API_TOKEN, RelayFactory
from tests.relay.test_auth import csrf_from
from vncgate.common.model import Route
from vncgate.kubectl.relaytoken import RelayTokenError, accepted_audiences
from vncgate.relay import closecodes
from vncgate.relay.access.identity import AuthMode
from vncgate.relay.access.users import User
from vncgate.relay.settings import AuthSettings

GREETING = b"RFB 003.008\n"


async def test_a_session_on_one_replica_is_listed_and_ended_through_another(
        make_relay: RelayFactory, sink_backend: TcpServer, http: aiohttp.ClientSession) -> None:
    route = Route("lab", "desk", "127.0.0.1", sink_backend.port)
    async with make_relay(routes=[route], identity="relay-b") as b:
        dead = f"http://127.0.0.1:{free_port()}"
        async with make_relay(routes=[route], identity="relay-a",
                              peer_urls=(b.internal_url, dead)) as a:
            ws = await http.ws_connect(f"{b.public_url}/t/lab/desk/websockify")
            assert await ws.receive_bytes(timeout=5) == GREETING
            async with http.get(f"{a.public_url}/api/v1/sessions?namespace=lab") as resp:
                body = await resp.json()
            assert resp.status == 200, body
            (session,) = body["sessions"]
            assert (session["namespace"], session["name"], session["replica"],
                    session["viewOnly"]) == ("lab", "desk", "relay-b", False)
            assert body["unreachable"] == [dead]
            # The peers' own endpoint needs the registration token.
            async with http.get(f"{b.internal_url}/api/v1/sessions") as resp:
                assert resp.status == 401
            async with http.get(f"{b.internal_url}/api/v1/sessions", headers={
                    "Authorization": f"Bearer {API_TOKEN}"}) as resp:
                assert (await resp.json())["replica"] == "relay-b"

            async with http.delete(f"{a.public_url}/api/v1/sessions/lab/desk",
                                   params={"session": session["id"]}) as resp:
                assert (await resp.json())["ended"] == 1
            message = await ws.receive(timeout=5)
            assert message.type == aiohttp.WSMsgType.CLOSE
            assert (ws.close_code, message.extra) == (closecodes.CONFLICT, "ended by anonymous")
            async with http.get(f"{a.public_url}/api/v1/sessions") as resp:
                assert (await resp.json())["sessions"] == []

            # Without --session: every session of the target, on both replicas.
            others = [await http.ws_connect(f"{relay.public_url}/t/lab/desk/websockify")
                      for relay in (a, b)]
            for other in others:
                assert await other.receive_bytes(timeout=5) == GREETING
            async with http.delete(f"{a.public_url}/api/v1/sessions/lab/desk") as resp:
                assert (await resp.json())["ended"] == 2
            for other in others:
                assert (await other.receive(timeout=5)).type == aiohttp.WSMsgType.CLOSE
                assert other.close_code == closecodes.CONFLICT


async def test_the_api_takes_a_bearer_token_not_the_sign_in_cookie(
        make_relay: RelayFactory, sink_backend: TcpServer) -> None:
    route = Route("lab", "desk", "127.0.0.1", sink_backend.port)
    secret = "alice-secret-0123456789"  # a token entry: a bearer token, and a sign-in too
    auth = AuthSettings(mode=AuthMode.TOKEN, session_secret=b"s" * 32,
                        users={"alice": User("alice", secret, token=True)})
    # A cookie jar that keeps cookies of IP addresses, as a browser does.
    async with make_relay(routes=[route], auth=auth) as relay, aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        # Nobody: 401 that says what to send.
        async with http.get(f"{relay.public_url}/api/v1/sessions") as resp:
            assert resp.status == 401
            assert "Authorization: Bearer" in (await resp.json())["error"]
        # A signed-in browser's cookie does not count: a foreign page could make it send one.
        csrf = await csrf_from(http, f"{relay.public_url}/login")
        async with http.post(f"{relay.public_url}/login", allow_redirects=False, data={
                "user": "alice", "password": secret, "csrf": csrf}) as resp:
            assert resp.status == 303
        async with http.delete(f"{relay.public_url}/api/v1/sessions/lab/desk") as resp:
            assert resp.status == 401
        # A foreign Origin is refused before anything else.
        async with http.get(f"{relay.public_url}/api/v1/sessions", headers={
                "Origin": "https://evil.example", "Authorization": f"Bearer {secret}"}) as resp:
            assert resp.status == 403 and "foreign Origin" in (await resp.json())["error"]
        # Standalone (spec.access, no RBAC): administering consoles is refused, saying why;
        # listing sessions too, rather than an empty list that looks like "nobody is on".
        async with http.get(f"{relay.public_url}/api/v1/sessions", headers={
                "Authorization": f"Bearer {secret}"}) as resp:
            assert resp.status == 403
            assert "needs Kubernetes RBAC" in (await resp.json())["error"]
        async with http.post(f"{relay.public_url}/api/v1/links/lab/desk", headers={
                "Authorization": f"Bearer {secret}"}, json={"ttl": "10m"}) as resp:
            assert resp.status == 403
            assert "needs Kubernetes RBAC" in (await resp.json())["error"]
        # The list page's form needs the page's CSRF token.
        async with http.post(f"{relay.public_url}/sessions/end", data={
                "namespace": "lab", "name": "desk", "csrf": "forged"}) as resp:
            assert resp.status == 403


async def test_kubectl_vnc_is_told_when_the_relay_takes_no_kubernetes_tokens(
        make_relay: RelayFactory, http: aiohttp.ClientSession) -> None:
    """`GET /api/v1/auth` (no credentials) says which Kubernetes tokens the relay takes; a
    relay without --kubernetes-tokens takes none, and the plugin says so before it sends any
    token. (Audiences, minting and the fallback: tests/cluster/test_kubectl_vnc.py.)"""
    auth = AuthSettings(mode=AuthMode.TOKEN, session_secret=b"s" * 32)
    async with make_relay(auth=auth) as relay:
        async with http.get(f"{relay.public_url}/api/v1/auth") as resp:
            assert resp.status == 200
            assert await resp.json() == {"kubernetesTokens": False, "audiences": []}
        with pytest.raises(RelayTokenError, match=r"takes no Kubernetes tokens \(it runs "
                                                  r"without --kubernetes-tokens"):
            await accepted_audiences(relay.public_url)
        # Where the relay does not answer the question (another server, an old relay): no
        # token is chosen, and the user is told to give one.
        with pytest.raises(RelayTokenError, match=r"does not say which tokens it takes \(GET "
                                                  r"/api/v1/auth: HTTP 401\)"):
            await accepted_audiences(relay.internal_url)
