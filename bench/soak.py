"""`python -m bench.soak --minutes N [--rate 50] [--json PATH] [--tracemalloc]`: a long soak of
the standalone relay on 127.0.0.1, checking every way a session can end. Not part of CI.

The relay runs as its own process (`vncgate-relay --target ...`, JSON logs to a file); the VNC
servers and the clients run in this process, on one event loop:

- churn: `--rate` sessions per second, each one of: a clean close, a client abort (RST), a
  client FIN without a close frame, a server that resets (must close 4502), a server that stops
  reading while the client pushes up to 8 MiB and then leaves (the session must end with the
  client, not at the stall limit), an unmasked frame and a bad opcode (both must close 1002);
- 20 long-lived streams through an echo server, checked byte for byte (`--stream-rate` each way);
- 5 browsers that stop reading from a server that floods them (must be dropped at the stall
  limit, 4408), reopened after each drop;

and every 5 s the relay's RSS, open descriptors and `vncgate_sessions_active`. At the end the
load stops, and the soak waits for the relay's sessions, descriptors and gauge to return to
their baseline. Everything is bounded: the run by `--minutes`, each session by timeouts, the
servers by the connections' lifetimes, and the only addresses are 127.0.0.1.

RSS drift is measured after the warm-up (`--warmup-minutes`, default min(3, minutes / 3)):
the median of the last minute of samples minus the median of the first minute after warm-up,
and the least-squares slope over all samples after warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench.candidates import free_port, wait_listening
from bench.limits import raise_fd_limit
from harness.rawws import frame, read_frame, upgrade_request

ROOT = Path(__file__).resolve().parent.parent
GREETING = b"RFB 003.008\n"
PATTERN = bytes(range(256)) * 4096 + b"vncgate"  # 1 MiB + 7: frames never align with it
KINDS = ("clean", "rst", "fin", "server_reset", "server_stuck", "unmasked", "bad_opcode")
# The mix of churn kinds, repeated (weights); the rare ones are the costly ones.
MIX = ("clean",) * 6 + ("rst",) * 3 + ("fin",) * 3 + ("server_reset",) * 2 + \
    ("server_stuck",) + ("unmasked",) + ("bad_opcode",)
STALL_TIMEOUT = 30  # the relay's --stall-timeout in the soak
STUCK_HOLD = 2 * STALL_TIMEOUT  # the non-reading server drops its connections after this


# --- the VNC servers ----------------------------------------------------------------------------

class Servers:
    """echo (flow-controlled), reset (RST after the greeting), stuck (never reads), flood."""

    def __init__(self) -> None:
        self.ports: dict[str, int] = {}
        self._servers: list[asyncio.Server] = []
        self._stuck: list[tuple[float, asyncio.StreamWriter]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for kind, handler in (("echo", self._echo), ("reset", self._reset),
                              ("stuck", self._stuck_handler), ("flood", self._flood)):
            server = await asyncio.start_server(handler, "127.0.0.1", 0, backlog=1024)
            self._servers.append(server)
            self.ports[kind] = server.sockets[0].getsockname()[1]

    def _track(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._track()
        try:
            writer.write(GREETING)
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()

    async def _reset(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(GREETING)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.transport.abort()  # with SO_LINGER 0: an RST

    async def _stuck_handler(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        writer.write(GREETING)
        writer.transport.pause_reading()
        self._stuck.append((time.monotonic(), writer))

    async def _flood(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._track()
        chunk = b"\x5a" * 65536
        try:
            writer.write(GREETING)
            async with asyncio.timeout(STALL_TIMEOUT * 4):
                while True:
                    writer.write(chunk)
                    await writer.drain()
        except (ConnectionError, TimeoutError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()

    def sweep(self) -> None:
        """Drop non-reading connections after STUCK_HOLD, to bound this process's descriptors."""
        now = time.monotonic()
        keep = []
        for since, writer in self._stuck:
            if now - since > STUCK_HOLD or writer.transport.is_closing():
                writer.transport.abort()
            else:
                keep.append((since, writer))
        self._stuck = keep

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for _, writer in self._stuck:
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# --- a WebSocket client, just enough of it -------------------------------------------------------

class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, target: str) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(upgrade_request(port, f"/t/soak/{target}/websockify"))
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            writer.transport.abort()
            raise ConnectionError(f"no upgrade: {head[:40]!r}")
        return cls(reader, writer)

    async def read_frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next frame; pings are answered."""
        while True:
            opcode, payload = await read_frame(self.reader)
            if opcode == 0x9:
                self.writer.write(frame(payload, 0xA))
                continue
            return opcode, payload

    async def read_payload(self, n: int) -> bytes:
        got = bytearray()
        while len(got) < n:
            opcode, payload = await self.read_frame()
            if opcode != 0x2:
                raise ConnectionError(f"expected data, got opcode {opcode} {payload[:40]!r}")
            got += payload
        return bytes(got)

    async def close_code(self) -> int:
        """Read until the relay's close frame (data skipped); its code."""
        while True:
            opcode, payload = await self.read_frame()
            if opcode == 0x8:
                return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005

    def abort(self, rst: bool = False) -> None:
        if rst:
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


# --- the load ----------------------------------------------------------------------------------

@dataclass
class Tally:
    ok: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    stream_bytes: int = 0
    integrity_errors: int = 0
    stream_errors: int = 0
    stalled_opened: int = 0
    stalled_dropped: int = 0

    def fail(self, kind: str, why: str) -> None:
        self.failed[kind] += 1
        if len(self.failures) < 50:
            self.failures.append(f"{kind}: {why}")


async def one_session(kind: str, port: int, tally: Tally) -> None:
    target = {"server_reset": "reset", "server_stuck": "stuck"}.get(kind, "echo")
    client: Client | None = None
    try:
        async with asyncio.timeout(20):
            client = await Client.open(port, target)
            if kind == "server_reset":
                code = await client.close_code()
                if code != 4502:
                    raise AssertionError(f"close {code}, not 4502")
            else:
                if await client.read_payload(12) != GREETING:
                    raise AssertionError("no greeting")
                await session_body(kind, client)
        tally.ok[kind] += 1
    except (Exception, TimeoutError) as exc:
        tally.fail(kind, f"{type(exc).__name__}: {exc}")
    finally:
        if client is not None:
            client.abort()


async def session_body(kind: str, client: Client) -> None:
    if kind in ("unmasked", "bad_opcode"):
        client.writer.write(frame(b"abc", masked=False) if kind == "unmasked"
                            else frame(b"abc", opcode=0x3))
        code = await client.close_code()
        if code != 1002:
            raise AssertionError(f"close {code}, not 1002")
        return
    if kind == "server_stuck":
        # Push until the relay stops taking bytes (or 8 MiB), then leave with a close frame.
        chunk = frame(b"\x11" * 65536)
        for _ in range(128):
            client.writer.write(chunk)
            try:
                async with asyncio.timeout(0.5):
                    await client.writer.drain()
            except TimeoutError:
                break
        client.writer.transport.write(frame(struct.pack("!H", 1000), 0x8))
        return  # the relay's session must end now; the relay's log says when it did
    message = os.urandom(1 + int.from_bytes(os.urandom(2), "big") % 4096)
    client.writer.write(frame(message))
    if await client.read_payload(len(message)) != message:
        raise AssertionError("echo differs")
    if kind == "clean":
        client.writer.write(frame(struct.pack("!H", 1000), 0x8))
        code = await client.close_code()
        if code != 1000:
            raise AssertionError(f"close {code}, not 1000")
    elif kind == "rst":
        client.abort(rst=True)
    elif kind == "fin":
        client.writer.write_eof()
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await client.close_code()  # the relay closes; EOF is as good as a close frame


async def churn(port: int, rate: float, until: float, tally: Tally) -> None:
    tasks: set[asyncio.Task[None]] = set()
    started, n = time.monotonic(), 0
    while time.monotonic() < until:
        kind = MIX[n % len(MIX)]
        task = asyncio.create_task(one_session(kind, port, tally))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
        delay = started + n / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) > rate * 30:  # the relay is far behind: do not pile up more
            await asyncio.sleep(1)
    await asyncio.gather(*tasks, return_exceptions=True)


async def long_stream(port: int, index: int, bytes_per_s: int, until: float,
                      tally: Tally) -> None:
    """One echo stream, checked byte for byte, for the whole run (reopened after an error)."""
    size = 16384
    offset = index * 4099
    while time.monotonic() < until:
        client: Client | None = None
        try:
            client = await Client.open(port, "echo")
            if await client.read_payload(12) != GREETING:
                raise AssertionError("no greeting")
            next_at = time.monotonic()
            while time.monotonic() < until:
                start = offset % (len(PATTERN) - size)
                piece = PATTERN[start:start + size]
                client.writer.write(frame(piece))
                echoed = await asyncio.wait_for(client.read_payload(size), 30)
                if echoed != piece:
                    tally.integrity_errors += 1
                tally.stream_bytes += size
                offset += size
                next_at += size / bytes_per_s
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            client.writer.write(frame(struct.pack("!H", 1000), 0x8))
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close_code(), 5)
        except (Exception, TimeoutError) as exc:
            tally.stream_errors += 1
            if len(tally.failures) < 50:
                tally.failures.append(f"stream {index}: {type(exc).__name__}: {exc}")
            await asyncio.sleep(1)
        finally:
            if client is not None:
                client.abort()


async def stalled_browser(port: int, until: float, tally: Tally) -> None:
    """Opens a flood session and never reads; after the stall limit (and a margin) checks that
    the relay dropped it, then opens the next."""
    while time.monotonic() < until:
        client: Client | None = None
        try:
            client = await Client.open(port, "flood")
            tally.stalled_opened += 1
            client.writer.transport.pause_reading()
            await asyncio.sleep(min(STALL_TIMEOUT + 20, max(0.0, until - time.monotonic())))
        except (Exception, TimeoutError) as exc:
            tally.fail("stalled", f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(1)
        finally:
            if client is not None:
                client.abort()


# --- the relay and its figures -----------------------------------------------------------------

@dataclass
class Sample:
    t: float
    rss: int
    fds: int
    sessions: float


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def gauge(http: aiohttp.ClientSession, internal: int) -> float:
    async with http.get(f"http://127.0.0.1:{internal}/metrics") as response:
        text = await response.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vncgate_sessions_active{"))


async def sample(proc: psutil.Process, http: aiohttp.ClientSession, internal: int,
                 t0: float) -> Sample:
    # The scrape first: its keep-alive connection is then in every sample, the baseline's too.
    sessions = await gauge(http, internal)
    info = proc.memory_info()
    return Sample(time.monotonic() - t0, info.rss, proc.num_fds(), sessions)


def drift(samples: list[Sample], warmup: float) -> dict[str, float]:
    after = [s for s in samples if s.t >= warmup]
    if len(after) < 4:
        return {}
    first = [s.rss for s in after if s.t < after[0].t + 60]
    last = [s.rss for s in after if s.t > after[-1].t - 60]
    ts = [s.t / 60 for s in after]
    rs = [s.rss / 2**20 for s in after]
    slope = statistics.linear_regression(ts, rs).slope
    return {"rss_after_warmup_MiB": statistics.median(first) / 2**20,
            "rss_end_of_load_MiB": statistics.median(last) / 2**20,
            "rss_drift_MiB": (statistics.median(last) - statistics.median(first)) / 2**20,
            "rss_slope_MiB_per_min": slope}


def relay_endings(log_path: Path) -> dict[str, Any]:
    """Codes and the longest durations per target, from the relay's own session-end lines."""
    codes: dict[str, Counter[int]] = {}
    longest: dict[str, float] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("message") != "session end" and entry.get("msg") != "session end":
            continue
        target = str(entry.get("target", ""))
        codes.setdefault(target, Counter())[int(entry.get("code", 0))] += 1
        longest[target] = max(longest.get(target, 0.0), float(entry.get("duration_s", 0)))
    return {"codes": {t: dict(c) for t, c in codes.items()}, "longest_s": longest}


def growth(workdir: Path, top: int = 15) -> list[str]:
    """What grew between the snapshot after warm-up and the one back at baseline."""
    import tracemalloc
    paths = sorted(workdir.glob("snapshot-*.pickle"))
    if len(paths) < 2:
        return [f"only {len(paths)} snapshot(s) in {workdir}"]
    first = tracemalloc.Snapshot.load(str(paths[0]))
    last = tracemalloc.Snapshot.load(str(paths[-1]))
    stats = last.compare_to(first, "traceback")
    total = sum(stat.size_diff for stat in stats)
    lines = [f"total traced growth: {total / 1024:.1f} KiB"]
    for stat in stats[:top]:
        where = " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}"
                            for f in list(stat.traceback)[-4:])
        lines.append(f"{stat.size_diff / 1024:+.1f} KiB ({stat.count_diff:+d}): {where}")
    return lines


async def run(args: argparse.Namespace) -> dict[str, Any]:
    servers = Servers()
    await servers.start()
    public, internal = free_port(), free_port()
    workdir = Path(tempfile.mkdtemp(prefix="vncgate-soak-"))
    log_path = workdir / "relay.log"
    argv = [sys.executable]
    if args.tracemalloc:
        argv += ["-X", "tracemalloc=25", "-m", "bench.soak_relay",
                 "--snapshot-dir", str(workdir)]
    else:
        argv += ["-m", "vncgate.relay"]
    argv += [f"--listen=127.0.0.1:{public}", f"--internal-listen=127.0.0.1:{internal}",
             "--log-format=json", f"--stall-timeout={STALL_TIMEOUT}s", "--max-sessions=20000",
             "--max-sessions-per-target=10000"]
    argv += [f"--target=soak/{kind}=127.0.0.1:{port}" for kind, port in servers.ports.items()]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=log_file,  # noqa: ASYNC220 - starts and returns
                                cwd=ROOT)
    relay = psutil.Process(proc.pid)
    samples: list[Sample] = []
    tally = Tally()
    minutes = args.minutes
    warmup = 60 * (args.warmup_minutes if args.warmup_minutes is not None
                   else min(3.0, minutes / 3))
    load: list[asyncio.Task[None]] = []
    try:
        await wait_listening(public, proc)
        async with aiohttp.ClientSession() as http:
            await asyncio.sleep(1)
            t0 = time.monotonic()
            baseline = await sample(relay, http, internal, t0)
            until = t0 + 60 * minutes
            say(f"soak: {minutes:g} min at {args.rate:g} sessions/s; relay pid {proc.pid}, "
                f"log {log_path}")
            load += [asyncio.create_task(churn(public, args.rate, until, tally))]
            load += [asyncio.create_task(long_stream(public, i, args.stream_rate, until, tally))
                     for i in range(args.streams)]
            load += [asyncio.create_task(stalled_browser(public, until, tally))
                     for _ in range(args.stalled)]
            snapshot_at_warmup = args.tracemalloc
            while time.monotonic() < until:
                await asyncio.sleep(5)
                servers.sweep()
                samples.append(await sample(relay, http, internal, t0))
                s = samples[-1]
                if snapshot_at_warmup and s.t >= warmup:
                    proc.send_signal(signal.SIGUSR1)  # snapshot-0: after the warm-up
                    snapshot_at_warmup = False
                if len(samples) % 12 == 0:
                    say(f"  {s.t / 60:5.1f} min: rss {s.rss / 2**20:.1f} MiB, fds {s.fds}, "
                        f"sessions {s.sessions:g}, ok {sum(tally.ok.values())}, "
                        f"failed {sum(tally.failed.values())}, "
                        f"streamed {tally.stream_bytes / 2**20:.0f} MiB")
            await asyncio.gather(*load, return_exceptions=True)
            end_of_load = time.monotonic() - t0
            # Back to baseline: the stuck servers' and stalled browsers' sessions must end too.
            await servers.close()
            settle_deadline = time.monotonic() + STALL_TIMEOUT + 30
            final = await sample(relay, http, internal, t0)
            while time.monotonic() < settle_deadline and (
                    final.sessions > baseline.sessions or final.fds > baseline.fds):
                await asyncio.sleep(1)
                final = await sample(relay, http, internal, t0)
            if args.tracemalloc:
                proc.send_signal(signal.SIGUSR1)  # snapshot-1: back at baseline
                await asyncio.sleep(10)
    finally:
        for task in load:
            task.cancel()
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        with contextlib.suppress(Exception):
            await servers.close()
    result: dict[str, Any] = {
        "command": " ".join(["python -m bench.soak", f"--minutes {minutes:g}",
                             f"--rate {args.rate:g}"]),
        "minutes": minutes, "warmup_minutes": warmup / 60, "rate": args.rate,
        "load_seconds": round(end_of_load, 1),
        "sessions_ok": dict(tally.ok), "sessions_failed": dict(tally.failed),
        "failures": tally.failures,
        "streams": args.streams, "stream_MiB_each_way": tally.stream_bytes / 2**20,
        "integrity_errors": tally.integrity_errors, "stream_errors": tally.stream_errors,
        "stalled_browsers_opened": tally.stalled_opened,
        "baseline": {"rss_MiB": baseline.rss / 2**20, "fds": baseline.fds,
                     "sessions": baseline.sessions},
        "final": {"rss_MiB": final.rss / 2**20, "fds": final.fds, "sessions": final.sessions},
        "max_sessions_gauge": max((s.sessions for s in samples), default=0),
        "max_fds": max((s.fds for s in samples), default=0),
        **drift(samples, warmup),
        "relay_exit_code": proc.returncode,
        "relay_endings": relay_endings(log_path),
        "relay_log": str(log_path),
        "tracemalloc_growth": growth(workdir) if args.tracemalloc else [],
        "samples": [[round(s.t, 1), s.rss, s.fds, s.sessions] for s in samples],
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=50.0, help="churn sessions per second")
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--stream-rate", type=int, default=256 * 1024,
                        help="bytes per second each long stream sends (and gets back)")
    parser.add_argument("--stalled", type=int, default=5)
    parser.add_argument("--warmup-minutes", type=float, default=None)
    parser.add_argument("--tracemalloc", action="store_true",
                        help="run the relay under tracemalloc; snapshots' top growth in the JSON")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not 0 < args.minutes <= 240 or not 0 < args.rate <= 500:
        parser.error("--minutes in (0, 240], --rate in (0, 500]")
    raise_fd_limit()
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=1)
    if args.json is not None:
        args.json.write_text(text)
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
