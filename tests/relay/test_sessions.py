"""Session policy in one relay: exclusive and takeover, maxViewers, interactive-first,
idle timeout, max duration, and view-only enforced at the RFB level against a real Xvnc."""

from __future__ import annotations

import asyncio
import struct

import aiohttp
from Xlib import display as xdisplay

from harness.servers import GREETING, TcpServer
from harness.waiting import eventually
from harness.xvnc import XvncServer
from tests.conftest import RelayFactory
from tests.support.rfbclient import viewer_handshake
from vncgate.common.model import Route
from vncgate.common.spec import Interactive, SessionMode, SessionPolicy, Takeover
from vncgate.relay import closecodes
from vncgate.relay.access.identity import AuthMode
from vncgate.relay.access.proxies import parse_networks
from vncgate.relay.settings import AuthSettings
from vncgate.relay.web.server import RelayServer

HANDSHAKE = [b"RFB 003.008\n", b"\x01", b"\x01"]  # version, security None, ClientInit
POINTER = struct.pack("!BBHH", 5, 0, 10, 10)
PROXY = AuthSettings(mode=AuthMode.PROXY, trusted_proxies=parse_networks(["127.0.0.0/8"], "t"))


def as_user(user: str) -> dict[str, str]:
    return {"X-Forwarded-User": user}


async def connect(http: aiohttp.ClientSession, relay: RelayServer, user: str = "alice",
                  takeover: bool = False) -> aiohttp.ClientWebSocketResponse:
    query = "?takeover=1" if takeover else ""
    return await http.ws_connect(f"{relay.public_url}/t/lab/desk/websockify{query}",
                                 headers=as_user(user))


async def closed_with(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10
                      ) -> tuple[int, str]:
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.CLOSE:
                return msg.data, msg.extra
            assert msg.type is aiohttp.WSMsgType.BINARY, msg


def exclusive(takeover: str = "deny") -> SessionPolicy:
    return SessionPolicy(mode=SessionMode.EXCLUSIVE, takeover=Takeover(takeover))


async def test_exclusive_refuses_a_second_viewer_and_says_who_holds_it(
        make_relay: RelayFactory, sink_backend: TcpServer, http: aiohttp.ClientSession) -> None:
    route = Route("lab", "desk", "127.0.0.1", sink_backend.port, sessions=exclusive())
    async with make_relay(routes=[route], auth=PROXY) as relay:
        first = await connect(http, relay, "alice")
        assert await first.receive_bytes(timeout=5) == GREETING
        second = await connect(http, relay, "bob", takeover=True)  # deny: asking does not help
        code, reason = await closed_with(second)
        assert code == closecodes.CONFLICT
        assert reason.startswith("in use by alice since ") and reason.endswith("UTC")
        await first.close()
        # Released at session end.
        await eventually(lambda: relay.state.sessions.count == 0, "the session ended")
        third = await connect(http, relay, "bob")
        assert await third.receive_bytes(timeout=5) == GREETING
        await third.close()


async def test_takeover_closes_the_holder_with_the_takers_name(
        make_relay: RelayFactory, sink_backend: TcpServer, http: aiohttp.ClientSession) -> None:
    route = Route("lab", "desk", "127.0.0.1", sink_backend.port, sessions=exclusive("allow"))
    async with make_relay(routes=[route], auth=PROXY) as relay:
        first = await connect(http, relay, "alice")
        assert await first.receive_bytes(timeout=5) == GREETING
        refused = await connect(http, relay, "bob")
        code, reason = await closed_with(refused)
        assert code == closecodes.CONFLICT and reason.endswith("you may take it over")
        taker = await connect(http, relay, "bob", takeover=True)
        assert await taker.receive_bytes(timeout=5) == GREETING
        code, reason = await closed_with(first)
        assert (code, reason) == (closecodes.CONFLICT, "taken over by bob")
        await taker.close()


async def test_owner_only_lets_the_same_user_take_over(
        make_relay: RelayFactory, sink_backend: TcpServer, http: aiohttp.ClientSession) -> None:
    route = Route("lab", "desk", "127.0.0.1", sink_backend.port, sessions=exclusive("owner-only"))
    async with make_relay(routes=[route], auth=PROXY) as relay:
        first = await connect(http, relay, "alice")
        assert await first.receive_bytes(timeout=5) == GREETING
        code, reason = await closed_with(await connect(http, relay, "bob", takeover=True))
        assert code == closecodes.CONFLICT and "take it over" not in reason
        again = await connect(http, relay, "alice", takeover=True)  # her own other tab
        assert await again.receive_bytes(timeout=5) == GREETING
        assert (await closed_with(first))[0] == closecodes.CONFLICT
        await again.close()


async def test_shared_max_viewers(make_relay: RelayFactory, sink_backend: TcpServer,
                                  http: aiohttp.ClientSession) -> None:
    route = Route("lab", "desk", "127.0.0.1", sink_backend.port,
                  sessions=SessionPolicy(max_viewers=2))
    async with make_relay(routes=[route], auth=PROXY) as relay:
        viewers = [await connect(http, relay, user) for user in ("alice", "bob")]
        for ws in viewers:
            assert await ws.receive_bytes(timeout=5) == GREETING
        code, reason = await closed_with(await connect(http, relay, "carol"))
        assert code == closecodes.CONFLICT and "already has 2 viewers" in reason
        for ws in viewers:
            await ws.close()


async def test_interactive_first_makes_later_viewers_view_only(
        make_relay: RelayFactory, sink_backend: TcpServer, http: aiohttp.ClientSession) -> None:
    route = Route("lab", "desk", "127.0.0.1", sink_backend.port,
                  sessions=SessionPolicy(interactive=Interactive.FIRST))
    async with make_relay(routes=[route], auth=PROXY) as relay:
        first = await connect(http, relay, "alice")
        second = await connect(http, relay, "bob")
        for ws in (first, second):
            assert await ws.receive_bytes(timeout=5) == GREETING
        by_user = {s.user: s.view_only for s in relay.state.sessions}
        assert by_user == {"alice": False, "bob": True}
        await first.close()
        await second.close()


async def test_idle_timeout_frees_the_console_and_input_keeps_it(
        make_relay: RelayFactory, sink_backend: TcpServer, http: aiohttp.ClientSession) -> None:
    route = Route("lab", "desk", "127.0.0.1", sink_backend.port,
                  sessions=SessionPolicy(idle_timeout=1))
    async with make_relay(routes=[route]) as relay:
        ws = await http.ws_connect(f"{relay.public_url}/t/lab/desk/websockify")
        assert await ws.receive_bytes(timeout=5) == GREETING
        for part in HANDSHAKE:
            await ws.send_bytes(part)
        for _ in range(8):  # 2 s of pointer movement: twice the timeout, still connected
            await ws.send_bytes(POINTER)
            await asyncio.sleep(0.25)
        assert relay.state.sessions.count == 1
        code, reason = await closed_with(ws, timeout=5)  # now idle
        assert code == closecodes.IDLE_TIMEOUT
        assert reason == "no keyboard or mouse input for 1s; the console was freed"


async def test_max_duration_ends_any_session(make_relay: RelayFactory, sink_backend: TcpServer,
                                             http: aiohttp.ClientSession) -> None:
    route = Route("lab", "desk", "127.0.0.1", sink_backend.port,
                  sessions=SessionPolicy(max_duration=1))
    async with make_relay(routes=[route]) as relay:
        ws = await http.ws_connect(f"{relay.public_url}/t/lab/desk/websockify")
        assert await ws.receive_bytes(timeout=5) == GREETING
        code, reason = await closed_with(ws, timeout=5)
    assert code == closecodes.IDLE_TIMEOUT and "longest allowed time (1s)" in reason


def pointer_position(vnc: XvncServer) -> tuple[int, int]:
    display = xdisplay.Display(f":{vnc.display}")
    try:
        reply = display.screen().root.query_pointer()
        return reply.root_x, reply.root_y
    finally:
        display.close()


async def move_pointer_through_relay(relay: RelayServer, target: str, x: int, y: int) -> None:
    """A raw client, not noVNC: full handshake, then key and pointer events."""
    async with aiohttp.ClientSession() as http, http.ws_connect(
            f"{relay.public_url}/t/lab/{target}/websockify") as ws:
        stream, _ = await viewer_handshake(ws)
        await ws.send_bytes(struct.pack("!BBxxI", 4, 1, 0x61))  # key 'a' down
        await ws.send_bytes(struct.pack("!BBHH", 5, 0, x, y))
        # A round trip through the server: after its answer, the pointer event was handled.
        await ws.send_bytes(struct.pack("!BBHHHH", 3, 0, 0, 0, 1, 1))
        (message_type,) = await stream.read(1)
        assert message_type == 0


async def test_view_only_input_never_reaches_the_vnc_server(
        make_relay: RelayFactory, xvnc: XvncServer) -> None:
    routes = [Route("lab", "watch", "127.0.0.1", xvnc.port, view_only=True),
              Route("lab", "drive", "127.0.0.1", xvnc.port)]
    async with make_relay(routes=routes) as relay:
        await move_pointer_through_relay(relay, "drive", 100, 100)
        assert pointer_position(xvnc) == (100, 100)  # the check can see a move
        await move_pointer_through_relay(relay, "watch", 321, 123)
        # Once the session has ended, the relay has handled every message of that client:
        # whatever it passed on is with the VNC server before the connection's end.
        await eventually(lambda: relay.state.sessions.count == 0, "the view-only session ended")
        assert pointer_position(xvnc) == (100, 100)  # a view-only move did not arrive
        await move_pointer_through_relay(relay, "drive", 222, 111)
        assert pointer_position(xvnc) == (222, 111)
