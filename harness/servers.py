"""Small TCP servers on 127.0.0.1 that play the VNC side (or a wrong side) in relay tests.

Each is an asyncio server started with `async with`; `.port` is where it listens and
`.received` collects what clients sent it. Every loop is bounded in bytes and time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import cast

from aiohttp import web

GREETING = b"RFB 003.008\n"

Behaviour = Callable[["TcpServer", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class TcpServer:
    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.port = 0
        self.received = bytearray()
        self.sent = 0
        self.connections = 0
        self.closed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.behaviour(self, reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.transport.abort()
            self.closed.set()

    async def __aenter__(self) -> TcpServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def read_into_received(self, reader: asyncio.StreamReader,
                                 until: int | None = None, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while until is None or len(self.received) < until:
                data = await reader.read(65536)
                if not data:
                    return
                self.received += data


async def passwordless_vnc(server: TcpServer, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
    """A password-less VNC server as far as the operator's probe looks: the greeting, security
    type None and SecurityResult OK, then it waits for the hang-up (the probe stops before
    ClientInit). Bounded by 5 s a connection."""
    writer.write(GREETING)
    await writer.drain()
    with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError):
        async with asyncio.timeout(5):
            await reader.readexactly(12)  # the client's version
            writer.write(b"\x01\x01")  # one security type: None
            await reader.readexactly(1)  # the client's choice
            writer.write(b"\x00\x00\x00\x00")  # SecurityResult OK
            server.received += await reader.read(1024)


async def echo_rfb(server: TcpServer, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> None:
    """Greets like a VNC server, then echoes everything back (bounded by the test's time)."""
    writer.write(GREETING)
    await writer.drain()
    async with asyncio.timeout(30):
        while data := await reader.read(65536):
            server.received += data
            writer.write(data)
            await writer.drain()


async def not_vnc(server: TcpServer, reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter) -> None:
    """Speaks first like an SSH server would: the relay must not forward a byte of it."""
    writer.write(b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n")
    await writer.drain()
    await server.read_into_received(reader, timeout=5)


async def silent(server: TcpServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
    """Accepts and never greets: a database or a hung server."""
    await server.read_into_received(reader, timeout=10)


async def greet_and_close(server: TcpServer, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
    writer.write(GREETING)
    await writer.drain()


def flood(total: int = 256 * 1024 * 1024, seconds: float = 20) -> Behaviour:
    """Greets, then pushes up to `total` bytes as fast as the peer takes them."""

    async def behaviour(server: TcpServer, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        writer.write(GREETING)
        chunk = b"\x00" * 65536
        async with asyncio.timeout(seconds):
            while server.sent < total:
                writer.write(chunk)
                await writer.drain()
                server.sent += len(chunk)

    return behaviour


def sink(seconds: float = 20) -> Behaviour:
    """Greets, then reads as fast as it can (or slowly when paused by a test)."""

    async def behaviour(server: TcpServer, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        writer.write(GREETING)
        await writer.drain()
        await server.read_into_received(reader, timeout=seconds)

    return behaviour


def stalled(seconds: float = 20) -> Behaviour:
    """Greets, then never reads: a VNC server that hung after the handshake."""

    async def behaviour(server: TcpServer, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        writer.write(GREETING)
        await writer.drain()
        await asyncio.sleep(seconds)

    return behaviour


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """`app` on a free port of 127.0.0.1; yields its http:// URL."""
    runner = web.AppRunner(app, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        server = cast(asyncio.Server, site._server)
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        await runner.cleanup()
