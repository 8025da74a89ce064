"""The RFB probe against real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from vncgate_operator.probe import next_probe_delay, probe_rfb

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def sends(data: bytes, hold: float = 0.0) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        await asyncio.sleep(hold)
        writer.close()
    return handler


async def test_vnc_server() -> None:
    async with serve(sends(b"RFB 003.008\n", hold=0.5)) as port:
        result = await probe_rfb("127.0.0.1", port, 2)
    assert (result.ok, result.reason, result.server_version) == (True, "RFBGreeting",
                                                                 "RFB 003.008")


async def test_not_vnc() -> None:
    async with serve(sends(b"HTTP/1.1 400 Bad Request\r\n\r\n")) as port:
        result = await probe_rfb("127.0.0.1", port, 2)
    assert (result.ok, result.reason) == (False, "NotVNC")
    assert "not a VNC server" in result.message


async def test_closed_early() -> None:
    async with serve(sends(b"RFB 0")) as port:
        result = await probe_rfb("127.0.0.1", port, 2)
    assert result.reason == "ConnectionClosed"


async def test_silent_server() -> None:
    async with serve(sends(b"", hold=2)) as port:
        result = await probe_rfb("127.0.0.1", port, 0.2)
    assert result.reason == "NoGreeting"


async def test_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        result = await probe_rfb("127.0.0.1", port, 1)
    assert result.reason == "ConnectionRefused"
    assert "is the VNC server running" in result.message


@pytest.mark.parametrize("seed", range(5))
def test_delays_are_spread(seed: int) -> None:
    rng = random.Random(seed)  # noqa: S311 - jitter, not a secret
    assert 0 <= next_probe_delay(30, True, rng) <= 30
    assert 24 <= next_probe_delay(30, False, rng) <= 36
