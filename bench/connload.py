"""A bounded load on a standalone relay in front of a real Xvnc, for a profiler to watch.

`python -m bench.connload --sessions 2000 --messages 5000` starts Xvnc (harness/xvnc.py) on
127.0.0.1, writes a VncTarget manifest for it, starts `vncgate-relay --targets DIR` (or the
command given with `--relay`, e.g. another checkout's relay) and then drives, one at a time:

- set-up: `--sessions` sessions, each TCP connect, WebSocket upgrade, the RFB greeting, the
  viewer's RFB 3.8 handshake (security None, ClientInit) to ServerInit, then a close;
- messages: one session sending `--messages` client->server messages, each a PointerEvent and
  a non-incremental FramebufferUpdateRequest for one pixel in one frame, waiting for Xvnc's
  FramebufferUpdate (a round trip through the real server, the client->server path included).

`--profile OUT` attaches `py-spy record --native -r 1000 -f raw -o OUT` to the relay once it
listens and stops it when the load is done, so the profile covers this load, not start-up.
Every loop is bounded in count and in time; every connection goes to 127.0.0.1. Prints the
medians of what it timed (for orientation only: A/B figures come from `bench.interleaved`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.candidates import BIN, free_port, wait_listening
from bench.client import Conn, connect, ws_frame
from bench.measure import percentile
from harness.xvnc import XvncServer

MANIFEST = """\
apiVersion: vncgate.io/v1alpha1
kind: VncTarget
metadata: {{name: desk, namespace: lab}}
spec:
  endpoint: {{address: {{host: 127.0.0.1, port: {port}}}}}
"""
PATH = "/t/lab/desk/websockify"
# A PointerEvent (at 1,1, no buttons) and a FramebufferUpdateRequest (non-incremental, 1x1).
ROUND_TRIP = ws_frame(struct.pack("!BBHH", 5, 0, 1, 1) + struct.pack("!BBHHHH", 3, 0, 0, 0, 1, 1))
DEADLINE = 600.0  # seconds: the whole load stops by then, whatever the counts


async def _read(conn: Conn, n: int) -> bytes:
    """`n` more payload bytes (sequential protocol: nothing else arrives meanwhile)."""
    async with asyncio.timeout(10):
        await conn.expect(n)
    return bytes(conn.collect)


async def rfb_handshake(conn: Conn) -> int:
    """The viewer's side after the greeting: RFB 3.8, security None, ClientInit (shared).
    Returns the bytes per pixel of the server's format."""
    got = conn.expect(2)
    conn.send(b"RFB 003.008\n")
    async with asyncio.timeout(10):
        await got
    if bytes(conn.collect[:2]) != b"\x01\x01":
        raise ConnectionError(f"security types {bytes(conn.collect)!r}: expected None only")
    got = conn.expect(4)
    conn.send(b"\x01")
    async with asyncio.timeout(10):
        await got
    got = conn.expect(24)
    conn.send(b"\x01")
    async with asyncio.timeout(10):
        await got
    init = bytes(conn.collect)
    (name_length,) = struct.unpack_from("!I", init, 20)
    if len(init) < 24 + name_length:
        await _read(conn, 24 + name_length - len(init))
    return int(init[4]) // 8


async def load(port: int, sessions: int, messages: int) -> dict[str, float]:
    stop_at = time.monotonic() + DEADLINE
    setup: list[float] = []
    for _ in range(sessions):
        if time.monotonic() > stop_at:
            break
        conn, elapsed = await connect(port, PATH)
        started = time.perf_counter()
        try:
            await rfb_handshake(conn)
        finally:
            conn.abort()
        setup.append(elapsed + time.perf_counter() - started)
    trips: list[float] = []
    if messages:
        conn, _ = await connect(port, PATH)
        try:
            pixel = await rfb_handshake(conn)
            answer = 4 + 12 + pixel  # FramebufferUpdate header, one Raw rectangle of 1x1
            for _ in range(messages):
                if time.monotonic() > stop_at:
                    break
                got = conn.expect(answer)
                started = time.perf_counter()
                conn.send_prebuilt(ROUND_TRIP)
                async with asyncio.timeout(10):
                    await got
                trips.append(time.perf_counter() - started)
        finally:
            conn.abort()
    result: dict[str, float] = {"sessions": len(setup), "messages": len(trips)}
    if setup:
        result["setup_median_ms"] = statistics.median(setup) * 1e3
        result["setup_p99_ms"] = percentile(setup, 0.99) * 1e3
    if trips:
        result["round_trip_median_us"] = statistics.median(trips) * 1e6
        result["round_trip_p99_us"] = percentile(trips, 0.99) * 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.connload", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=1000, help="sessions set up (1000)")
    parser.add_argument("--messages", type=int, default=5000,
                        help="round trips on one session (5000)")
    parser.add_argument("--relay", default=str(BIN / "vncgate-relay"),
                        help="the relay's command (default this checkout's vncgate-relay)")
    parser.add_argument("--log-level", default="INFO", help="the relay's --log-level (INFO)")
    parser.add_argument("--profile", type=Path,
                        help="record the relay with py-spy (raw format) into this file")
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="vncgate-connload-") as tmp, \
            XvncServer(extra_args=("-BlacklistThreshold", "1000000")) as vnc:
        (Path(tmp) / "desk.yaml").write_text(MANIFEST.format(port=vnc.port))
        command = [args.relay, "--targets", tmp, "--listen", f"127.0.0.1:{port}",
                   "--internal-listen", f"127.0.0.1:{free_port()}",
                   "--log-level", args.log_level]
        log = (Path(tmp) / "relay.log").open("ab")
        relay = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        spy: subprocess.Popen[bytes] | None = None
        try:
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(wait_listening(port, relay))
                if args.profile is not None:  # attached once it listens: start-up is not in it
                    spy = subprocess.Popen(
                        [shutil.which("py-spy", path=str(BIN)) or "py-spy", "record", "--native",
                         "-r", "1000", "-f", "raw", "-o", str(args.profile),
                         "--pid", str(relay.pid)], stdout=log, stderr=log)
                    loop.run_until_complete(asyncio.sleep(2))  # py-spy attaches
                result = loop.run_until_complete(load(port, args.sessions, args.messages))
            finally:
                loop.close()
        finally:
            if spy is not None:  # py-spy writes its profile on SIGINT
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=120)
            relay.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                relay.wait(timeout=60)
            if relay.poll() is None:
                relay.kill()
                relay.wait(timeout=10)
    for key, value in result.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
