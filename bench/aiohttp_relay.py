"""The floor for an aiohttp WebSocket relay: the least a relay on aiohttp does, no checks.

`python -m bench.aiohttp_relay source=PORT sink=PORT ...` listens on one free 127.0.0.1 port,
prints `{"port": port}` as one JSON line, and bridges `/KIND` WebSockets (subprotocol
`binary`) to that backend until stdin closes: aiohttp's WebSocketResponse with its defaults
but compression off, asyncio streams to the backend, one pump each way (read 64 KiB and
`send_bytes`; `async for` the messages and write, drain). No Host, Origin, sign-in,
authorization, limits, address checks, heartbeat or logging: what vncgate's relay adds to
this is what its handshake and set-up figures are compared against.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys

from aiohttp import WSMsgType, web

from bench.limits import raise_fd_limit

CHUNK = 64 * 1024
PORTS = web.AppKey("ports", dict[str, int])


async def _to_browser(reader: asyncio.StreamReader, ws: web.WebSocketResponse) -> None:
    while data := await reader.read(CHUNK):
        await ws.send_bytes(data)


async def _to_server(ws: web.WebSocketResponse, writer: asyncio.StreamWriter) -> None:
    async for msg in ws:
        if msg.type is not WSMsgType.BINARY:
            return
        writer.write(msg.data)
        await writer.drain()


async def bridge(request: web.Request) -> web.StreamResponse:
    port = request.app[PORTS][request.match_info["kind"]]
    ws = web.WebSocketResponse(protocols=("binary",), compress=False)
    await ws.prepare(request)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=CHUNK)
    except OSError:
        await ws.close()
        return ws
    pumps = [asyncio.create_task(_to_browser(reader, ws)),
             asyncio.create_task(_to_server(ws, writer))]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pump in pumps:
            pump.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*pumps, return_exceptions=True)
        writer.transport.abort()
        await ws.close()
    return ws


async def serve(targets: dict[str, int]) -> None:
    app = web.Application()
    app[PORTS] = targets
    app.router.add_get("/{kind}", bridge)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    server = site._server  # the bound port (port 0) is only here
    assert server is not None
    port = next(iter(getattr(server, "sockets", []))).getsockname()[1]
    print(json.dumps({"port": port}), flush=True)
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await runner.cleanup()


def main() -> None:
    raise_fd_limit()
    targets = {kind: int(port) for kind, _, port in (arg.partition("=") for arg in sys.argv[1:])}
    asyncio.run(serve(targets))


if __name__ == "__main__":
    main()
