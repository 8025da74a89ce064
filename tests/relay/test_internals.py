"""The behaviour the relay takes from aiohttp's and asyncio's private parts (relay/internals.py),
checked against the installed versions: real sockets, a real aiohttp server, real TLS.

Each contract runs twice where there is a fallback: on the private path, as the relay runs, and
with `public_api_only()`, the path a relay takes on an aiohttp that breaks the contract (slower,
never broken). What the fallback cannot check is said where it applies.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WebSocketError, WSMsgType, web

from harness.certs import make_ca, make_server_cert
from harness.rawws import RawWebSocket, frame, read_frame, upgrade_request
from harness.servers import echo_rfb, serving
from harness.waiting import eventually
from tests.conftest import RelayFactory
from tests.relay.test_endings import Listener, one_session, relay_before
from vncgate.relay import internals
from vncgate.relay.internals import ViewerLink, start_tls_capable, viewer_link
from vncgate.relay.web.websocket import RelayWebSocket

WS = "/t/lab/desk/websockify"


def test_the_installed_aiohttp_has_every_private_part_the_relay_touches() -> None:
    assert internals.MISSING == []
    assert internals.private_in_use()


# --- the client's bytes, through the gate ---------------------------------------------------

@asynccontextmanager
async def gated_app() -> AsyncIterator[tuple[str, list[Any]]]:
    """An app whose one WebSocket (RelayWebSocket) echoes binary messages and records the
    message that ended the loop."""
    endings: list[Any] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        ws = RelayWebSocket(protocols=("binary",), timeout=2.0)
        await ws.prepare(request)
        while (msg := await ws.receive()).type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
        endings.append((msg.data, ws.refusal) if msg.type is WSMsgType.ERROR else None)
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    async with serving(app) as url:
        yield url + "/ws", endings


async def test_an_unmasked_frame_is_refused_with_1002(path: str) -> None:
    async with gated_app() as (url, endings):
        ws = await RawWebSocket.open(url, greeting=False)
        ws.writer.write(frame(b"fine"))
        assert await ws.read_payload(4) == b"fine"
        ws.writer.write(frame(b"\x00" * 20, masked=False) + frame(b"after"))
        code, _ = await ws.close_frame()
        assert code == 1002
        await eventually(lambda: bool(endings), "the handler saw the error")
        error, refusal = endings[0]
        assert isinstance(error, WebSocketError) and error.code == 1002
        assert refusal is not None and "unmasked" in refusal
        if path == "private":  # the fallback's error is aiohttp's own (reserved bits)
            assert "unmasked" in str(error)
        ws.abort()


async def test_an_unmasked_frame_sent_with_the_upgrade_request_is_refused() -> None:
    """Only the private path sees these bytes: aiohttp has read them with the request before
    the public fallback can stand in front of its reader (a browser never sends any)."""
    async with gated_app() as (url, endings):
        ws = await RawWebSocket.open(url, extra=frame(b"\x00" * 20, masked=False),
                                     greeting=False)
        code, _ = await ws.close_frame()
        assert code == 1002
        await eventually(lambda: bool(endings), "the handler saw the error")
        ws.abort()


async def test_masked_frames_of_every_size_pass_in_order(path: str) -> None:
    sizes = [0, 1, 125, 126, 65535, 65536, 200_000]
    async with gated_app() as (url, endings), aiohttp.ClientSession() as http, \
            http.ws_connect(url, protocols=("binary",)) as ws:
        for number, size in enumerate(sizes):
            await ws.send_bytes(bytes([number]) * size)
        for number, size in enumerate(sizes):
            msg = await ws.receive(timeout=10)
            assert msg.type is WSMsgType.BINARY and msg.data == bytes([number]) * size
    await eventually(lambda: bool(endings), "the handler ended")
    assert endings == [None]


async def test_binary_messages_reach_the_sink_in_the_readers_callback(path: str) -> None:
    """The private contract of `viewer_input`: aiohttp's reader (compiled or not) calls the
    relay's queue for each message it parses; while a reader waits on the empty queue, binary
    messages go to the sink from the connection's read callback (no task), in order, and the
    rest (ping, text, close) through aiohttp's queue and `receive`, as does a binary message the
    sink declines. On the public fallback there is no such queue."""
    seen: list[tuple[bytes, bool]] = []
    received: list[Any] = []
    done = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        ws = RelayWebSocket(protocols=("binary",), timeout=2.0)
        await ws.prepare(request)
        direct = internals.viewer_input(ws)
        if path == "public":
            assert direct is None
        else:
            assert direct is not None

            def sink(data: bytes) -> bool:
                seen.append((data, asyncio.current_task() is None))
                return data != b"decline"

            direct.attach(sink)
        try:
            while (msg := await ws.receive()).type in (WSMsgType.BINARY, WSMsgType.TEXT):
                received.append(msg.data)
        finally:
            if direct is not None:
                direct.detach()
            done.set()
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    async with serving(app) as url:
        ws = await RawWebSocket.open(url + "/ws", greeting=False)
        ws.writer.write(frame(b"one") + frame(b"two") + frame(b"p", 0x9) + frame(b"three"))
        assert await ws.read_frame() == (0xA, b"p")  # the ping went to aiohttp: it answered
        ws.writer.write(frame(b"decline") + frame(b"text", 0x1) + frame(b"\x03\xe8", 0x8))
        async with asyncio.timeout(10):
            await done.wait()
        ws.abort()
    if path == "public":
        assert received == [b"one", b"two", b"three", b"decline", "text"]
    else:
        # "three" came in the same read as the ping, after it: it waits its turn in the queue.
        # "decline" went to the sink if the handler was waiting by then, else to the queue.
        assert [data for data, _ in seen if data != b"decline"] == [b"one", b"two"]
        assert all(in_callback for _, in_callback in seen), seen
        assert received == [b"three", b"decline", "text"]


# --- frames to the browser --------------------------------------------------------------------

@asynccontextmanager
async def linked_app(script: Any) -> AsyncIterator[str]:
    """An app whose WebSocket handler runs `script(request, ws, link)`."""
    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=("binary",), timeout=2.0)
        await ws.prepare(request)
        link = viewer_link(request, ws)
        try:
            await script(request, ws, link)
        finally:
            link.close()
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    async with serving(app) as url:
        yield url + "/ws"


async def test_frames_through_the_link_arrive_whole_and_in_order_among_aiohttps_own(
        path: str) -> None:
    """The link's frames and pings, aiohttp's pings and send_bytes, interleaved: every frame
    arrives whole, in the order written."""
    payloads = [os.urandom(size) for size in (1, 125, 126, 16385, 65536, 300_000)]

    async def script(request: web.Request, ws: web.WebSocketResponse, link: ViewerLink) -> None:
        for number, payload in enumerate(payloads):
            link.write(payload)
            link.ping()
            await link.drain()
            await ws.ping(bytes([number]))
            await ws.send_bytes(b"aiohttp %d" % number)
        link.write(memoryview(b"last"))
        await link.drain()

    async with linked_app(script) as url, aiohttp.ClientSession() as http, \
            http.ws_connect(url, autoping=False) as ws:
        for number, payload in enumerate(payloads):
            assert (await ws.receive(timeout=10)).data == payload
            ping = await ws.receive(timeout=10)
            assert ping.type is WSMsgType.PING and ping.data == b""  # the link's
            ping = await ws.receive(timeout=10)
            assert ping.type is WSMsgType.PING and ping.data == bytes([number])
            assert (await ws.receive(timeout=10)).data == b"aiohttp %d" % number
        assert (await ws.receive(timeout=10)).data == b"last"


async def test_paused_follows_the_transport_and_drain_waits_for_the_reader(path: str) -> None:
    """While the browser reads nothing, the link says paused (on the private path: once the
    transport is over its high-water mark; on the fallback: while a message is being sent);
    drain returns once the browser has read, and the link is no longer paused."""
    seen: dict[str, Any] = {}
    reading = asyncio.Event()
    chunk, high = b"\x5a" * 65536, 64 * 1024

    async def script(request: web.Request, ws: web.WebSocketResponse, link: ViewerLink) -> None:
        transport = request.transport
        assert transport is not None
        transport.set_write_buffer_limits(high=high)
        link.write(chunk)
        written = len(chunk)
        while not link.paused and written < 64 * 1024 * 1024:
            link.write(chunk)
            written += len(chunk)
        seen["written"] = written
        seen["paused"] = (link.paused, transport.get_write_buffer_size())
        reading.set()
        await link.drain()
        seen["drained"] = (link.paused, transport.get_write_buffer_size())

    async with linked_app(script) as url:
        port = int(url.removeprefix("http://").split("/", 1)[0].rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.transport.pause_reading()  # the browser reads nothing
        writer.write(upgrade_request(port, "/ws"))
        await asyncio.wait_for(reading.wait(), 30)
        paused, buffered = seen["paused"]
        assert paused
        if path == "private":
            assert buffered > high
        writer.transport.resume_reading()
        await reader.readuntil(b"\r\n\r\n")
        got = 0
        async with asyncio.timeout(30):
            while got < seen["written"]:
                opcode, payload = await read_frame(reader)
                assert opcode == 0x2 and payload == chunk
                got += len(payload)
        await eventually(lambda: "drained" in seen, "drain returned")
        paused, buffered = seen["drained"]
        assert not paused
        if path == "private":
            assert buffered <= high // 4  # asyncio's low-water mark
        writer.close()


# --- the relay on the public fallback ---------------------------------------------------------

async def test_the_relay_relays_on_the_public_fallback(make_relay: RelayFactory) -> None:
    data = os.urandom(3 * 1024 * 1024)
    with internals.public_api_only():
        async with relay_before(make_relay, Listener(), echo_rfb) as (_, relay):
            ws = await RawWebSocket.open(relay.public_url + WS)
            for start in range(0, len(data), 65536):
                ws.writer.write(frame(data[start:start + 65536]))
            assert await ws.read_payload(len(data)) == data
            ws.abort()


async def test_the_relay_refuses_unmasked_frames_on_the_public_fallback(
        make_relay: RelayFactory) -> None:
    with internals.public_api_only():
        async with relay_before(make_relay, Listener(), echo_rfb) as (server, relay):
            ws = await RawWebSocket.open(relay.public_url + WS)
            session = await one_session(relay)
            ws.writer.write(frame(b"fine"))
            assert await ws.read_payload(4) == b"fine"
            ws.writer.write(frame(b"\x00" * 20, masked=False))
            code, _ = await ws.close_frame()
            assert code == 1002
            await eventually(lambda: relay.state.sessions.count == 0, "the session ended")
            assert session.code == 1002 and "unmasked" in session.reason
            assert b"\x00" * 20 not in server.received
            ws.abort()


# --- TLS over a transport of the relay's own --------------------------------------------------

class Pipe(asyncio.Transport):
    """One end of an in-memory byte pipe: what one end writes, the other's protocol reads."""

    def __init__(self, protocol: asyncio.BaseProtocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.peer: Pipe | None = None
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        peer = self.peer
        if peer is not None and not peer.closing:
            chunk = bytes(data)
            asyncio.get_running_loop().call_soon(peer.deliver, chunk)

    def deliver(self, data: bytes) -> None:
        if self.closing:
            return
        protocol = self.protocol
        if isinstance(protocol, asyncio.BufferedProtocol):  # asyncio's TLS layer is one
            view = memoryview(data)
            while view:
                buffer = protocol.get_buffer(len(view))
                size = min(len(buffer), len(view))
                buffer[:size] = view[:size]
                protocol.buffer_updated(size)
                view = view[size:]
        else:
            assert isinstance(protocol, asyncio.Protocol)
            protocol.data_received(data)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class Collect(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()

    def data_received(self, data: bytes) -> None:
        self.data += data


@start_tls_capable
class MarkedPipe(Pipe):
    pass


def pipe_pair(cls: type[Pipe]) -> tuple[Pipe, Collect, Pipe, Collect]:
    left_protocol, right_protocol = Collect(), Collect()
    left, right = cls(left_protocol), cls(right_protocol)
    left.peer, right.peer = right, left
    return left, left_protocol, right, right_protocol


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    ca = make_ca(directory / "ca")
    server = make_server_cert(ca, directory / "server", "localhost")
    return ca.cert, server.cert, server.key


async def test_asyncio_starts_tls_over_a_marked_transport(
        certificate: tuple[Path, Path, Path]) -> None:
    ca, cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(ca))
    loop = asyncio.get_running_loop()
    left, left_protocol, right, right_protocol = pipe_pair(MarkedPipe)
    async with asyncio.timeout(30):
        client, server = await asyncio.gather(
            loop.start_tls(left, left_protocol, client_context, server_hostname="localhost"),
            loop.start_tls(right, right_protocol, server_context, server_side=True))
        assert client is not None and server is not None
        client.write(b"through TLS")
        await eventually(lambda: bytes(right_protocol.data) == b"through TLS", "TLS data")


async def test_a_failed_tls_handshake_over_a_marked_transport_is_an_ssl_error(
        certificate: tuple[Path, Path, Path]) -> None:
    """asyncio's TLS layer ends a failed connection through the transport's `_force_close`."""
    _, cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    untrusting = ssl.create_default_context()  # the system's CAs: the test CA is not one
    loop = asyncio.get_running_loop()
    left, left_protocol, right, right_protocol = pipe_pair(MarkedPipe)
    server = asyncio.ensure_future(
        loop.start_tls(right, right_protocol, server_context, server_side=True))
    try:
        async with asyncio.timeout(30):
            with pytest.raises(ssl.SSLCertVerificationError):
                await loop.start_tls(left, left_protocol, untrusting, server_hostname="localhost")
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
    assert left.is_closing()


async def test_asyncio_refuses_tls_over_an_unmarked_transport() -> None:
    """Why the mark is there: the day this passes no more, the reach can go."""
    left, left_protocol, _, _ = pipe_pair(Pipe)
    with pytest.raises(TypeError, match="start_tls"):
        await asyncio.get_running_loop().start_tls(
            left, left_protocol, ssl.create_default_context(), server_hostname="localhost")
