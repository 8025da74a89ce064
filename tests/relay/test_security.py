"""The findings of a hostile review of the relay, each reproduced against the real relay.

One test (or a few) per finding; docs/SECURITY.md names them. The RFB tests use a real Xvnc
and read its pointer with python-xlib, as tests/relay/test_sessions.py does.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import logging
import struct
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from harness.servers import GREETING, TcpServer, echo_rfb
from harness.waiting import eventually
from harness.xvnc import XvncServer
from tests.conftest import API_TOKEN, RelayFactory, relay_settings
from tests.relay.test_auth import (
    ALICE_PASSWORD,
    BOB_TOKEN,
    KEY,
    USERS,
    csrf_from,
    exchange,
    jar_session,
    open_console,
    sign_in,
    targets,
)
from tests.relay.test_sessions import pointer_position
from tests.support.rfbclient import WsStream
from vncgate.common.addresses import Address
from vncgate.common.model import Route
from vncgate.common.spec import Access
from vncgate.relay import closecodes
from vncgate.relay.access import links
from vncgate.relay.access.cookies import SESSION_COOKIE, session_cookie
from vncgate.relay.access.identity import AuthMode
from vncgate.relay.access.passwords import dummy_hash
from vncgate.relay.access.proxies import parse_networks
from vncgate.relay.access.users import User
from vncgate.relay.settings import AuthSettings, host_names
from vncgate.relay.web.server import RelayServer

# --- 1. the view-only filter reads the RFB stream exactly as the server does -----------------


async def rfb_session(relay: RelayServer, target: str, version: bytes
                      ) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse,
                                 WsStream]:
    """A raw client through the relay: greeting read, `version` sent, nothing else yet."""
    http = aiohttp.ClientSession()
    ws = await http.ws_connect(f"{relay.public_url}/t/lab/{target}/websockify")
    stream = WsStream(ws)
    assert await stream.read(12) == b"RFB 003.008\n"
    await ws.send_bytes(version)
    return http, ws, stream


async def handshake_and_point(relay: RelayServer, target: str, version: bytes,
                              x: int, y: int) -> None:
    """A well-formed session at `version` (3.3, 3.7 or 3.8) that moves the pointer to x, y."""
    http, ws, stream = await rfb_session(relay, target, version)
    async with http, ws:
        if version == b"RFB 003.003\n":  # the server picks the type: None
            assert await stream.read(4) == b"\x00\x00\x00\x01"
        else:
            (count,) = await stream.read(1)
            await stream.read(count)
            await ws.send_bytes(b"\x01")
            if version == b"RFB 003.008\n":
                assert await stream.read(4) == bytes(4)
        await ws.send_bytes(b"\x01")  # ClientInit
        await stream.read(20)
        (name_length,) = struct.unpack("!I", await stream.read(4))
        await stream.read(name_length)
        await ws.send_bytes(struct.pack("!BBHH", 5, 0, x, y))
        # The server answers this only after it handled the pointer event before it.
        await ws.send_bytes(struct.pack("!BBHHHH", 3, 0, 0, 0, 1, 1))
        (message_type,) = await stream.read(1)
        assert message_type == 0


async def smuggle_pointer(ws: aiohttp.ClientWebSocketResponse, first: bytes, x: int) -> None:
    """The reviewer's attack, after a version the server reads as 3.3 and a loose filter as
    3.8: the filter takes the ClientInit for the security choice and stays one byte behind.
    The server then reads SetEncodings (one) and a PointerEvent to (x, 2), where the filter sees
    FramebufferUpdateRequests only."""
    stream = WsStream(ws)
    stream.buffer = first
    assert await stream.read(4) == b"\x00\x00\x00\x01"  # RFB 3.3: the server chose None
    hi, lo = divmod(x, 256)
    assert lo == 3, "the pointer's low x byte doubles as the filter's next message type"
    await ws.send_bytes(b"\x01" + bytes([2, 3, 0, 1, 0, 0, 0, 0, 5, 0, hi, 3, 0, 2]))
    await stream.read(20)
    (name_length,) = struct.unpack("!I", await stream.read(4))
    await stream.read(name_length)
    # A FramebufferUpdateRequest answered after the pointer; its width's low byte (3) keeps
    # the loose filter reading update requests rather than failing.
    await ws.send_bytes(struct.pack("!BBHHHH", 3, 0, 0, 0, 3, 1))
    (message_type,) = await stream.read(1)
    assert message_type == 0


@pytest.mark.parametrize("version", [
    b"RFB 003.3  \n",  # the reviewer's spelling: trailing spaces, read as 3.3 by Xvnc
    b"RFB 003.8  \n",
    b"RFB 3.3    \n",
    b"RFB 003.889\n",  # Apple's: its own security types, which the relay cannot follow
    b"RFB 004.000\n",
    b"RFB 003.008\r",
])
async def test_view_only_refuses_any_but_the_exact_protocol_versions(
        make_relay: RelayFactory, xvnc: XvncServer, version: bytes) -> None:
    routes = [Route("lab", "watch", "127.0.0.1", xvnc.port, view_only=True),
              Route("lab", "drive", "127.0.0.1", xvnc.port)]
    async with make_relay(routes=routes) as relay:
        await handshake_and_point(relay, "drive", b"RFB 003.008\n", 40, 40)
        assert pointer_position(xvnc) == (40, 40)
        http, ws, _ = await rfb_session(relay, "watch", version)
        async with http, ws:
            msg = await ws.receive(timeout=5)
            if msg.type is aiohttp.WSMsgType.BINARY:  # the relay let the version through
                await smuggle_pointer(ws, msg.data, 259)
            assert pointer_position(xvnc) == (40, 40), "input passed the view-only filter"
            assert msg.type is aiohttp.WSMsgType.CLOSE
            assert msg.data == closecodes.UNSUPPORTED_DATA
            assert "accepts exactly 'RFB 003.003', 'RFB 003.007' or 'RFB 003.008'" in msg.extra


@pytest.mark.parametrize("version", [b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.008\n"])
async def test_view_only_follows_each_exact_version_and_drops_the_pointer(
        make_relay: RelayFactory, xvnc: XvncServer, version: bytes) -> None:
    routes = [Route("lab", "watch", "127.0.0.1", xvnc.port, view_only=True),
              Route("lab", "drive", "127.0.0.1", xvnc.port)]
    async with make_relay(routes=routes) as relay:
        await handshake_and_point(relay, "drive", version, 60, 61)
        assert pointer_position(xvnc) == (60, 61)  # this version's handshake moves it
        await handshake_and_point(relay, "watch", version, 300, 200)
        assert pointer_position(xvnc) == (60, 61)  # dropped; the server answered after it


# --- shared pieces for the sign-in findings ---------------------------------------------------

TOKEN_AUTH = AuthSettings(mode=AuthMode.TOKEN, users=USERS, session_secret=b"s" * 32,
                          link_keys=(KEY,), trusted_proxies=parse_networks(["127.0.0.1/32"], "t"))


@pytest.fixture
async def relay(make_relay: RelayFactory, backend: TcpServer) -> AsyncIterator[RelayServer]:
    async with make_relay(routes=targets(backend.port), auth=TOKEN_AUTH) as server:
        yield server


def bearer(token: str, client: str = "") -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if client:  # the relay trusts 127.0.0.1 as a proxy here: this is the client's address
        headers["X-Forwarded-For"] = client
    return headers


# --- 2. bearer tokens: limited, audited, derived off the event loop ---------------------------

async def test_bad_bearer_tokens_are_rate_limited_and_audited(
        relay: RelayServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vncgate.audit")
    async with aiohttp.ClientSession() as http:
        for attempt in range(5):
            async with http.get(f"{relay.public_url}/", allow_redirects=False,
                                headers=bearer(f"guess-{attempt}", "192.0.2.7")) as resp:
                assert resp.status == 302  # not signed in: to the login page
        async with http.get(f"{relay.public_url}/",
                            headers=bearer("guess-5", "192.0.2.7")) as resp:
            assert resp.status == 429 and int(resp.headers["Retry-After"]) > 0
        async with http.get(f"{relay.public_url}/",  # a good token is never refused
                            headers=bearer(BOB_TOKEN, "192.0.2.7")) as resp:
            assert resp.status == 200
        code, reason = await open_console(http, relay, "open",
                                          headers=bearer("another", "192.0.2.7"))
        assert code == closecodes.TOO_MANY_REQUESTS and "try again in" in reason
        async with http.get(f"{relay.public_url}/",  # another address is not limited
                            headers=bearer(BOB_TOKEN, "192.0.2.8")) as resp:
            assert resp.status == 200
    events = [r.fields for r in caplog.records if r.name == "vncgate.audit"]  # type: ignore[attr-defined]
    bearer_events = [(e["client"], e["result"]) for e in events if e["event"] == "bearer"]
    assert bearer_events.count(("192.0.2.7", "failed")) == 5
    assert ("192.0.2.7", "rate limited") in bearer_events
    assert "guess-0" not in caplog.text and BOB_TOKEN not in caplog.text


async def post_sign_in(http: aiohttp.ClientSession, relay: RelayServer, password: str,
                       client: str) -> int:
    """A sign-in form post from `client` (the relay trusts 127.0.0.1 as its proxy)."""
    csrf = await csrf_from(http, f"{relay.public_url}/login")
    async with http.post(f"{relay.public_url}/login", allow_redirects=False,
                         data={"user": "alice", "password": password, "csrf": csrf},
                         headers={"Origin": "null", "X-Forwarded-For": client}) as resp:
        return resp.status


async def test_key_derivation_never_blocks_the_event_loop(relay: RelayServer) -> None:
    # Hold both derivation threads: sign-ins queue behind them, and the relay still answers
    # /healthz meanwhile (before the fix, each check ran scrypt on the event loop).
    gate = threading.Event()
    derivations = relay.state.derivations
    holders = [asyncio.create_task(derivations.run(gate.wait, 30)) for _ in range(2)]
    async with jar_session() as http:
        guesses = [asyncio.create_task(post_sign_in(http, relay, f"guess-{n}", f"192.0.2.{n}"))
                   for n in range(1, 9)]
        try:
            await eventually(lambda: derivations.pending == 10, "10 derivations pending")
            async with http.get(f"{relay.public_url}/healthz") as resp:
                assert resp.status == 200
            assert not any(g.done() for g in guesses)  # still waiting for a derivation
        finally:
            gate.set()
        assert await asyncio.gather(*guesses) == [401] * 8
    await asyncio.gather(*holders)


async def test_derivations_are_bounded_and_refuse_past_the_bound(relay: RelayServer) -> None:
    gate = threading.Event()
    derivations = relay.state.derivations
    holders = [asyncio.create_task(derivations.run(gate.wait, 30))
               for _ in range(derivations.max_pending)]
    try:
        await eventually(lambda: derivations.pending == derivations.max_pending,
                         "the derivation queue full")
        async with jar_session() as http:
            csrf = await csrf_from(http, f"{relay.public_url}/login")
            async with http.post(f"{relay.public_url}/login",
                                 data={"user": "alice", "password": "a-guess", "csrf": csrf},
                                 headers={"Origin": "null", "X-Forwarded-For": "192.0.2.9"}
                                 ) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    finally:
        gate.set()
    await asyncio.gather(*holders)


# --- 3. --deny-cidr: every spelling of an address --------------------------------------------

@pytest.mark.parametrize(("host", "deny"), [
    ("::ffff:127.0.0.1", ["127.0.0.0/8"]),  # IPv4-mapped: reached the loopback server
    ("::ffff:7f00:1", ["127.0.0.0/8"]),
    ("::127.0.0.1", ["127.0.0.0/8"]),  # IPv4-compatible
    ("127.0.0.1", ["::ffff:127.0.0.0/104"]),  # the range written in the mapped form
    ("0.0.0.0", []),  # "this host": denied always, as is ::
    ("::", []),
])
async def test_denied_addresses_are_denied_in_every_spelling(
        make_relay: RelayFactory, host: str, deny: list[str]) -> None:
    async with TcpServer(echo_rfb) as server, make_relay(
            routes=[Route("lab", "desk", host, server.port)],
            deny_networks=parse_networks(deny, "--deny-cidr")) as relay, \
            aiohttp.ClientSession() as http:
        code, reason = await open_console(http, relay, "desk")
        assert code == closecodes.FORBIDDEN and "which this relay may not reach" in reason
        assert server.connections == 0


# --- 4. a --once link is exchanged once; its token is not a cookie ----------------------------

async def test_once_link_token_presented_as_the_cookie_opens_nothing(relay: RelayServer) -> None:
    token, _ = links.mint(KEY, "lab/open", 600, once=True)
    async with jar_session() as http:
        http.cookie_jar.update_cookies({links.link_cookie("lab/open"): token},
                                       URL(relay.public_url))
        code, _ = await open_console(http, relay, "open")
        assert code == closecodes.UNAUTHENTICATED
        assert (await exchange(http, relay, "open", token))[0] == 200
        assert await open_console(http, relay, "open") == (None, "")  # the exchange's cookie
        assert (await exchange(http, relay, "open", token))[0] == 403  # used


# --- 5. sessions end when their credential expires --------------------------------------------

async def test_a_link_session_ends_when_the_link_expires(relay: RelayServer) -> None:
    token, _ = links.mint(KEY, "lab/open", 2)
    async with jar_session() as http:
        assert (await exchange(http, relay, "open", token))[0] == 200
        async with http.ws_connect(f"{relay.public_url}/t/lab/open/websockify",
                                   origin=relay.public_url) as ws:
            assert await ws.receive_bytes(timeout=5) == GREETING
            msg = await ws.receive(timeout=10)
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, closecodes.FORBIDDEN)
    assert msg.extra == "the share link expired; ask for a new link"


async def test_a_signed_in_session_ends_when_the_sign_in_expires(relay: RelayServer) -> None:
    async with jar_session() as http:
        http.cookie_jar.update_cookies({SESSION_COOKIE: session_cookie(b"s" * 32, "alice", 2)},
                                       URL(relay.public_url))
        async with http.ws_connect(f"{relay.public_url}/t/lab/open/websockify",
                                   origin=relay.public_url) as ws:
            assert await ws.receive_bytes(timeout=5) == GREETING
            msg = await ws.receive(timeout=10)
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, closecodes.UNAUTHENTICATED)
    assert msg.extra == "your sign-in expired; sign in again"


async def test_a_kubernetes_token_session_ends_when_the_token_expires(
        make_relay: RelayFactory, backend: TcpServer, tmp_path: Path) -> None:
    """The session ends at the token's `exp`. The API server here is a stand-in answering
    TokenReviews: a real one issues no ServiceAccount token shorter than 10 minutes
    (tests/cluster/test_kubernetes_tokens.py checks `exp` against a real one)."""
    reviews: list[str] = []

    async def token_review(request: web.Request) -> web.Response:
        reviews.append((await request.json())["spec"]["token"])
        return web.json_response({"status": {"authenticated": True,
                                             "user": {"username": "kate", "groups": []}}})

    app = web.Application()
    app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", token_review)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    config = tmp_path / "kubeconfig"
    config.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "u", "user": {"token": "relay-account"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))

    def jwt(claims: dict[str, Any]) -> str:
        def part(data: dict[str, Any]) -> str:
            return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")
        return f"{part({'alg': 'RS256'})}.{part(claims)}.c2lnbmF0dXJl"

    auth = dataclasses.replace(TOKEN_AUTH, kubernetes_tokens=True)
    try:
        async with make_relay(routes=targets(backend.port), auth=auth, kubeconfig=config
                              ) as relay, aiohttp.ClientSession() as http:
            token = jwt({"sub": "kate", "exp": int(time.time()) + 3})
            async with http.ws_connect(f"{relay.public_url}/t/lab/open/websockify",
                                       origin=relay.public_url,
                                       headers={"Authorization": f"Bearer {token}"}) as ws:
                assert await ws.receive_bytes(timeout=5) == GREETING
                msg = await ws.receive(timeout=15)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, closecodes.UNAUTHENTICATED)
            assert msg.extra == "your Kubernetes token expired; connect again with a new one"
            assert reviews == [token]
            # Authenticated by the API server but already expired: not let in.
            async with http.ws_connect(f"{relay.public_url}/t/lab/open/websockify",
                                       origin=relay.public_url, headers={
                                           "Authorization": f"Bearer {jwt({'exp': 1})}"}) as ws:
                msg = await ws.receive(timeout=5)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, closecodes.UNAUTHENTICATED)
    finally:
        await runner.cleanup()


# --- 6. DNS rebinding: only known Host names --------------------------------------------------

async def test_unknown_host_names_are_refused(make_relay: RelayFactory,
                                              backend: TcpServer) -> None:
    async with make_relay(routes=targets(backend.port), allowed_hosts=("desk.lab.example",),
                          auth=AuthSettings(public_url="https://vnc.example.com")) as relay, \
            aiohttp.ClientSession() as http:
        port = relay.public_url.rpartition(":")[2]
        for host in ("rebound.attacker.example", f"rebound.attacker.example:{port}",
                     "localhost.attacker.example"):
            async with http.get(f"{relay.public_url}/", headers={"Host": host}) as resp:
                assert resp.status == 421 and "--allowed-host" in await resp.text()
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(f"{relay.public_url}/t/lab/open/websockify",
                                      headers={"Host": host, "Origin": f"http://{host}"})
            assert refused.value.status == 421
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]", "vnc.example.com",
                     "DESK.lab.example."):
            async with http.get(f"{relay.public_url}/", headers={"Host": host}) as resp:
                assert resp.status == 200, host
        # Probes and the operator reach pod IPs or any name; health needs no Host check.
        async with http.get(f"{relay.public_url}/healthz",
                            headers={"Host": "rebound.attacker.example"}) as resp:
            assert resp.status == 200


def test_host_names_follow_listen_and_public_url() -> None:
    assert host_names(relay_settings()) == frozenset({"127.0.0.1", "localhost"})
    everywhere = Address("0.0.0.0", 8080)
    assert host_names(relay_settings(listen=everywhere)) is None  # cannot know its names
    named = relay_settings(listen=everywhere,
                           auth=AuthSettings(public_url="https://VNC.example.com/x"))
    assert host_names(named) == frozenset({"vnc.example.com", "localhost"})


# --- 7. signing out revokes the cookie ----------------------------------------------------------

async def test_sign_out_revokes_the_cookie_and_ends_its_sessions(relay: RelayServer) -> None:
    async with jar_session() as http:
        assert (await sign_in(http, relay, "alice", ALICE_PASSWORD)).status == 303
        cookie = http.cookie_jar.filter_cookies(URL(relay.public_url))[SESSION_COOKIE].value
        ws = await http.ws_connect(f"{relay.public_url}/t/lab/open/websockify",
                                   origin=relay.public_url)
        assert await ws.receive_bytes(timeout=5) == GREETING
        csrf = await csrf_from(http, f"{relay.public_url}/")
        async with http.post(f"{relay.public_url}/logout", data={"csrf": csrf},
                             headers={"Origin": relay.public_url},
                             allow_redirects=False) as resp:
            assert resp.status == 303
        msg = await ws.receive(timeout=10)
        assert (msg.data, msg.extra) == (closecodes.UNAUTHENTICATED, "you signed out")
        await ws.close()
    async with aiohttp.ClientSession(cookies={SESSION_COOKIE: cookie}) as replay:
        async with replay.get(f"{relay.public_url}/", allow_redirects=False) as resp:
            assert resp.status == 302 and resp.headers["Location"] == "login"
        assert (await open_console(replay, relay, "open"))[0] == closecodes.UNAUTHENTICATED


# --- 8. one derivation per sign-in, whatever the name ------------------------------------------

async def test_every_failed_sign_in_costs_one_derivation(
        make_relay: RelayFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_scrypt = hashlib.scrypt

    def counting_scrypt(*args: Any, **kwargs: Any) -> bytes:
        calls.append(1)
        return real_scrypt(*args, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", counting_scrypt)
    carol = User("carol", "sha256$" + hashlib.sha256(b"carol-token-0123456789").hexdigest())
    auth = AuthSettings(mode=AuthMode.TOKEN, users={**USERS, "carol": carol},
                        session_secret=b"s" * 32)
    dummy_hash()  # made once per process; not part of any one sign-in
    costs = {}
    async with make_relay(auth=auth) as relay, jar_session() as http:
        for name in ("alice", "nobody", "carol"):  # scrypt entry, unknown, sha256 entry
            before = len(calls)
            assert (await sign_in(http, relay, name, "wrong password!")).status == 401
            costs[name] = len(calls) - before
    assert costs == {"alice": 1, "nobody": 1, "carol": 1}


# --- 9. a sign-in of one's own does not reset the count; a limit per account -------------------

async def test_own_sign_ins_do_not_reset_the_failure_count(relay: RelayServer) -> None:
    async with jar_session() as http:
        for _ in range(4):
            assert (await sign_in(http, relay, "alice", "wrong password!")).status == 401
        assert (await sign_in(http, relay, "alice", ALICE_PASSWORD)).status == 303
        assert (await sign_in(http, relay, "alice", "wrong password!")).status == 401
        # This browser signed in as alice (its device cookie): alice is not kept out of it,
        # but guesses at another account from here are, as from any address over its limit.
        assert (await sign_in(http, relay, "alice", ALICE_PASSWORD)).status == 303
        assert (await sign_in(http, relay, "bob", BOB_TOKEN)).status == 429


async def test_guesses_at_one_account_are_limited_across_addresses(relay: RelayServer) -> None:
    async with jar_session() as http:
        for n in range(10):
            csrf = await csrf_from(http, f"{relay.public_url}/login")
            async with http.post(f"{relay.public_url}/login", allow_redirects=False,
                                 data={"user": "alice", "password": "wrong!", "csrf": csrf},
                                 headers={"Origin": "null",
                                          "X-Forwarded-For": f"198.51.100.{n}"}) as resp:
                assert resp.status == 401
        csrf = await csrf_from(http, f"{relay.public_url}/login")
        async with http.post(f"{relay.public_url}/login", allow_redirects=False,
                             data={"user": "alice", "password": ALICE_PASSWORD, "csrf": csrf},
                             headers={"Origin": "null",
                                      "X-Forwarded-For": "198.51.100.99"}) as resp:
            assert resp.status == 429


# --- 10. slow or idle HTTP clients are cut off --------------------------------------------------

@pytest.mark.parametrize("request_start", [
    b"",  # connects and says nothing
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ",  # headers that never end
    b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded"
    b"\r\nContent-Length: 1000\r\n\r\nuser=",  # a body that never comes
])
async def test_slow_requests_are_closed_after_the_read_timeout(
        make_relay: RelayFactory, request_start: bytes) -> None:
    async with make_relay(auth=TOKEN_AUTH, http_read_timeout=1.0) as relay:
        host, port = relay.public_url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(request_start)
            async with asyncio.timeout(20):  # the relay's default read timeout was an hour
                reply = await reader.read()  # until the relay closes the connection
        finally:
            writer.close()
    assert reply == b"" or reply.startswith(b"HTTP/1.1 408")


# --- 11. proxy headers: once each, prefixed, no system: groups ---------------------------------

def proxy(**overrides: Any) -> AuthSettings:
    return AuthSettings(mode=AuthMode.PROXY, trusted_proxies=parse_networks(["127.0.0.1/32"], "t"),
                        **overrides)


async def test_duplicate_identity_headers_are_refused(make_relay: RelayFactory,
                                                      backend: TcpServer) -> None:
    async with make_relay(routes=targets(backend.port), auth=proxy()) as relay, \
            aiohttp.ClientSession() as http:
        for headers in ([("X-Forwarded-User", "bob"), ("X-Forwarded-User", "alice")],
                        [("X-Forwarded-User", "bob"), ("X-Forwarded-Groups", "lab-admins"),
                         ("X-Forwarded-Groups", "x")]):
            async with http.get(f"{relay.public_url}/", headers=CIMultiDict(headers)) as resp:
                assert resp.status == 400 and "more than once" in await resp.text()
            code, reason = await open_console(http, relay, "bobs", headers=CIMultiDict(headers))
            assert code == 4400 and "more than once" in reason


async def test_proxy_names_get_prefixes_and_system_groups_are_dropped(
        make_relay: RelayFactory, backend: TcpServer) -> None:
    routes = [Route("lab", "masters", "127.0.0.1", backend.port,
                    access=Access(groups=("system:masters",))),
              Route("lab", "prefixed", "127.0.0.1", backend.port,
                    access=Access(users=("sso:alice",), groups=("sso:lab",)))]
    async with aiohttp.ClientSession() as http:
        async with make_relay(routes=routes, auth=proxy()) as relay:
            code, _ = await open_console(http, relay, "masters", headers={
                "X-Forwarded-User": "mallory", "X-Forwarded-Groups": "system:masters"})
            assert code == closecodes.FORBIDDEN
            code, _ = await open_console(http, relay, "masters", headers={
                "X-Forwarded-User": "system:admin"})
            assert code == closecodes.UNAUTHENTICATED
        prefixed = proxy(proxy_user_prefix="sso:", proxy_groups_prefix="sso:")
        async with make_relay(routes=routes, auth=prefixed) as relay:
            assert await open_console(http, relay, "prefixed",
                                      headers={"X-Forwarded-User": "alice"}) == (None, "")
            assert await open_console(http, relay, "prefixed", headers={
                "X-Forwarded-User": "bob", "X-Forwarded-Groups": "lab"}) == (None, "")
            code, _ = await open_console(http, relay, "prefixed",
                                         headers={"X-Forwarded-User": "sso:alice"})
            assert code == closecodes.FORBIDDEN  # sso:sso:alice
        system = proxy(proxy_system_groups=True)
        async with make_relay(routes=routes, auth=system) as relay:
            assert await open_console(http, relay, "masters", headers={
                "X-Forwarded-User": "ops", "X-Forwarded-Groups": "system:masters"}) == (None, "")


# --- 12. smaller: Origin's scheme, bad UTF-8, deep JSON ------------------------------------------

async def test_origin_with_another_scheme_is_foreign(make_relay: RelayFactory,
                                                     backend: TcpServer) -> None:
    async with make_relay(routes=targets(backend.port)) as relay, \
            aiohttp.ClientSession() as http:
        other_scheme = relay.public_url.replace("http://", "https://")
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{relay.public_url}/t/lab/open/websockify",
                                  origin=other_scheme)
        assert refused.value.status == 403
        assert await open_console(http, relay, "open") == (None, "")  # its own origin


async def test_link_exchange_with_bad_utf8_is_refused_not_a_500(relay: RelayServer) -> None:
    async with aiohttp.ClientSession() as http, http.post(
            f"{relay.public_url}/t/lab/open/link", data=b'{"token": "\xff\xfe"}',
            headers={"Origin": "null", "X-Requested-With": "vncgate",
                     "Content-Type": "application/json"}) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"] == "this link is not valid; ask for a new link"


async def test_deeply_nested_json_to_the_api_is_a_400(make_relay: RelayFactory) -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    async with make_relay() as relay, aiohttp.ClientSession() as http:
        for path in ("/api/v1/targets", "/api/v1/targets/lab/desk"):
            async with http.put(f"{relay.internal_url}{path}", data=body,
                                headers={"Authorization": f"Bearer {API_TOKEN}",
                                         "Content-Type": "application/json"}) as resp:
                assert resp.status == 400
                assert "nested too deeply" in (await resp.json())["error"]
