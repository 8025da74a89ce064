"""A viewer's side of RFB over the relay's WebSocket, for tests that need more than noVNC shows:
exact byte counts, and the handshake up to ServerInit."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import aiohttp

VERSION = b"RFB 003.008\n"


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


@dataclass(frozen=True, slots=True)
class ServerInit:
    offered: list[int]  # the security types the relay offered
    width: int
    height: int
    name: str


async def viewer_handshake(ws: aiohttp.ClientWebSocketResponse
                           ) -> tuple[WsStream, ServerInit]:
    """What noVNC does first: RFB 3.8, security None, a shared ClientInit; read ServerInit.
    The stream is left at the first server message after it."""
    stream = WsStream(ws)
    assert await stream.read(12) == VERSION
    await ws.send_bytes(VERSION)
    (count,) = await stream.read(1)
    offered = list(await stream.read(count))
    assert 1 in offered, f"security types {offered} offered, expected None (1)"
    await ws.send_bytes(b"\x01")  # security type None
    assert await stream.read(4) == bytes(4)  # SecurityResult: OK
    await ws.send_bytes(b"\x01")  # ClientInit: shared
    width, height = struct.unpack("!HH", await stream.read(4))
    await stream.read(16)  # pixel format
    (name_length,) = struct.unpack("!I", await stream.read(4))
    name = (await stream.read(name_length)).decode(errors="replace")
    return stream, ServerInit(offered, width, height, name)
