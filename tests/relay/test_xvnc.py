"""The relay in front of a real TigerVNC server: a full RFB handshake through the bridge."""

from __future__ import annotations

import struct

import aiohttp

from tests.conftest import RelayFactory
from tests.support.xvnc import XvncServer
from vncgate.common.model import Route


class WsStream:
    """Reads exact byte counts from a WebSocket whose messages split the stream anywhere."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, timeout: float = 10.0) -> None:
        self.ws = ws
        self.buffer = b""
        self.timeout = timeout

    async def read(self, count: int) -> bytes:
        while len(self.buffer) < count:
            self.buffer += await self.ws.receive_bytes(timeout=self.timeout)
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data


async def test_full_rfb_handshake_with_xvnc_through_the_relay(
        make_relay: RelayFactory, xvnc: XvncServer) -> None:
    async with make_relay(routes=[Route("lab", "xvnc", "127.0.0.1", xvnc.port)]) as relay, \
            aiohttp.ClientSession() as http, \
            http.ws_connect(f"{relay.public_url}/t/lab/xvnc/websockify",
                            protocols=("binary",)) as ws:
        stream = WsStream(ws)
        assert await stream.read(12) == b"RFB 003.008\n"
        await ws.send_bytes(b"RFB 003.008\n")
        (count,) = await stream.read(1)
        types = await stream.read(count)
        assert 1 in types, f"Xvnc offers security types {list(types)}, expected None (1)"
        await ws.send_bytes(b"\x01")  # security type None
        assert await stream.read(4) == b"\x00\x00\x00\x00"  # SecurityResult: OK
        await ws.send_bytes(b"\x01")  # ClientInit: shared
        width, height = struct.unpack("!HH", await stream.read(4))
        assert (width, height) == (800, 600)
        await stream.read(16)  # pixel format
        (name_length,) = struct.unpack("!I", await stream.read(4))
        name = (await stream.read(name_length)).decode()
        assert name  # TigerVNC names the desktop after host and display
        # FramebufferUpdateRequest for one pixel: the server answers with a FramebufferUpdate.
        await ws.send_bytes(struct.pack("!BBHHHH", 3, 0, 400, 300, 1, 1))
        (message_type,) = await stream.read(1)
        assert message_type == 0
