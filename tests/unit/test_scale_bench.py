"""The parts of `bench.scale` whose mistakes would silently skew its figures: how the API
server's request counts are sorted into kinds, and the idle VNC server every session ends at."""

from __future__ import annotations

import asyncio
import struct

from bench.scale import parse_requests
from bench.scale_greeter import NAME, IdleVnc


def sample(resource: str, verb: str, value: str, subresource: str = "") -> str:
    """One line of kube-apiserver's /metrics, labels as it writes them."""
    return (f'apiserver_request_total{{code="200",component="apiserver",dry_run="",group="g",'
            f'resource="{resource}",scope="resource",subresource="{subresource}",'
            f'verb="{verb}",version="v1"}} {value}')


METRICS = "\n".join([
    "# HELP apiserver_request_total [STABLE] Counter of apiserver requests",
    sample("leases", "POST", "12"), sample("leases", "PUT", "3"),
    sample("vnctargets", "PATCH", "7", "status"), sample("vnctargets", "PATCH", "2"),
    sample("events", "POST", "5"), sample("subjectaccessreviews", "POST", "1e+06"),
    sample("leases", "WATCH", "4"), sample("", "GET", "9"),
    'apiserver_request_duration_seconds_count{resource="leases",verb="POST"} 99'])


def test_requests_are_counted_by_kind() -> None:
    assert parse_requests(METRICS) == {
        "leases POST": 12, "leases PUT": 3, "vnctargets/status": 7, "vnctargets PATCH": 2,
        "events": 5, "subjectaccessreviews": 1_000_000, "watches opened": 4,
        "non-resource (incl. the bench's /metrics reads)": 9}


async def handshake() -> tuple[bytes, bytes, bytes, bytes]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(IdleVnc, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.sockets[0].getsockname()[1])
        async with asyncio.timeout(10):
            greeting = await reader.readexactly(12)
            writer.write(b"RFB 003.008\n")
            types = await reader.readexactly(2)
            writer.write(b"\x01")
            result = await reader.readexactly(4)
            writer.write(b"\x01")  # ClientInit: shared
            init = await reader.readexactly(24 + len(NAME))
            writer.write(b"\x03\x01\x00\x00\x00\x00\x00\x10\x00\x10")  # an update request
            await writer.drain()
        writer.close()
        return greeting, types, result, init
    finally:
        server.close()


def test_the_idle_server_answers_a_viewer_to_server_init() -> None:
    greeting, types, result, init = asyncio.run(handshake())
    assert greeting == b"RFB 003.008\n"
    assert types == b"\x01\x01"
    assert result == b"\x00\x00\x00\x00"
    width, height = struct.unpack_from("!HH", init)
    assert (width, height, init[4]) == (1024, 768, 32)
    assert init[24:] == NAME
