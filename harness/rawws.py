"""A WebSocket client on a bare socket, for what aiohttp's client will not do: send unmasked
frames, stop reading, leave with an RST or a FIN in the middle of a stream."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import ssl
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
        self._unread = b""  # payload read past what read_exactly returned

    @classmethod
    async def open(cls, url: str, extra: bytes = b"", greeting: bool = True,
                   context: ssl.SSLContext | None = None) -> RawWebSocket:
        """`url`: the relay's public URL plus the WebSocket path; `extra`: bytes sent in the
        same write as the upgrade request; `context`: TLS for an https:// URL."""
        scheme, rest = url.split("://", 1)
        if (scheme == "https") != (context is not None):
            raise ValueError(f"{url}: give a TLS context for https:// URLs, and only for those")
        host_port, path = rest.split("/", 1)
        port = int(host_port.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
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

    async def read_exactly(self, n: int) -> bytes:
        """The next `n` bytes of the binary stream, wherever the frames split it."""
        while len(self._unread) < n:
            opcode, payload = await self.read_frame()
            if opcode == 0x2:
                self._unread += payload
        data, self._unread = self._unread[:n], self._unread[n:]
        return data

    async def rfb_handshake(self) -> None:
        """What noVNC does after the greeting: RFB 3.8, security None, a shared ClientInit;
        reads ServerInit."""
        self.writer.write(frame(GREETING))
        (count,) = await self.read_exactly(1)
        assert 1 in await self.read_exactly(count), "security type None not offered"
        self.writer.write(frame(b"\x01"))
        assert await self.read_exactly(4) == bytes(4)  # SecurityResult: OK
        self.writer.write(frame(b"\x01"))
        head = await self.read_exactly(24)
        await self.read_exactly(struct.unpack_from("!I", head, 20)[0])

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

    def write_eof(self) -> None:
        """Leave with a FIN, and nothing after it (over TLS: without a close_notify, as a
        process that exits does)."""
        if self.writer.can_write_eof():
            self.writer.write_eof()
        else:
            self.writer.get_extra_info("socket").shutdown(socket.SHUT_WR)

    def close_tls(self) -> None:
        """Close the connection at once, the polite way: over TLS a close_notify, then a FIN."""
        self.writer.close()

    def reset(self) -> None:
        """Leave with an RST."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    def abort(self) -> None:
        self.writer.transport.abort()
