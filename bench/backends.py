"""The TCP backends of the benchmark, in their own process: each greets like a VNC server first.

- source: after the greeting, waits for one byte from the client, then streams as fast as the
  connection takes it (bounded: stops after STREAM_SECONDS or STREAM_BYTES);
- sink: after the greeting, reads and discards everything;
- echo: after the greeting, sends back everything it receives (also the idle sessions' target).

`python -m bench.backends` binds all three on 127.0.0.1 (free ports), prints one JSON line
`{"source": port, "sink": port, "echo": port}` and serves until stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from bench.loops import new_event_loop

GREETING = b"RFB 003.008\n"
CHUNK = b"\x5a" * (256 * 1024)
STREAM_SECONDS = 60.0
STREAM_BYTES = 64 * 1024**3


class Source(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.streaming = False
        self.paused = False
        self.sent = 0
        self.deadline = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(GREETING)

    def data_received(self, data: bytes) -> None:
        if not self.streaming:
            self.streaming = True
            self.deadline = time.monotonic() + STREAM_SECONDS
            self._push()

    def _push(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        # Write until the transport says stop; resume_writing() calls back here.
        for _ in range(64):
            if self.paused:
                return
            if self.sent >= STREAM_BYTES or time.monotonic() > self.deadline:
                transport.close()
                return
            transport.write(CHUNK)
            self.sent += len(CHUNK)
        asyncio.get_running_loop().call_soon(self._push)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._push()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class Sink(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(GREETING)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        pass


class Echo(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(GREETING)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)  # small messages only (latency); no flow control needed


async def serve() -> None:
    loop = asyncio.get_running_loop()
    servers = {
        "source": await loop.create_server(Source, "127.0.0.1", 0, backlog=4096),
        "sink": await loop.create_server(Sink, "127.0.0.1", 0, backlog=4096),
        "echo": await loop.create_server(Echo, "127.0.0.1", 0, backlog=4096),
    }
    ports = {kind: server.sockets[0].getsockname()[1] for kind, server in servers.items()}
    print(json.dumps(ports), flush=True)
    # Serve until the parent closes our stdin (or dies).
    await loop.run_in_executor(None, sys.stdin.read)
    for server in servers.values():
        server.close()


def main() -> None:
    from bench.limits import raise_fd_limit
    raise_fd_limit()
    loop = new_event_loop()
    try:
        loop.run_until_complete(serve())
    finally:
        loop.close()


if __name__ == "__main__":
    main()
