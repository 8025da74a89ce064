"""The TCP backends of the benchmark, in their own process: each greets like a VNC server first.

- source: after the greeting, waits for one byte from the client, then streams as fast as the
  connection takes it (bounded: stops after STREAM_SECONDS or STREAM_BYTES);
- sink: after the greeting, reads and discards everything;
- echo: after the greeting, sends back everything it receives (also the idle sessions' target);
- rfb: a VNC server (RFB 3.8, security None, a 256x256 true-colour ServerInit) that, after the
  viewer's ClientInit, sends FramebufferUpdates of one full-screen Raw rectangle (256 KiB of
  pixels each) at RFB_RATE bytes per second, bounded like the source; what a recording records;
- rfb-idle: the same handshake, then silence (idle recorded sessions).

`python -m bench.backends` binds them all on 127.0.0.1 (free ports), prints one JSON line
`{"source": port, "sink": port, ...}` and serves until stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import random
import struct
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


RFB_WIDTH, RFB_HEIGHT = 256, 256
RFB_RATE = 32 * 2**20  # bytes per second per session: a fixed rate, so that CPU per GiB compares
_TICK = 0.01
SERVER_INIT = (struct.pack("!HH", RFB_WIDTH, RFB_HEIGHT)
               + struct.pack("!BBBBHHHBBBxxx", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
               + struct.pack("!I", 5) + b"bench")


def _pixels() -> bytes:
    """A screenful that compresses about as much as a desktop: flat runs (background) and
    4 KiB blocks of noise (text, photos) in turn. Fixed seed: every run sends the same bytes."""
    rng = random.Random(5900)
    size = RFB_WIDTH * RFB_HEIGHT * 4
    blocks = [bytes([rng.randrange(256)]) * 4096 if i % 2 else rng.randbytes(4096)
              for i in range(size // 4096)]
    return b"".join(blocks)


UPDATE = (struct.pack("!BxH", 0, 1) + struct.pack("!HHHHi", 0, 0, RFB_WIDTH, RFB_HEIGHT, 0)
          + _pixels())


class Rfb(asyncio.Protocol):
    """Just enough of a VNC server: the handshake of RFB 3.8 with security None, then Raw
    updates at RFB_RATE (when `stream`), whatever the viewer asks for."""

    def __init__(self, stream: bool) -> None:
        self.stream = stream
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.step = 0  # 0: version, 1: security choice, 2: ClientInit, 3: messages
        self.paused = False
        self.sent = 0
        self.started = 0.0
        self.deadline = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(GREETING)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.step == 3:
            return  # update requests, encodings: every update is Raw and full-screen anyway
        self.buffer += data
        assert self.transport is not None
        while self.step < 3:
            need = (12, 1, 1)[self.step]
            if len(self.buffer) < need:
                return
            del self.buffer[:need]
            self.step += 1
            if self.step == 1:
                self.transport.write(b"\x01\x01")  # one security type: None
            elif self.step == 2:
                self.transport.write(b"\0\0\0\0")  # SecurityResult: OK
            else:
                self.transport.write(SERVER_INIT)
                if self.stream:
                    self.started = time.monotonic()
                    self.deadline = self.started + STREAM_SECONDS
                    self._push()

    def _push(self) -> None:
        """Every tick: send what the rate allows by now, unless the relay pushes back."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        now = time.monotonic()
        if self.sent >= STREAM_BYTES or now > self.deadline:
            transport.close()
            return
        while self.sent < RFB_RATE * (now - self.started) and not self.paused:
            transport.write(UPDATE)
            self.sent += len(UPDATE)
        asyncio.get_running_loop().call_later(_TICK, self._push)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False  # the next tick sends on

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
        "rfb": await loop.create_server(lambda: Rfb(stream=True), "127.0.0.1", 0, backlog=4096),
        "rfb-idle": await loop.create_server(lambda: Rfb(stream=False), "127.0.0.1", 0,
                                             backlog=4096),
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
