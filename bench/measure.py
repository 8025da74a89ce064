"""The measurements: each opens its own sessions, measures, closes them, and returns figures.

Every loop is bounded in count and in time; every session goes to a backend on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from dataclasses import dataclass

import psutil

from bench.candidates import Candidate
from bench.client import Conn, connect, ws_frame

MB = 1_000_000
GIB = 1024**3
GO = b"g"  # what makes the source start streaming
# The viewer's side of the rfb backends' handshake: RFB 3.8, security None, ClientInit (shared).
RFB_HELLO = b"RFB 003.008\n\x01\x01"


@dataclass
class Usage:
    rss: int = 0  # bytes, summed over the process tree
    pss: int = 0  # proportional: shared pages split between the processes that share them
    cpu: float = 0.0  # user + system seconds, the tree's including reaped children
    processes: int = 0


def usage(candidate: Candidate, with_pss: bool = False) -> Usage:
    root = candidate.process()
    if root is None:
        return Usage()
    result = Usage()
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return result
    for proc in procs:
        try:
            with proc.oneshot():
                times = proc.cpu_times()
                result.cpu += times.user + times.system
                if proc is root:
                    result.cpu += times.children_user + times.children_system
                if with_pss:
                    full = proc.memory_full_info()
                    result.rss += full.rss
                    result.pss += full.pss
                else:
                    result.rss += proc.memory_info().rss
                result.processes += 1
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def open_many(candidate: Candidate, kind: str, count: int, concurrency: int = 64,
                    within: float = 15.0, hello: bytes = b"") -> tuple[list[Conn], int]:
    """Open `count` sessions to `kind`, at most `concurrency` handshakes at a time; each sends
    `hello` after the greeting (the viewer's RFB handshake, for the rfb backends).

    Returns the sessions that got their greeting and the number that failed.
    """
    port, path = candidate.endpoint(kind)
    gate = asyncio.Semaphore(concurrency)
    opened: list[Conn] = []
    failed = 0

    async def one() -> None:
        nonlocal failed
        async with gate:
            try:
                conn, _ = await connect(port, path, within=within)
            except (OSError, TimeoutError, ConnectionError):
                failed += 1
                return
            if hello:
                conn.send(hello)
            opened.append(conn)

    await asyncio.gather(*(one() for _ in range(count)))
    return opened, failed


async def close_all(conns: list[Conn]) -> None:
    for conn in conns:
        conn.abort()
    await asyncio.sleep(0.2)


def go(candidate: Candidate, conn: Conn) -> None:
    conn.send(GO)


async def server_to_client(candidate: Candidate, sessions: int, warmup: float,
                           window: float, kind: str = "source") -> dict[str, float]:
    """`kind` source: as fast as the relay takes it; rfb: RFB updates at the backend's rate."""
    hello = RFB_HELLO if kind == "rfb" else b""
    conns, failed = await open_many(candidate, kind, sessions, hello=hello)
    try:
        for conn in conns:
            if not hello:
                go(candidate, conn)
        await asyncio.sleep(warmup)
        before_bytes, before = sum(c.received for c in conns), usage(candidate)
        started = time.perf_counter()
        await asyncio.sleep(window)
        elapsed = time.perf_counter() - started
        moved, after = sum(c.received for c in conns) - before_bytes, usage(candidate)
    finally:
        await close_all(conns)
    cpu = after.cpu - before.cpu
    return {"MB/s": moved / elapsed / MB, "failed": failed,
            "cpu_s_per_GiB": cpu / (moved / GIB) if moved and candidate.proc else float("nan")}


async def client_to_server(candidate: Candidate, sessions: int, warmup: float, window: float,
                           message: int) -> dict[str, float]:
    conns, failed = await open_many(candidate, "sink", sessions)
    payload = bytes(range(256)) * (message // 256)
    data = ws_frame(payload) if candidate.websocket else payload
    sent = [0] * len(conns)
    deadline = time.monotonic() + warmup + window + 1

    async def push(i: int, conn: Conn) -> None:
        while conn.alive and time.monotonic() < deadline:
            conn.send_prebuilt(data)
            sent[i] += len(payload)
            await conn.writable()
            await asyncio.sleep(0)

    def delivered() -> int:
        return sum(sent[i] - (c.transport.get_write_buffer_size() if c.transport else 0)
                   for i, c in enumerate(conns))

    pushers = [asyncio.create_task(push(i, c)) for i, c in enumerate(conns)]
    try:
        await asyncio.sleep(warmup)
        before_bytes, before = delivered(), usage(candidate)
        started = time.perf_counter()
        await asyncio.sleep(window)
        elapsed = time.perf_counter() - started
        moved, after = delivered() - before_bytes, usage(candidate)
    finally:
        for task in pushers:
            task.cancel()
        await asyncio.gather(*pushers, return_exceptions=True)
        await close_all(conns)
    cpu = after.cpu - before.cpu
    return {"MB/s": moved / elapsed / MB, "failed": failed,
            "cpu_s_per_GiB": cpu / (moved / GIB) if moved and candidate.proc else float("nan")}


async def latency(candidate: Candidate, count: int, size: int = 100) -> dict[str, float]:
    port, path = candidate.endpoint("echo")
    conn, _ = await connect(port, path)
    message = bytes(range(size % 256)) + bytes(size - size % 256)
    times = []
    try:
        for _ in range(count):
            got = conn.expect(size)
            started = time.perf_counter()
            conn.send(message)
            async with asyncio.timeout(10):
                await got
            times.append(time.perf_counter() - started)
    finally:
        conn.abort()
    return {"median_us": statistics.median(times) * 1e6, "p99_us": percentile(times, 0.99) * 1e6}


async def setup(candidate: Candidate, count: int) -> dict[str, float]:
    """Sequential sessions to the echo backend: TCP connect to the greeting's last byte, and
    (WebSocket candidates) TCP connect to the 101 response's last byte, the handshake."""
    port, path = candidate.endpoint("echo")
    times = []
    handshakes = []
    failed = 0
    before = usage(candidate)
    for _ in range(count):
        try:
            conn, elapsed = await connect(port, path, within=10)
        except (OSError, TimeoutError, ConnectionError):
            failed += 1
            continue
        conn.abort()
        times.append(elapsed)
        if conn.upgraded:
            handshakes.append(conn.upgraded - conn.created)
    cpu = usage(candidate).cpu - before.cpu
    result = {"median_ms": statistics.median(times) * 1e3,
              "p99_ms": percentile(times, 0.99) * 1e3, "failed": failed,
              # The relay's CPU per session set up and closed (its process; none for direct).
              "cpu_ms_per_session": cpu / count * 1e3 if candidate.proc else float("nan")}
    if handshakes:
        result["handshake_median_ms"] = statistics.median(handshakes) * 1e3
        result["handshake_p99_ms"] = percentile(handshakes, 0.99) * 1e3
    return result


async def backpressure(candidate: Candidate, seconds: float) -> dict[str, float]:
    """A client that stops reading while the server pushes: how much the relay's memory grows."""
    await asyncio.sleep(0.5)
    before = usage(candidate, with_pss=True)
    port, path = candidate.endpoint("source")
    conn, _ = await connect(port, path)
    try:
        assert conn.transport is not None
        conn.transport.pause_reading()
        go(candidate, conn)
        peak = before
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            now = usage(candidate, with_pss=True)
            if now.pss > peak.pss:
                peak = now
        end = usage(candidate, with_pss=True)
    finally:
        conn.abort()
    return {"growth_MiB": (end.rss - before.rss) / 2**20,
            "peak_growth_MiB": (peak.rss - before.rss) / 2**20,
            "pss_growth_MiB": (end.pss - before.pss) / 2**20}


async def memory(candidate: Candidate, counts: tuple[int, ...], settle: float,
                 kind: str = "echo") -> dict[str, float]:
    """Tree memory with idle sessions (to `echo`, which greets and then waits, or to
    `rfb-idle`, which waits after ServerInit)."""
    hello = RFB_HELLO if kind == "rfb-idle" else b""
    await asyncio.sleep(settle)
    base = usage(candidate, with_pss=True)
    result: dict[str, float] = {}
    conns: list[Conn] = []
    failed = 0
    try:
        for count in counts:
            if candidate.max_idle_sessions is not None and count > candidate.max_idle_sessions:
                result[f"{count}_skipped"] = 1
                continue
            more, more_failed = await open_many(candidate, kind, count - len(conns) - failed,
                                                hello=hello)
            conns += more
            failed += more_failed
            await asyncio.sleep(settle)
            now = usage(candidate, with_pss=True)
            alive = sum(1 for c in conns if c.alive)
            result[f"{count}_alive"] = alive
            result[f"{count}_failed"] = count - alive
            result[f"{count}_rss_MiB"] = now.rss / 2**20
            result[f"{count}_pss_MiB"] = now.pss / 2**20
            result[f"{count}_KiB_per_session"] = (now.rss - base.rss) / max(alive, 1) / 1024
            result[f"{count}_pss_KiB_per_session"] = (now.pss - base.pss) / max(alive, 1) / 1024
    finally:
        with contextlib.suppress(Exception):
            await close_all(conns)
    return result
