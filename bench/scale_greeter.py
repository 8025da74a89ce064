"""A child of `bench.scale`: many idle VNC servers in one process, on loopback ports.

`python -m bench.scale_greeter --ports N` listens on N free ports of 127.0.0.1, prints them as
one JSON line (`{"ports": [...]}`) and serves until its stdin closes (the parent's end) or it
is signalled; on uvloop when it is installed, as the benchmark's other processes. Each
connection is an asyncio Protocol that plays a password-less VNC server as far as a viewer and
the operator's probe look: the greeting `RFB 003.008`, security type None,
SecurityResult OK, ServerInit (1024x768, 32 bpp) after ClientInit, then nothing: whatever the
viewer sends afterwards is dropped. So a session costs this process one socket and one small
object, and many thousands fit in it. A line `stats` on stdin answers with the connections open
and accepted so far.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys

from bench.limits import raise_fd_limit
from bench.loops import new_event_loop

GREETING = b"RFB 003.008\n"
NAME = b"vncgate-bench"
# width, height; pixel format: 32 bpp, depth 24, little-endian, true colour, 255 each, shifts
SERVER_INIT = (struct.pack("!HH", 1024, 768)
               + struct.pack("!BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
               + struct.pack("!I", len(NAME)) + NAME)
BACKLOG = 4096


class Counts:
    open = 0
    accepted = 0


class IdleVnc(asyncio.Protocol):
    """Version (12 bytes) -> security types; choice (1) -> SecurityResult; ClientInit (1) ->
    ServerInit; then idle."""

    __slots__ = ("pending", "state", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.state = 0
        self.pending = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        Counts.open += 1
        Counts.accepted += 1
        transport.write(GREETING)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        Counts.open -= 1
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.state >= 3 or self.transport is None:
            return  # idle: the viewer's messages are dropped
        self.pending += data
        while self.state < 3:
            need = 12 if self.state == 0 else 1
            if len(self.pending) < need:
                return
            self.pending = self.pending[need:]
            if self.state == 0:
                self.transport.write(b"\x01\x01")  # one security type: None
            elif self.state == 1:
                self.transport.write(b"\x00\x00\x00\x00")  # SecurityResult OK
            else:
                self.transport.write(SERVER_INIT)
                self.pending = b""
            self.state += 1


async def serve(count: int) -> None:
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(IdleVnc, "127.0.0.1", 0, backlog=BACKLOG)
               for _ in range(count)]
    ports = [server.sockets[0].getsockname()[1] for server in servers]
    print(json.dumps({"ports": ports}), flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        if line.strip() == b"stats":
            print(json.dumps({"open": Counts.open, "accepted": Counts.accepted}), flush=True)
    for server in servers:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports", type=int, default=8)
    args = parser.parse_args()
    raise_fd_limit()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(serve(args.ports))


if __name__ == "__main__":
    main()
