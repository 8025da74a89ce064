"""A viewer's side of RFB over the relay's WebSocket, for tests that need more than noVNC shows:
exact byte counts, and the handshake up to ServerInit; and a native viewer's side of a refused
connection on a TCP port."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

import aiohttp

VERSION = b"RFB 003.008\n"
VERSION_33 = b"RFB 003.003\n"


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


def security_failure(port: int, version: bytes = VERSION, timeout: float = 20.0) -> str:
    """A native viewer on 127.0.0.1:`port` that is refused: it reads the server's version,
    answers with `version`, and expects no security types (RFB 3.7+: a count of 0; RFB 3.3: the
    security type 0), then the reason, which it returns (RFC 6143 7.1.2)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        stream = sock.makefile("rwb")
        greeting = stream.read(12)
        assert greeting.startswith(b"RFB 003.00"), f"not an RFB greeting: {greeting!r}"
        stream.write(version)
        stream.flush()
        refused = stream.read(4 if version == VERSION_33 else 1)
        assert refused and not any(refused), f"security types offered: {refused!r}"
        (length,) = struct.unpack("!I", stream.read(4))
        reason = stream.read(length)
        assert len(reason) == length, f"the reason was cut short: {reason!r}"
        return reason.decode()
