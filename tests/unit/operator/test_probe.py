"""The RFB probe against real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from vncgate.operator.probe import client_version, next_probe_delay, probe_rfb

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


def rfb_server(version: bytes, after_version: bytes, *, expect: int = 0,
               after_choice: bytes = b"", reset: bool = False) -> tuple[Handler, Received]:
    """A scripted RFB server: greeting, then `after_version` once the client's version arrived,
    then (when `expect` bytes of security choice arrive) `after_choice`. Records what it read."""
    received = Received()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(version)
            if reset:  # TigerVNC's blacklist: the refusal rides with the greeting, then a reset
                writer.write(after_version)
                await writer.drain()
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            received.append(await reader.readexactly(12))
            writer.write(after_version)
            await writer.drain()
            if expect:
                received.append(await reader.readexactly(expect))
                writer.write(after_choice)
                await writer.drain()
            received.append(await reader.read())  # what comes before the client's hang-up
        except (OSError, asyncio.IncompleteReadError):
            received.append(b"<reset>")
        finally:
            writer.close()
            received.done.set()
    return handler, received


class Received(list[bytes]):
    """What a scripted server read, in order; `await received.complete()` once it is done."""

    def __init__(self) -> None:
        super().__init__()
        self.done = asyncio.Event()

    async def complete(self) -> list[bytes]:
        async with asyncio.timeout(10):
            await self.done.wait()
        return list(self)


def reason(text: bytes) -> bytes:
    return struct.pack("!I", len(text)) + text


async def test_server_without_password_is_logged_into_and_left_before_client_init() -> None:
    handler, received = rfb_server(b"RFB 003.008\n", b"\x02\x02\x01", expect=1,
                                   after_choice=b"\x00\x00\x00\x00")
    async with serve(handler) as port:
        result = await probe_rfb("127.0.0.1", port, 2)
        sent = await received.complete()
    assert (result.ok, result.reason, result.server_version) == (True, "RFBGreeting",
                                                                 "RFB 003.008")
    assert result.logged_in and result.security_types == (2, 1)
    assert "without a password" in result.message
    # The client's version, security type None, then nothing: no ClientInit, so the probe
    # never asks for an exclusive session.
    assert sent == [b"RFB 003.008\n", b"\x01", b""]


async def test_password_server_is_left_before_choosing_a_security_type() -> None:
    handler, received = rfb_server(b"RFB 003.008\n", b"\x02\x02\x13")
    async with serve(handler) as port:
        result = await probe_rfb("127.0.0.1", port, 2)
        sent = await received.complete()
    assert (result.ok, result.logged_in, result.security_types) == (True, False, (2, 19))
    assert "asks for authentication (VncAuth(2), VeNCrypt(19))" in result.message
    assert sent == [b"RFB 003.008\n", b""]


@pytest.mark.parametrize(("version", "answer"), [
    (b"RFB 003.003\n", b"RFB 003.003\n"), (b"RFB 003.007\n", b"RFB 003.007\n"),
    (b"RFB 003.889\n", b"RFB 003.008\n"), (b"RFB 004.001\n", b"RFB 003.008\n")])
def test_the_probe_answers_a_version_the_server_speaks(version: bytes, answer: bytes) -> None:
    assert client_version(int(version[4:7]), int(version[8:11])) == answer


async def test_rfb_33_server_without_password() -> None:
    handler, received = rfb_server(b"RFB 003.003\n", struct.pack("!I", 1))
    async with serve(handler) as port:
        result = await probe_rfb("127.0.0.1", port, 2)
        sent = await received.complete()
    assert (result.ok, result.logged_in, result.server_version) == (True, True, "RFB 003.003")
    assert sent == [b"RFB 003.003\n", b""]


async def test_rfb_37_none_has_no_security_result() -> None:
    handler, received = rfb_server(b"RFB 003.007\n", b"\x01\x01", expect=1)
    async with serve(handler) as port:
        result = await probe_rfb("127.0.0.1", port, 2)
        sent = await received.complete()
    assert (result.ok, result.logged_in) == (True, True)
    assert sent == [b"RFB 003.007\n", b"\x01", b""]


@pytest.mark.parametrize("reset", [False, True])
async def test_tigervnc_blacklist_refusal_is_blocked(reset: bool) -> None:
    # Byte for byte what TigerVNC sends to a blacklisted address (VNCServerST::addSocket).
    handler, _ = rfb_server(b"RFB 003.003\n",
                            struct.pack("!I", 0) + reason(b"Too many security failures"),
                            reset=reset)
    async with serve(handler) as port:
        result = await probe_rfb("127.0.0.1", port, 2)
    assert (result.ok, result.reason, result.blocked) == (False, "Blacklisted", True)
    assert result.server_version is None
    assert "'Too many security failures'" in result.message
    assert "blocking connections from this address" in result.message


async def test_rfb_38_refusal_with_no_security_types() -> None:
    handler, _ = rfb_server(b"RFB 003.008\n",
                            b"\x00" + reason(b"Too many authentication failures, try later"))
    async with serve(handler) as port:
        result = await probe_rfb("127.0.0.1", port, 2)
    assert (result.ok, result.reason, result.blocked) == (False, "Blacklisted", True)


async def test_other_refusals_are_server_refused() -> None:
    # TigerVNC -NeverShared with a client connected: SecurityResult failed, with a reason.
    handler, _ = rfb_server(b"RFB 003.008\n", b"\x01\x01", expect=1,
                            after_choice=struct.pack("!I", 1)
                            + reason(b"The server is already in use\x1b[2J"))
    async with serve(handler) as port:
        result = await probe_rfb("127.0.0.1", port, 2)
    assert (result.ok, result.reason, result.blocked) == (False, "ServerRefused", False)
    assert "'The server is already in use [2J'" in result.message  # no control characters


async def test_stalled_handshake() -> None:
    handler, _ = rfb_server(b"RFB 003.008\n", b"")
    async with serve(handler) as port:
        result = await probe_rfb("127.0.0.1", port, 0.3)
    assert (result.ok, result.reason) == (False, "HandshakeTimeout")


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
