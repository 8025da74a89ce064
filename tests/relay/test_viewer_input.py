"""The browser -> server path under hostile and awkward frames, on real sockets.

On the private path (relay/internals.py) each binary message goes from aiohttp's reader straight
to the session (`Session.viewer_data`), and only the rest through aiohttp's queue to the pump:
these tests hold both paths to the same rules. Fragments, control frames between fragments, a
message over the size limit, text, an unmasked fragment, a close in the middle of a message,
and a flood while the VNC server does not read: the relay must stop reading from the browser
(its buffers bounded, checked on the relay's own counts), then relay everything, in order, once
the server reads again.
"""

from __future__ import annotations

import asyncio
import os
import struct

import pytest

from harness.rawws import frame as zero_key_frame
from harness.servers import GREETING, TcpServer, echo_rfb
from harness.waiting import eventually
from tests.conftest import RelayFactory
from tests.relay.test_endings import Listener, ended, one_session, relay_before
from vncgate.common.model import Route
from vncgate.relay import closecodes
from vncgate.relay.internals import viewer_input
from vncgate.relay.session.bridge import Session

BOUND = 4 * 1024 * 1024  # as tests/relay/test_backpressure.py: "a few MiB" per stalled session


def frame(payload: bytes, opcode: int = 0x2, *, fin: bool = True, masked: bool = True) -> bytes:
    """A client frame with a random mask key (harness.rawws.frame uses the all-zero key)."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    bit = 0x80 if masked else 0
    if n < 126:
        head = struct.pack("!BB", first, bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def relaying(relay_session: Session) -> None:
    """Until the session's pump has started (on the private path: its sink is attached)."""
    direct = viewer_input(relay_session.ws)
    await eventually(lambda: relay_session.upstream is not None and (
        direct is None or direct.sink is not None), "the session relays")


def watch_sink(session: Session, path: str) -> list[tuple[bytes, bool]]:
    """On the private path: every message the session's sink is handed, with its answer; on the
    public fallback: the session has no sink."""
    direct = viewer_input(session.ws)
    seen: list[tuple[bytes, bool]] = []
    if path == "public":
        assert direct is None
        return seen
    assert direct is not None
    sink = direct.sink
    assert sink is not None

    def watching(data: bytes) -> bool:
        seen.append((data, sink(data)))
        return seen[-1][1]

    direct.sink = watching
    return seen


async def test_binary_messages_go_straight_to_the_session(
        make_relay: RelayFactory, path: str) -> None:
    plain = Listener()
    async with relay_before(make_relay, plain, echo_rfb) as (server, relay):
        ws = await plain.open(relay)
        session = await one_session(relay)
        await relaying(session)
        seen = watch_sink(session, path)
        messages = [bytes([i]) * (1 + i * 37) for i in range(60)]
        # One write of many frames (one read, several messages), then one by one.
        ws.writer.write(b"".join(frame(m) for m in messages[:30]))
        for m in messages[30:]:
            ws.writer.write(frame(m))
        expected = b"".join(messages)
        assert await ws.read_exactly(len(expected)) == expected
        assert bytes(server.received) == expected
        if path == "private":
            assert seen == [(m, True) for m in messages], "a message took the queue and the pump"
        ws.writer.write(frame(struct.pack("!H", 1000), 0x8))
        await ended(relay, session, server)
        assert session.code == 1000 and session.reason == "the viewer closed the connection"
        assert session.to_server == len(expected)
        ws.abort()


async def test_fragments_with_control_frames_between_them(
        make_relay: RelayFactory, listener: Listener, path: str) -> None:
    async with relay_before(make_relay, listener, echo_rfb) as (server, relay):
        ws = await listener.open(relay)
        session = await one_session(relay)
        await relaying(session)
        ws.writer.write(frame(b"first"))
        # A message in three fragments, a ping and an unsolicited pong between them, then a
        # whole message, all in one write: the server gets both messages whole, in order.
        ws.writer.write(frame(b"AAAA", 0x2, fin=False) + frame(b"ping!", 0x9) +
                        frame(b"BBBB", 0x0, fin=False) + frame(b"", 0xA) +
                        frame(b"CCCC", 0x0) + frame(b"last"))
        pong = None
        got = bytearray()
        async with asyncio.timeout(10):
            while len(got) < len(b"firstAAAABBBBCCCClast") or pong is None:
                opcode, payload = await ws.read_frame()
                if opcode == 0xA:
                    pong = payload
                elif opcode == 0x2:
                    got += payload
        assert pong == b"ping!"
        assert bytes(got) == b"firstAAAABBBBCCCClast"
        assert bytes(server.received) == b"firstAAAABBBBCCCClast"
        assert session.code is None
        ws.abort()


async def test_an_oversized_message_in_fragments_closes_1009(
        make_relay: RelayFactory, path: str) -> None:
    plain = Listener()
    async with relay_before(make_relay, plain, echo_rfb,
                            max_message_size=1024) as (server, relay):
        ws = await plain.open(relay)
        session = await one_session(relay)
        await relaying(session)
        ws.writer.write(frame(b"ok"))
        assert await ws.read_exactly(2) == b"ok"
        # Each fragment is under the limit, the message is not.
        ws.writer.write(frame(b"x" * 600, 0x2, fin=False) + frame(b"y" * 600, 0x0, fin=False) +
                        frame(b"z" * 10, 0x0) + frame(b"after"))
        code, _ = await ws.close_frame()
        assert code == closecodes.MESSAGE_TOO_BIG
        await ended(relay, session, server)
        assert session.code == closecodes.MESSAGE_TOO_BIG
        assert bytes(server.received) == b"ok"  # nothing of the message, nothing after it
        ws.abort()


@pytest.mark.parametrize("fragmented", [False, True])
async def test_a_text_message_between_binary_ones_closes_1003(
        make_relay: RelayFactory, path: str, fragmented: bool) -> None:
    plain = Listener()
    async with relay_before(make_relay, plain, echo_rfb) as (server, relay):
        ws = await plain.open(relay)
        session = await one_session(relay)
        await relaying(session)
        text = (frame(b"UkZC", 0x1, fin=False) + frame(b"IDAw", 0x0)) if fragmented \
            else frame(b"UkZCIDAw", 0x1)
        ws.writer.write(frame(b"one") + frame(b"two") + text + frame(b"three"))
        code, reason = await ws.close_frame()
        assert code == closecodes.UNSUPPORTED_DATA and "binary" in reason
        await ended(relay, session, server)
        assert bytes(server.received) == b"onetwo"
        ws.abort()


async def test_an_unmasked_fragment_closes_1002(make_relay: RelayFactory, path: str) -> None:
    plain = Listener()
    async with relay_before(make_relay, plain, echo_rfb) as (server, relay):
        ws = await plain.open(relay)
        session = await one_session(relay)
        await relaying(session)
        ws.writer.write(frame(b"one") + frame(b"AAAA", 0x2, fin=False) +
                        frame(b"BBBB", 0x0, masked=False) + frame(b"two"))
        code, _ = await ws.close_frame()
        assert code == 1002
        await ended(relay, session, server)
        assert session.code == 1002 and "unmasked" in session.reason
        assert bytes(server.received) == b"one"
        ws.abort()


async def test_a_close_frame_in_the_middle_of_a_message(
        make_relay: RelayFactory, listener: Listener, path: str) -> None:
    async with relay_before(make_relay, listener, echo_rfb) as (server, relay):
        ws = await listener.open(relay)
        session = await one_session(relay)
        await relaying(session)
        # RFC 6455 5.4: a control frame may come between fragments; a close ends the message.
        ws.writer.write(frame(b"one") + frame(b"half a mess", 0x2, fin=False) +
                        frame(struct.pack("!H", 4321) + b"bye", 0x8) + frame(b"age", 0x0))
        await ws.close_frame()  # aiohttp answers the close itself (with 1000)
        await ended(relay, session, server)
        assert session.code == 4321 and session.reason == "the viewer closed the connection"
        assert bytes(server.received) == b"one"
        ws.abort()


def stalled_until(go: asyncio.Event, seconds: float = 60) -> object:
    """Greets, reads nothing until `go` is set, then reads everything."""

    async def behaviour(server: TcpServer, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        writer.write(GREETING)
        await writer.drain()
        async with asyncio.timeout(seconds):
            await go.wait()
        await server.read_into_received(reader, timeout=seconds)

    return behaviour


async def test_a_flood_while_the_server_does_not_read(
        make_relay: RelayFactory, listener: Listener, path: str) -> None:
    go = asyncio.Event()
    async with relay_before(make_relay, listener, stalled_until(go),  # type: ignore[arg-type]
                            stall_timeout=600) as (server, relay):
        ws = await listener.open(relay)
        session = await one_session(relay)
        await relaying(session)
        assert session.upstream is not None
        viewer = session.request.transport
        assert viewer is not None
        direct = viewer_input(session.ws)

        def held() -> int:
            """What the relay holds of the browser's bytes: unsent to the server, and queued."""
            upstream = session.upstream
            assert upstream is not None
            return upstream.buffered() + (direct.queued if direct is not None else 0)

        # Small messages, as a viewer's input is, and many of them: 1,000 bytes each, numbered.
        messages = [struct.pack("!I", i) * 250 for i in range(32 * 1024)]  # 32 MiB at most
        sent = 0
        for start in range(0, len(messages), 64):
            ws.writer.write(b"".join(frame(m) for m in messages[start:start + 64]))
            sent = start + 64
            try:
                async with asyncio.timeout(0.5):
                    await ws.writer.drain()
            except TimeoutError:
                break  # the relay stopped taking them
        assert sent < len(messages), "the relay took 32 MiB into a server that does not read"
        # The relay stops reading from the browser, with a few buffers held, and stays so.
        await eventually(lambda: not viewer.is_reading(), "the relay stopped reading the browser",
                         context=lambda: f"holds {held()} bytes")
        samples = []
        for _ in range(5):
            samples.append(held())
            assert not viewer.is_reading()
            await asyncio.sleep(0.1)
        print(f"{path}: {sent} messages pushed, the relay holds {samples} bytes")
        assert max(samples) < BOUND, f"the relay holds {max(samples)} bytes"
        assert len(set(samples)) == 1, f"the relay's buffers still grow: {samples}"
        assert session.code is None
        # The server reads again: every message arrives, whole and in order, and the session
        # goes on (also after the server drained with no message from the browser waiting).
        go.set()
        expected = b"".join(messages[:sent])
        await eventually(lambda: len(server.received) >= len(expected),
                         "the server received everything", timeout=60,
                         context=lambda: f"{len(server.received)} of {len(expected)}")
        assert bytes(server.received) == expected
        await eventually(lambda: held() == 0, "the relay holds nothing")
        ws.writer.write(frame(b"after the flood"))
        await eventually(lambda: server.received.endswith(b"after the flood"),
                         "a message after the flood is relayed",
                         context=lambda: f"session ended {session.code} {session.reason}")
        assert session.code is None, session.reason
        assert session.to_server == len(expected) + len(b"after the flood")
        ws.abort()


async def test_the_server_drains_while_the_browser_sends_nothing(
        make_relay: RelayFactory, path: str) -> None:
    """One message over the server's high-water mark, and no more: the server drains it while
    the pump waits for the browser's next message, and the session goes on."""
    go = asyncio.Event()
    plain = Listener()
    async with relay_before(make_relay, plain, stalled_until(go),  # type: ignore[arg-type]
                            stall_timeout=600, max_message_size=32 * 1024 * 1024
                            ) as (server, relay):
        ws = await plain.open(relay)
        session = await one_session(relay)
        await relaying(session)
        upstream = session.upstream
        assert upstream is not None
        # More than the kernel's socket buffers on loopback take (a few MiB each way).
        big = os.urandom(24 * 1024 * 1024)
        ws.writer.write(zero_key_frame(big))
        await eventually(lambda: upstream.write_paused, "the server's transport is paused")
        go.set()
        await eventually(lambda: len(server.received) >= len(big), "the server read it all",
                         context=lambda: f"session ended {session.code} {session.reason}")
        await eventually(lambda: not upstream.write_paused, "the server's transport resumed")
        ws.writer.write(frame(b"and then"))
        await eventually(lambda: server.received.endswith(b"and then"), "the next message",
                         context=lambda: f"session ended {session.code} {session.reason}")
        assert bytes(server.received) == big + b"and then"
        assert session.code is None, session.reason
        ws.abort()


async def test_a_message_the_view_only_filter_refuses_ends_the_session_with_1003(
        make_relay: RelayFactory, path: str) -> None:
    """Refused by the viewer-stream checks in the reader's callback: nothing of it, and nothing
    that came after it in the same read, reaches the server."""
    plain = Listener()
    async with TcpServer(echo_rfb) as server, \
            make_relay(routes=[Route("lab", "desk", "127.0.0.1", server.port, view_only=True)]
                       ) as relay:
        ws = await plain.open(relay)
        session = await one_session(relay)
        await relaying(session)
        assert session.filter is not None
        seen = watch_sink(session, path)
        ws.writer.write(frame(b"RFB 004.000\n") + frame(b"RFB 003.008\n") + frame(b"\x01"))
        code, reason = await ws.close_frame()
        assert code == closecodes.UNSUPPORTED_DATA and "RFB 003.008" in reason
        await ended(relay, session, server)
        assert session.code == closecodes.UNSUPPORTED_DATA
        assert bytes(server.received) == b""
        assert session.to_server == 0
        if path == "private":  # refused in the reader's callback; the rest declined, queued
            assert seen[0] == (b"RFB 004.000\n", True)
            assert all(not taken for _, taken in seen[1:])
        ws.abort()
