"""Back-pressure both ways: a stalled peer stops the reads from the other; memory stays bounded.

The relay's own buffers are read off the live session (transport write buffers and the stream
reader's buffer), and the peer that pushes is watched: its writes must stall, not pile up.
"""

from __future__ import annotations

import asyncio

import aiohttp

from harness.servers import GREETING, TcpServer, flood, stalled
from harness.waiting import eventually
from tests.conftest import RelayFactory
from vncgate.common.model import Route
from vncgate.relay.session.bridge import Session
from vncgate.relay.web.server import RelayServer

# A stalled session may hold its read chunk, the WebSocket writer's limit and the transports'
# high-water marks; "a few MiB" is the promise, 4 MiB the bound checked here.
BOUND = 4 * 1024 * 1024


def only_session(relay: RelayServer) -> Session:
    sessions = list(relay.state.sessions)
    assert len(sessions) == 1
    return sessions[0]


def relay_buffered(session: Session) -> int:
    """Bytes this session holds inside the relay process right now."""
    public = session.request.transport
    assert public is not None and session.upstream is not None
    return public.get_write_buffer_size() + session.upstream.buffered()


async def sample_until_stable(value: object, rounds: int = 20, interval: float = 0.25) -> int:
    """Sample `value()` until it stops growing for four samples in a row; returns the last."""
    assert callable(value)
    samples: list[int] = []

    def stable() -> bool:
        samples.append(int(value()))
        return len(samples) >= 5 and len(set(samples[-5:])) == 1

    await eventually(stable, "the byte count to stop growing", timeout=rounds * interval,
                     interval=interval, context=lambda: f"last samples {samples[-5:]}")
    return samples[-1]


async def test_stalled_browser_stops_the_reads_from_the_server(make_relay: RelayFactory) -> None:
    async with TcpServer(flood(total=512 * 1024 * 1024, seconds=20)) as server, \
            make_relay(routes=[Route("lab", "desk", "127.0.0.1", server.port)]) as relay, \
            aiohttp.ClientSession() as http, \
            http.ws_connect(f"{relay.public_url}/t/lab/desk/websockify") as ws:
        assert await ws.receive_bytes(timeout=5) == GREETING
        # The browser now stops reading. The server's pushes must stall within a few buffers.
        sent = await sample_until_stable(lambda: server.sent)
        session = only_session(relay)
        held = relay_buffered(session)
        print(f"stalled browser: server pushed {sent} bytes, the relay holds {held}")
        assert held < BOUND, f"the relay holds {held} bytes for one stalled session"
        assert sent < 64 * 1024 * 1024, f"the server pushed {sent} bytes into a stalled session"
        # Once the browser reads again, the data flows again.
        before = server.sent
        received = 0
        async with asyncio.timeout(10):
            while server.sent <= before + 1024 * 1024:
                received += len(await ws.receive_bytes())
        assert received > 0


async def test_stalled_server_stops_the_reads_from_the_browser(make_relay: RelayFactory) -> None:
    async with TcpServer(stalled(seconds=20)) as server, \
            make_relay(routes=[Route("lab", "desk", "127.0.0.1", server.port)]) as relay, \
            aiohttp.ClientSession() as http, \
            http.ws_connect(f"{relay.public_url}/t/lab/desk/websockify") as ws:
        assert await ws.receive_bytes(timeout=5) == GREETING
        sent = 0
        chunk = b"k" * 65536

        async def push() -> None:
            nonlocal sent
            for _ in range(4096):  # at most 256 MiB; it must block long before that
                await ws.send_bytes(chunk)
                sent += len(chunk)

        pusher = asyncio.create_task(push())
        try:
            pushed = await sample_until_stable(lambda: sent)
            held = relay_buffered(only_session(relay))
            print(f"stalled server: browser pushed {pushed} bytes, the relay holds {held}")
            assert held < BOUND, f"the relay holds {held} bytes for one stalled session"
            assert pushed < 64 * 1024 * 1024
            assert not pusher.done(), "the browser's sends were never slowed down"
        finally:
            pusher.cancel()
