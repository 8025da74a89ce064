"""The floor for a Python relay: a plain asyncio TCP-to-TCP pipe, no WebSocket, no checks.

`python -m bench.pipe source=PORT sink=PORT echo=PORT` listens on one free 127.0.0.1 port per
backend, prints `{"source": port, ...}` as one JSON line, and pipes each connection to its
backend with asyncio streams (read 64 KiB, write, drain; both directions) on asyncio's own loop,
until stdin closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import sys

from bench.limits import raise_fd_limit

CHUNK = 64 * 1024


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(CHUNK):
        writer.write(data)
        await writer.drain()


async def _handle(port: int, client_reader: asyncio.StreamReader,
                  client_writer: asyncio.StreamWriter) -> None:
    try:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", port,
                                                                     limit=CHUNK)
    except OSError:
        client_writer.transport.abort()
        return
    pumps = [asyncio.create_task(_copy(server_reader, client_writer)),
             asyncio.create_task(_copy(client_reader, server_writer))]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pump in pumps:
            pump.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*pumps, return_exceptions=True)
        client_writer.transport.abort()
        server_writer.transport.abort()


async def serve(targets: dict[str, int]) -> None:
    servers = {kind: await asyncio.start_server(functools.partial(_handle, port), "127.0.0.1",
                                                0, limit=CHUNK, backlog=4096)
               for kind, port in targets.items()}
    print(json.dumps({kind: s.sockets[0].getsockname()[1] for kind, s in servers.items()}),
          flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def main() -> None:
    raise_fd_limit()
    targets = {kind: int(port) for kind, _, port in (arg.partition("=") for arg in sys.argv[1:])}
    asyncio.run(serve(targets))


if __name__ == "__main__":
    main()
