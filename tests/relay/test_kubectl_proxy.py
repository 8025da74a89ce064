"""`kubectl vnc proxy`'s tunnel in front of a real relay: a viewer the relay refuses, or that
cannot reach it, is told why in RFB (a security failure with the reason), not dropped.

The real plugin, API server and RBAC refusals are in tests/cluster/test_kubectl_vnc.py (also with
TigerVNC's vncviewer); here the relay is in this process, so each case is quick.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from harness.cluster import free_port
from harness.servers import GREETING, TcpServer
from harness.waiting import eventually
from tests.conftest import RelayFactory
from tests.relay.test_second_review import unused_bearer
from tests.support.rfbclient import VERSION, VERSION_33, security_failure
from vncgate.common.model import Route
from vncgate.kubectl.proxy import Tunnel, serve


@contextlib.asynccontextmanager
async def proxy(ws_url: str) -> AsyncIterator[tuple[int, list[str]]]:
    """The proxy's local port for `ws_url`, and what it reported."""
    reports: list[str] = []
    ports: list[int] = []
    server = asyncio.create_task(serve(Tunnel(ws_url, unused_bearer, report=reports.append),
                                       "127.0.0.1", 0, ports.append))
    try:
        await eventually(lambda: ports, "the proxy listening")
        yield ports[0], reports
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server


async def test_a_refused_viewer_gets_the_relays_reason_in_rfb(make_relay: RelayFactory,
                                                              backend: TcpServer) -> None:
    async with make_relay(routes=[Route("lab", "desk", "127.0.0.1", backend.port)]) as relay:
        base = relay.public_url.replace("http", "ws", 1)
        # An unknown target: the relay closes with 4404 before any byte of a server.
        async with proxy(f"{base}/t/lab/nope/websockify") as (port, reports):
            for version in (VERSION, VERSION_33):  # 3.8 (and 3.7) viewers, and 3.3 ones
                reason = await asyncio.to_thread(security_failure, port, version)
                assert reason.startswith("the relay refused: 4404 "), reason
                assert "lab/nope" in reason, reason
            assert any(r.endswith(reason.removeprefix("the relay refused: ")) for r in reports)
        # A known one: the server's own greeting and bytes, nothing of the proxy's.
        async with proxy(f"{base}/t/lab/desk/websockify") as (port, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                assert await asyncio.wait_for(reader.readexactly(12), 10) == GREETING
                writer.write(b"hello")
                assert await asyncio.wait_for(reader.readexactly(5), 10) == b"hello"
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()


async def test_a_viewer_is_told_when_the_relay_cannot_be_reached() -> None:
    async with proxy(f"ws://127.0.0.1:{free_port()}/t/lab/desk/websockify") as (port, _):
        reason = await asyncio.to_thread(security_failure, port)
        assert reason.startswith("cannot reach the relay: "), reason


async def test_a_viewer_that_leaves_at_once_costs_the_proxy_nothing() -> None:
    """A viewer that connects and leaves without a word (a port scan): the refusal's wait for
    its version ends with the connection, and the proxy goes on serving."""
    async with proxy(f"ws://127.0.0.1:{free_port()}/t/lab/desk/websockify") as (port, _):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        await writer.wait_closed()
        reason = await asyncio.to_thread(security_failure, port)
        assert reason.startswith("cannot reach the relay: "), reason
