"""Every way a session can end ends it, both sides, with a code and a reason: real sockets.

Each test watches the relay's own session (its recorded code and reason, the session table,
the active-sessions gauge, the relayed-bytes counter) and the relay's TCP connection to the VNC
server, polled with a deadline. Each runs on the plain listener and on the TLS one
(--tls-cert/--tls-key), whose transports end differently.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from harness.rawws import RawWebSocket, frame
from harness.servers import Behaviour, TcpServer, echo_rfb, flood, silent, sink, stalled
from harness.waiting import eventually
from harness.xvnc import XvncServer
from tests.conftest import RelayFactory
from vncgate.common.model import Route
from vncgate.common.spec import RecordingPolicy
from vncgate.relay.recording.capture import END, read_records
from vncgate.relay.recording.store import RecordingSettings
from vncgate.relay.session.bridge import Phase, Session
from vncgate.relay.web.server import RelayServer

WS = "/t/lab/desk/websockify"


@dataclass(frozen=True)
class Listener:
    """The relay's public listener for a test: plain http, or TLS with the test's own CA."""

    settings: dict[str, Any] = field(default_factory=dict)
    context: ssl.SSLContext | None = None

    async def open(self, relay: RelayServer, **options: Any) -> RawWebSocket:
        return await RawWebSocket.open(relay.public_url + WS, context=self.context, **options)


@asynccontextmanager
async def relay_before(make_relay: RelayFactory, listener: Listener, serve: Behaviour,
                       **settings: Any) -> AsyncIterator[tuple[TcpServer, RelayServer]]:
    """A stand-in VNC server running `serve`, and a relay with one route to it (lab/desk)."""
    async with TcpServer(serve) as server, \
            make_relay(routes=[Route("lab", "desk", "127.0.0.1", server.port)],
                       **listener.settings, **settings) as relay:
        yield server, relay


async def one_session(relay: RelayServer) -> Session:
    await eventually(lambda: relay.state.sessions.count == 1, "a session opened")
    return next(iter(relay.state.sessions))


def relay_connections_to(port: int) -> list[object]:
    """This process's TCP connections to `port` (the relay runs in the test's process)."""
    return [c for c in psutil.Process().net_connections("tcp")
            if c.raddr and c.raddr.port == port and c.status != psutil.CONN_TIME_WAIT]


def active_gauge(relay: RelayServer) -> float:
    value = relay.state.metrics.registry.get_sample_value(
        "vncgate_sessions_active", {"namespace": "lab", "name": "desk"})
    return value or 0.0


def relayed_bytes(relay: RelayServer, direction: str) -> float:
    value = relay.state.metrics.registry.get_sample_value(
        "vncgate_relayed_bytes_total", {"direction": direction})
    return value or 0.0


async def ended(relay: RelayServer, session: Session, server: TcpServer,
                greeted: bool = True) -> None:
    """The session ended all the way: its table entry, gauge, server connection, its code and
    reason, and its bytes counted (the greeting at least went to the browser if `greeted`)."""
    await eventually(lambda: relay.state.sessions.count == 0, "the session ended")
    await eventually(lambda: not relay_connections_to(server.port),
                     "the relay's connection to the VNC server is closed")
    assert active_gauge(relay) == 0
    assert session.code is not None and session.reason
    await eventually(lambda: session.phase is Phase.CLOSED, "the session's ending ran to its end")
    assert relayed_bytes(relay, "to_client") == session.to_client
    assert session.to_client > 0 or not greeted
    assert relayed_bytes(relay, "to_server") == session.to_server


@pytest.mark.parametrize("leave", ["close", "rst", "fin"])
async def test_server_stops_reading_then_the_browser_leaves(
        make_relay: RelayFactory, listener: Listener, leave: str) -> None:
    async with relay_before(make_relay, listener, stalled(seconds=60),
                            stall_timeout=600) as (server, relay):
        ws = await listener.open(relay)
        session = await one_session(relay)
        pushed = await ws.push_until_blocked()
        print(f"pushed {pushed} bytes into a server that does not read")
        # The browser's kernel still holds what the relay did not take; the close frame and
        # the FIN wait behind it, so the relay must notice the departure without reading.
        if leave == "close":
            ws.writer.transport.write(frame(b"\x03\xe8", 0x8))
            ws.abort()
        elif leave == "rst":
            ws.reset()
        else:
            ws.abort()  # close(2): a FIN, queued behind the unsent bytes
        await ended(relay, session, server)
        assert session.code == 1006 and "left" in session.reason
        print(session.code, session.reason)
        ws.abort()


async def test_a_browser_that_stops_reading_is_dropped(
        make_relay: RelayFactory, listener: Listener) -> None:
    async with relay_before(make_relay, listener, flood(seconds=60),
                            stall_timeout=1) as (server, relay):
        ws = await listener.open(relay)
        ws.writer.transport.pause_reading()
        session = await one_session(relay)
        await ended(relay, session, server)
        assert session.code == 4408
        assert "accepted no data" in session.reason
        ws.abort()


async def test_a_server_that_stops_reading_is_dropped(
        make_relay: RelayFactory, listener: Listener) -> None:
    async with relay_before(make_relay, listener, stalled(seconds=60),
                            stall_timeout=1) as (server, relay):
        ws = await listener.open(relay)
        session = await one_session(relay)
        await ws.push_until_blocked()
        # The browser stays and reads: it is told why.
        code, reason = await ws.close_frame(timeout=20)
        assert code == 4504 and "accepted no data" in reason
        await ended(relay, session, server)
        ws.abort()


async def test_both_sides_stall(make_relay: RelayFactory, listener: Listener) -> None:
    # flood never reads and pushes as fast as it can; the browser neither reads nor stops.
    async with relay_before(make_relay, listener, flood(seconds=60),
                            stall_timeout=1) as (server, relay):
        ws = await listener.open(relay)
        ws.writer.transport.pause_reading()
        session = await one_session(relay)
        await ws.push_until_blocked()
        await ended(relay, session, server)
        assert session.code in (4408, 4504)
        ws.abort()


async def test_a_browser_that_misses_its_heartbeat_is_dropped(
        make_relay: RelayFactory, listener: Listener) -> None:
    async with relay_before(make_relay, listener, sink(seconds=60),
                            heartbeat=1.0, stall_timeout=600) as (server, relay):
        ws = await listener.open(relay)
        ws.writer.transport.pause_reading()  # never sees the ping, never answers it
        session = await one_session(relay)
        await ended(relay, session, server)
        assert session.code == 1006 and "heartbeat" in session.reason
        ws.abort()


@pytest.mark.parametrize("leave", ["rst", "fin"])
async def test_a_browser_that_leaves_mid_stream(
        make_relay: RelayFactory, listener: Listener, leave: str) -> None:
    async with relay_before(make_relay, listener, echo_rfb) as (server, relay):
        ws = await listener.open(relay)
        session = await one_session(relay)
        ws.writer.write(frame(b"ping"))
        assert await ws.read_payload(4) == b"ping"
        if leave == "rst":
            ws.reset()
        else:
            ws.write_eof()
        await ended(relay, session, server)
        assert session.code in (1005, 1006, 1000)
        ws.abort()


@pytest.mark.parametrize("leave", ["close", "abort"])
async def test_a_close_frame_then_the_connection_ends_at_once(
        make_relay: RelayFactory, listener: Listener, leave: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """As `kubectl vnc proxy` leaves when its native viewer disconnects: a close frame, then at
    once the end of its connection (over TLS a close_notify, or none), while the relay is
    still answering the close."""
    caplog.set_level(logging.INFO)
    async with relay_before(make_relay, listener, echo_rfb) as (server, relay):
        ws = await listener.open(relay)
        session = await one_session(relay)
        ws.writer.write(frame(b"ping"))
        assert await ws.read_payload(4) == b"ping"
        ws.writer.write(frame(struct.pack("!H", 1000), 0x8))
        if leave == "close":
            ws.close_tls()
        else:
            ws.abort()
        await ended(relay, session, server)
        # 1006 where the end of the connection overtook the close frame in aiohttp (over TLS)
        assert session.code in (1000, 1006) and "viewer closed" in session.reason
        assert relayed_bytes(relay, "to_server") == 4
        (line,) = [r for r in caplog.records if r.getMessage() == "session end"]
        assert line.fields["bytes_to_server"] == 4  # type: ignore[attr-defined]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], \
            "the ending raised"


async def test_a_recorded_session_that_leaves_at_once_completes_its_recording(
        make_relay: RelayFactory, listener: Listener, xvnc: XvncServer, tmp_path: Path) -> None:
    route = Route("lab", "desk", "127.0.0.1", xvnc.port,
                  recording=RecordingPolicy(enabled=True))
    async with make_relay(routes=[route], recording=RecordingSettings(directory=tmp_path),
                          **listener.settings) as relay:
        ws = await listener.open(relay)
        session = await one_session(relay)
        await ws.rfb_handshake()
        ws.writer.write(frame(struct.pack("!H", 1000), 0x8))
        ws.close_tls()
        await eventually(lambda: relay.state.sessions.count == 0, "the session ended")
        await eventually(lambda: session.phase is Phase.CLOSED, "the ending ran to its end")
        assert relayed_bytes(relay, "to_client") == session.to_client > 0
    (recording,) = await asyncio.to_thread(lambda: list(tmp_path.rglob("*.vncrec")))
    end = list(read_records(recording))[-1]
    assert end.kind == END and end.json()["complete"] is True, end


@pytest.mark.parametrize("with_handshake", [False, True])
async def test_unmasked_client_frames_close_with_1002(
        make_relay: RelayFactory, listener: Listener, with_handshake: bool) -> None:
    async with relay_before(make_relay, listener, echo_rfb) as (server, relay):
        unmasked = frame(b"\x00" * 20, masked=False)
        if with_handshake:
            # Sent in the same write as the upgrade request: it must not slip past the check.
            ws = await listener.open(relay, extra=unmasked, greeting=False)
        else:
            ws = await listener.open(relay)
            session = await one_session(relay)
            ws.writer.write(frame(b"fine"))
            assert await ws.read_payload(4) == b"fine"
            ws.writer.write(unmasked)
        code, _ = await ws.close_frame()
        assert code == 1002  # aiohttp closes it, without a reason
        await eventually(lambda: relay.state.sessions.count == 0, "the session ended")
        assert server.connections <= 1
        assert b"\x00" * 20 not in server.received
        if not with_handshake:
            assert session.code == 1002 and "unmasked" in session.reason
        ws.abort()


async def test_a_server_stall_is_not_blamed_on_the_heartbeat(
        make_relay: RelayFactory, listener: Listener) -> None:
    """While the server does not read, the relay does not read the browser, nor its pongs: the
    heartbeat then runs out first, and the ending must name the server."""
    async with relay_before(make_relay, listener, stalled(seconds=60),
                            heartbeat=1.0, stall_timeout=600) as (server, relay):
        ws = await listener.open(relay)
        session = await one_session(relay)
        await ws.push_until_blocked()
        await ended(relay, session, server)
        assert session.code == 4504 and "stopped accepting data" in session.reason
        ws.abort()


async def test_a_stop_while_connecting_ends_at_once(
        make_relay: RelayFactory, listener: Listener) -> None:
    """Shutdown (or a route change) while the relay waits for a greeting does not wait for the
    connect timeout."""
    async with relay_before(make_relay, listener, silent, connect_timeout=600) as (server, relay):
        ws = await listener.open(relay, greeting=False)
        session = await one_session(relay)
        await eventually(lambda: server.connections == 1, "the relay dialled")
        session.stop(1001, "the relay is shutting down; reconnect in a moment")
        code, reason = await ws.close_frame()
        assert code == 1001 and "shutting down" in reason
        await ended(relay, session, server, greeted=False)
        ws.abort()
