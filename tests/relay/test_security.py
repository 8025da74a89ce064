"""The findings of the hostile review (issue #11), each reproduced against the real relay.

One test (or a few) per finding; docs/SECURITY.md names them. The RFB tests use a real Xvnc
and read its pointer with python-xlib, as tests/relay/test_sessions.py does.
"""

from __future__ import annotations

import struct

import aiohttp
import pytest

from relay import closecodes
from relay.model import Route
from relay.server import RelayServer
from tests.conftest import RelayFactory
from tests.relay.test_sessions import pointer_position
from tests.relay.test_xvnc import WsStream
from tests.support.xvnc import XvncServer

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
