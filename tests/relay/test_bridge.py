"""The WebSocket bridge over real sockets: close codes, subprotocol, Origin, ordering, limits."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.servers import (
    GREETING,
    TcpServer,
    echo_rfb,
    greet_and_close,
    not_vnc,
    silent,
    sink,
)
from harness.waiting import eventually
from tests.conftest import RelayFactory
from vncgate.common.model import Route
from vncgate.relay import closecodes


def route(port: int, name: str = "desk", **kw: object) -> Route:
    return Route("lab", name, "127.0.0.1", port, **kw)  # type: ignore[arg-type]


def ws_url(relay_url: str, name: str = "desk", namespace: str = "lab") -> str:
    return f"{relay_url}/t/{namespace}/{name}/websockify"


async def receive_close(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10
                        ) -> tuple[int | None, str]:
    """Read until the close frame; returns (code, reason)."""
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.CLOSE:
                return msg.data, msg.extra or ""
            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                return ws.close_code, ""


async def test_unknown_target_closes_4404_with_a_reason(make_relay: RelayFactory,
                                                        http: aiohttp.ClientSession) -> None:
    async with make_relay(routes=[]) as relay:
        async with http.ws_connect(ws_url(relay.public_url, "nope"),
                                   protocols=("binary",)) as ws:
            code, reason = await receive_close(ws)
        assert code == closecodes.UNKNOWN_TARGET
        assert "lab/nope" in reason and "kubectl get vnc -n lab" in reason
        # Guessed names add no series to /metrics: they count under empty labels.
        async with http.ws_connect(ws_url(relay.public_url, "guess", "other"),
                                   protocols=("binary",)) as ws:
            assert (await receive_close(ws))[0] == closecodes.UNKNOWN_TARGET
        async with http.get(f"{relay.internal_url}/metrics") as resp:
            exposition = await resp.text()
    ended = {tuple(sorted(sample.labels.items())): sample.value
             for family in text_string_to_metric_families(exposition)
             if family.name == "vncgate_sessions" for sample in family.samples
             if sample.name == "vncgate_sessions_total"}
    assert ended == {(("code", "4404"), ("name", ""), ("namespace", "")): 2.0}, ended


async def test_greeting_is_forwarded_and_bytes_flow_both_ways(
        make_relay: RelayFactory, http: aiohttp.ClientSession) -> None:
    async with TcpServer(echo_rfb) as server, make_relay(routes=[route(server.port)]) as relay, \
            http.ws_connect(ws_url(relay.public_url), protocols=("binary",)) as ws:
        assert ws.protocol == "binary"
        first = await ws.receive_bytes(timeout=5)
        assert first == GREETING
        await ws.send_bytes(b"RFB 003.008\n")
        assert await ws.receive_bytes(timeout=5) == b"RFB 003.008\n"
        payload = bytes(range(256)) * 512
        await ws.send_bytes(payload)
        echoed = b""
        while len(echoed) < len(payload):
            echoed += await ws.receive_bytes(timeout=5)
        assert echoed == payload


async def test_client_without_subprotocol_is_served(make_relay: RelayFactory,
                                                    http: aiohttp.ClientSession) -> None:
    async with TcpServer(echo_rfb) as server, make_relay(routes=[route(server.port)]) as relay, \
            http.ws_connect(ws_url(relay.public_url)) as ws:
        assert ws.protocol is None
        assert await ws.receive_bytes(timeout=5) == GREETING


async def test_bytes_sent_before_the_server_is_up_are_delivered_in_order(
        make_relay: RelayFactory, http: aiohttp.ClientSession) -> None:
    """noVNC may send as soon as the socket opens; nothing may be dropped or reordered."""
    async with TcpServer(sink()) as server, make_relay(routes=[route(server.port)]) as relay, \
            http.ws_connect(ws_url(relay.public_url), protocols=("binary",)) as ws:
        early = [f"message {i};".encode() for i in range(50)]
        for part in early:  # sent without waiting for the greeting
            await ws.send_bytes(part)
        assert await ws.receive_bytes(timeout=5) == GREETING
        expected = b"".join(early)
        await eventually(lambda: len(server.received) >= len(expected), "the early bytes sent")
        assert bytes(server.received) == expected


async def test_non_vnc_server_is_refused_and_none_of_its_bytes_reach_the_browser(
        make_relay: RelayFactory, http: aiohttp.ClientSession) -> None:
    async with TcpServer(not_vnc) as server, make_relay(routes=[route(server.port)]) as relay, \
            http.ws_connect(ws_url(relay.public_url), protocols=("binary",)) as ws:
        await ws.send_bytes(b"SELECT 1;")
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE, f"got {msg.type}: {msg.data!r}"
        assert msg.data == closecodes.BAD_UPSTREAM
        assert "not a VNC server" in msg.extra
    assert b"SELECT" not in server.received  # the relay never forwarded the client's bytes


async def test_closed_port_closes_4502(make_relay: RelayFactory,
                                       http: aiohttp.ClientSession) -> None:
    async with TcpServer(silent) as server:
        port = server.port
    # The server is gone: nothing listens on that port now.
    async with make_relay(routes=[route(port)]) as relay, \
            http.ws_connect(ws_url(relay.public_url), protocols=("binary",)) as ws:
        code, reason = await receive_close(ws)
    assert code == closecodes.BAD_UPSTREAM
    assert "refused the connection" in reason


async def test_silent_server_closes_4504_after_the_connect_timeout(
        make_relay: RelayFactory, http: aiohttp.ClientSession) -> None:
    async with TcpServer(silent) as server, \
            make_relay(routes=[route(server.port)], connect_timeout=0.5) as relay, \
            http.ws_connect(ws_url(relay.public_url), protocols=("binary",)) as ws:
        code, reason = await receive_close(ws)
    assert code == closecodes.UPSTREAM_TIMEOUT
    assert "did not answer within 0.5s" in reason


async def test_unresolvable_host_closes_4502(make_relay: RelayFactory,
                                             http: aiohttp.ClientSession) -> None:
    # .invalid never resolves (RFC 2606), so no packet leaves the machine for it.
    target = Route("lab", "desk", "no-such-host.invalid", 5900)
    async with make_relay(routes=[target]) as relay, \
            http.ws_connect(ws_url(relay.public_url), protocols=("binary",)) as ws:
        code, reason = await receive_close(ws)
    assert code == closecodes.BAD_UPSTREAM
    assert "resolved" in reason or "cannot reach" in reason


async def test_server_closing_ends_the_session_normally(
        make_relay: RelayFactory, http: aiohttp.ClientSession) -> None:
    async with TcpServer(greet_and_close) as server, \
            make_relay(routes=[route(server.port)]) as relay, \
            http.ws_connect(ws_url(relay.public_url), protocols=("binary",)) as ws:
        assert await ws.receive_bytes(timeout=5) == GREETING
        code, reason = await receive_close(ws)
    assert code == closecodes.NORMAL
    assert "VNC server closed" in reason


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1.evil.example"])
async def test_foreign_origin_is_refused_with_403(make_relay: RelayFactory,
                                                  http: aiohttp.ClientSession,
                                                  origin: str) -> None:
    async with TcpServer(echo_rfb) as server, make_relay(routes=[route(server.port)]) as relay:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(ws_url(relay.public_url), origin=origin)
        assert refused.value.status == 403
        assert server.connections == 0  # refused before anything was dialled


async def test_same_origin_and_allowed_origin_are_accepted(make_relay: RelayFactory,
                                                           http: aiohttp.ClientSession) -> None:
    async with TcpServer(echo_rfb) as server, make_relay(
            routes=[route(server.port)],
            allowed_origins=("https://vnc.example.com",)) as relay:
        for origin in (relay.public_url, "https://vnc.example.com", "https://vnc.example.com/"):
            async with http.ws_connect(ws_url(relay.public_url), origin=origin) as ws:
                assert await ws.receive_bytes(timeout=5) == GREETING


async def test_text_messages_are_refused_with_1003(make_relay: RelayFactory,
                                                   http: aiohttp.ClientSession) -> None:
    async with TcpServer(echo_rfb) as server, make_relay(routes=[route(server.port)]) as relay, \
            http.ws_connect(ws_url(relay.public_url), protocols=("binary",)) as ws:
        assert await ws.receive_bytes(timeout=5) == GREETING
        await ws.send_str("UkZCIDAwMy4wMDgK")  # base64: the old websockify protocol
        code, reason = await receive_close(ws)
    assert code == closecodes.UNSUPPORTED_DATA
    assert "binary" in reason


async def test_oversized_message_closes_1009(make_relay: RelayFactory,
                                             http: aiohttp.ClientSession) -> None:
    async with TcpServer(echo_rfb) as server, \
            make_relay(routes=[route(server.port)], max_message_size=1024) as relay, \
            http.ws_connect(ws_url(relay.public_url), protocols=("binary",)) as ws:
        assert await ws.receive_bytes(timeout=5) == GREETING
        await ws.send_bytes(b"x" * 4096)
        code, _ = await receive_close(ws)
    assert code == closecodes.MESSAGE_TOO_BIG
    assert b"x" * 4096 not in server.received


async def test_session_limits_close_4503(make_relay: RelayFactory,
                                         http: aiohttp.ClientSession) -> None:
    async with TcpServer(echo_rfb) as server, make_relay(
            routes=[route(server.port), route(server.port, "other")],
            max_sessions=3, max_sessions_per_target=2) as relay:
        first = await http.ws_connect(ws_url(relay.public_url))
        second = await http.ws_connect(ws_url(relay.public_url))
        for ws in (first, second):
            assert await ws.receive_bytes(timeout=5) == GREETING
        async with http.ws_connect(ws_url(relay.public_url)) as third:
            code, reason = await receive_close(third)
        assert code == closecodes.OVER_CAPACITY and "limit of 2 viewers" in reason
        other = await http.ws_connect(ws_url(relay.public_url, "other"))
        assert await other.receive_bytes(timeout=5) == GREETING
        async with http.ws_connect(ws_url(relay.public_url, "other")) as fourth:
            code, reason = await receive_close(fourth)
        assert code == closecodes.OVER_CAPACITY and "limit of 3 sessions" in reason
        for ws in (first, second, other):
            await ws.close()
        # Limits count open sessions only: closing frees the places.
        await eventually(lambda: relay.state.sessions.count == 0, "the sessions ended")
        async with http.ws_connect(ws_url(relay.public_url)) as again:
            assert await again.receive_bytes(timeout=5) == GREETING


async def test_removing_a_route_closes_its_sessions_4404(make_relay: RelayFactory,
                                                         http: aiohttp.ClientSession) -> None:
    async with TcpServer(echo_rfb) as server, make_relay(routes=[route(server.port)]) as relay, \
            http.ws_connect(ws_url(relay.public_url)) as ws:
        assert await ws.receive_bytes(timeout=5) == GREETING
        relay.registry.delete("lab", "desk")
        code, reason = await receive_close(ws)
    assert code == closecodes.UNKNOWN_TARGET and "removed" in reason


async def test_changing_a_routes_endpoint_asks_viewers_to_reconnect(
        make_relay: RelayFactory, http: aiohttp.ClientSession) -> None:
    async with TcpServer(echo_rfb) as server, TcpServer(echo_rfb) as moved, \
            make_relay(routes=[route(server.port, display_name="A")]) as relay, \
            http.ws_connect(ws_url(relay.public_url)) as ws:
        assert await ws.receive_bytes(timeout=5) == GREETING
        relay.registry.put(route(server.port, display_name="B"))  # cosmetic: session stays
        relay.registry.put(route(moved.port, display_name="B"))
        code, _ = await receive_close(ws)
    assert code == closecodes.SERVICE_RESTART
    assert relay.state.sessions.count == 0


async def test_shutdown_closes_every_session_1001(make_relay: RelayFactory,
                                                  http: aiohttp.ClientSession) -> None:
    async with TcpServer(echo_rfb) as server:
        relay_cm = make_relay(routes=[route(server.port)])
        relay = await relay_cm.__aenter__()
        sockets = [await http.ws_connect(ws_url(relay.public_url)) for _ in range(3)]
        for ws in sockets:
            assert await ws.receive_bytes(timeout=5) == GREETING
        await asyncio.wait_for(relay_cm.__aexit__(None, None, None), timeout=10)
        for ws in sockets:
            code, reason = await receive_close(ws)
            assert code == closecodes.GOING_AWAY and "shutting down" in reason
        async with asyncio.timeout(5):
            await server.closed.wait()
        assert relay.state.sessions.count == 0


async def test_one_log_line_per_session_with_bytes_and_code(
        make_relay: RelayFactory, http: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vncgate.session")
    async with TcpServer(echo_rfb) as server, make_relay(routes=[route(server.port)]) as relay:
        async with http.ws_connect(ws_url(relay.public_url)) as ws:
            assert await ws.receive_bytes(timeout=5) == GREETING
            await ws.send_bytes(b"12345")
            assert await ws.receive_bytes(timeout=5) == b"12345"
        await eventually(lambda: relay.state.sessions.count == 0, "the session ended")
    ends = [r for r in caplog.records if r.getMessage() == "session end"]
    assert len(ends) == 1
    fields = ends[0].fields  # type: ignore[attr-defined]
    assert fields["target"] == "lab/desk"
    assert fields["client"] == "127.0.0.1"
    assert fields["bytes_to_server"] == 5
    assert fields["bytes_to_client"] == len(GREETING) + 5
    assert fields["code"] == closecodes.NORMAL
    assert fields["server_version"] == "RFB 003.008"
    assert json.dumps(fields)  # serialisable for --log-format json


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.1"])
async def test_denied_ranges_are_checked_after_dns_resolution(
        make_relay: RelayFactory, http: aiohttp.ClientSession, host: str) -> None:
    from vncgate.relay.access.proxies import parse_networks

    async with TcpServer(echo_rfb) as server, make_relay(
            routes=[Route("lab", "desk", host, server.port)],
            deny_networks=parse_networks(["127.0.0.0/8", "::1/128"], "t")) as relay, \
            http.ws_connect(ws_url(relay.public_url)) as ws:
        code, reason = await receive_close(ws)
    assert code == closecodes.FORBIDDEN
    assert "which this relay may not reach" in reason
    assert server.connections == 0


@pytest.mark.parametrize(("host", "skips"), [
    ("127.0.0.1", True), ("10.96.0.10", True), ("0.0.0.0", True), ("::1", True), ("::", True),
    ("2001:db8::1", True), ("::ffff:127.0.0.1", True), ("::127.0.0.1", True),
    ("127.1", False), ("0127.0.0.1", False), ("2001:DB8::1", False), ("::ffff:7f00:1", False),
    ("::7f00:1", False), ("fe80::1%lo", False), ("localhost", False), ("", False)])
def test_addresses_skip_the_resolver_only_where_it_would_answer_the_same(
        host: str, skips: bool) -> None:
    """A route's host that is an address is not sent to getaddrinfo (a worker thread): only
    where the resolver would give back exactly that address; other spellings still go to it."""
    import socket

    from vncgate.relay.session.bridge import _literal_address

    literal = _literal_address(host)
    assert (literal is not None) == skips
    if literal is not None:
        resolved = socket.getaddrinfo(host, 5900, type=socket.SOCK_STREAM)
        assert [str(info[4][0]) for info in resolved] == [literal]
