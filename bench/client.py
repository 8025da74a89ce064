"""The benchmark's client side: one asyncio Protocol that speaks raw TCP or just enough WebSocket.

It is written to cost the client as little as possible, so that the relay is what is measured:
payloads are counted (or collected when asked), never copied; frames it sends are built once,
masked with the all-zero key (legal: RFC 6455 asks for an unpredictable key to protect
intermediaries; the server must unmask whatever the key); pings are answered, so a relay's
heartbeat never closes an idle benchmark session.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import time

HANDSHAKE_TIMEOUT = 15.0


def ws_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """A final, masked (zero key) client frame."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return header + b"\0\0\0\0" + payload


class Conn(asyncio.Protocol):
    """One benchmark connection. `ws_path` None: raw TCP; else a WebSocket to that path."""

    def __init__(self, ws_path: str | None, host_header: str, greeting: int = 12,
                 headers: str = "") -> None:
        self.ws_path = ws_path
        self.host_header = host_header
        self.headers = headers  # more request header lines, each ending in \r\n
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()  # handshake done
        # When the connection was asked for, and when the 101 arrived (perf_counter seconds).
        self.created = time.perf_counter()
        self.upgraded = 0.0
        self.closed: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.received = 0  # payload bytes
        self.collect = bytearray()
        self.collecting = 0  # collect payload until this many bytes are in `collect`
        self.collected: asyncio.Future[None] | None = None
        self.close_code: int | None = None
        self._handshake = bytearray() if ws_path is not None else None
        self._header = b""  # an incomplete frame header
        self._remaining = 0  # payload bytes left in the current frame
        self._opcode = 0
        self._control = bytearray()
        self._writable: asyncio.Future[None] | None = None
        # Collect the greeting from the first byte: it may come before create_connection returns.
        self.greeted = self.expect(greeting)

    # -- asyncio callbacks ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.ws_path is None:
            self.ready.set_result(None)
            return
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            f"GET {self.ws_path} HTTP/1.1\r\nHost: {self.host_header}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\n{self.headers}"
            "\r\n".encode())

    def data_received(self, data: bytes) -> None:
        if self._handshake is not None:
            self._handshake += data
            end = self._handshake.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self._handshake[:12])
            rest = bytes(self._handshake[end + 4:])
            self._handshake = None
            if not status.startswith(b"HTTP/1.1 101"):
                self._fail(ConnectionError(f"no upgrade: {status!r}"))
                return
            self.upgraded = time.perf_counter()
            self.ready.set_result(None)
            if rest:
                self._frames(rest)
            return
        if self.ws_path is None:
            self._payload(data)
        else:
            self._frames(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(exc or ConnectionError("closed"))
        if not self.closed.done():
            self.closed.set_result(None)
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # -- what the measurements use ------------------------------------------------------------
    async def writable(self) -> None:
        if self._writable is not None:
            await self._writable

    def send(self, payload: bytes) -> None:
        """One message: a frame on a WebSocket, the bytes themselves on raw TCP."""
        if self.transport is not None:
            self.transport.write(payload if self.ws_path is None else ws_frame(payload))

    def send_prebuilt(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def expect(self, n: int) -> asyncio.Future[None]:
        """A future done when `n` more payload bytes have been collected (into `collect`)."""
        self.collect.clear()
        self.collecting = n
        self.collected = asyncio.get_running_loop().create_future()
        return self.collected

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def alive(self) -> bool:
        return self.transport is not None and self.close_code is None

    # -- internals ---------------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        for future in (self.ready, self.collected):
            if future is not None and not future.done():
                future.set_exception(exc)
                future.exception()  # mark retrieved: failures are counted, not raised

    def _payload(self, data: bytes | memoryview) -> None:
        self.received += len(data)
        if self.collecting:
            self.collect += data
            if len(self.collect) >= self.collecting:
                self.collecting = 0
                if self.collected is not None and not self.collected.done():
                    self.collected.set_result(None)

    def _frames(self, data: bytes) -> None:
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end:
            if self._remaining:
                take = min(self._remaining, end - pos)
                if self._opcode >= 0x8:
                    self._control += view[pos:pos + take]
                else:
                    self._payload(view[pos:pos + take])
                self._remaining -= take
                pos += take
                if not self._remaining and self._opcode >= 0x8:
                    self._on_control()
                continue
            # A frame header: 2 bytes, then 2 or 8 bytes of length (servers do not mask).
            need = 2
            head = self._header + bytes(view[pos:pos + 10 - len(self._header)])
            if len(head) >= 2:
                short = head[1] & 0x7F
                need = 2 + (2 if short == 126 else 8 if short == 127 else 0)
            if len(head) < need:
                self._header = head
                return
            used = need - len(self._header)
            self._header = b""
            pos += used
            self._opcode = head[0] & 0x0F
            short = head[1] & 0x7F
            if short == 126:
                length = struct.unpack_from("!H", head, 2)[0]
            elif short == 127:
                length = struct.unpack_from("!Q", head, 2)[0]
            else:
                length = short
            self._remaining = length
            if length == 0 and self._opcode >= 0x8:
                self._on_control()

    def _on_control(self) -> None:
        payload = bytes(self._control)
        self._control.clear()
        if self._opcode == 0x9:  # ping -> pong
            self.send_prebuilt(ws_frame(payload, 0xA))
        elif self._opcode == 0x8:
            self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            self.abort()


async def connect(port: int, ws_path: str | None, within: float = HANDSHAKE_TIMEOUT,
                  greeting: int = 12) -> tuple[Conn, float]:
    """Connect, finish the handshake and read the `greeting` bytes the server sends first.

    Returns the connection and the seconds this took (TCP connect to the greeting's last byte).
    """
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    async with asyncio.timeout(within):
        _, conn = await loop.create_connection(
            lambda: Conn(ws_path, f"127.0.0.1:{port}", greeting), "127.0.0.1", port)
        try:
            await conn.ready
            await conn.greeted
        except BaseException:
            conn.abort()
            raise
    return conn, time.perf_counter() - started
