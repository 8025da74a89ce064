"""A WebSocket client on a bare socket, for what aiohttp's client will not do: send unmasked
frames, stop reading, leave with an RST or a FIN in the middle of a stream."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct

from harness.servers import GREETING


def frame(payload: bytes, opcode: int = 0x2, masked: bool = True) -> bytes:
    n = len(payload)
    bit = 0x80 if masked else 0
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, bit | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, bit | 127, n)
    # The all-zero key is legal (RFC 6455 asks for an unpredictable key to protect
    # intermediaries; the server unmasks whatever the key is) and leaves the payload as is.
    return head + (b"\0\0\0\0" if masked else b"") + payload


def upgrade_request(port: int, path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: binary\r\n\r\n").encode()


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(opcode, payload) of the next frame from the server (unmasked, as servers send)."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    return b0 & 0x0F, await reader.readexactly(n)


class RawWebSocket:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str, extra: bytes = b"", greeting: bool = True) -> RawWebSocket:
        """`url`: the relay's public URL plus the WebSocket path; `extra`: bytes sent in the
        same write as the upgrade request."""
        host_port, path = url.removeprefix("http://").split("/", 1)
        port = int(host_port.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(upgrade_request(port, "/" + path) + extra)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101"), head
        ws = cls(reader, writer)
        if greeting:
            assert await ws.read_payload(len(GREETING)) == GREETING
        return ws

    async def read_frame(self) -> tuple[int, bytes]:
        return await read_frame(self.reader)

    async def read_payload(self, n: int) -> bytes:
        got = bytearray()
        while len(got) < n:
            opcode, payload = await self.read_frame()
            if opcode == 0x2:
                got += payload
        return bytes(got)

    async def close_frame(self, timeout: float = 10) -> tuple[int, str]:
        """Reads (skipping data) until the relay's close frame: its code and reason."""
        async with asyncio.timeout(timeout):
            while True:
                opcode, payload = await self.read_frame()
                if opcode == 0x8:
                    return struct.unpack("!H", payload[:2])[0], payload[2:].decode()

    async def push_until_blocked(self, limit: int = 8 * 1024 * 1024) -> int:
        """Sends 64 KiB frames until the relay stops taking them (or `limit` bytes)."""
        chunk, sent = frame(b"\x11" * 65536), 0
        while sent < limit:
            self.writer.write(chunk)
            sent += 65536
            try:
                async with asyncio.timeout(0.5):
                    await self.writer.drain()
            except TimeoutError:
                break
        return sent

    def reset(self) -> None:
        """Leave with an RST."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    def abort(self) -> None:
        self.writer.transport.abort()
