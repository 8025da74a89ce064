"""Handshake, set-up and round trip, interleaved session by session across the candidates.

`python -m bench.interleaved [--baseline DIR] [--uvloop] [--sessions N] [--round-trips N]
[--stress N]` starts vncgate's relay, `vncgate@base` (with `--baseline`: another checkout's
relay, for an A/B of a change), `vncgate+uvloop` (with `--uvloop`: the same relay on uvloop,
bench/uvloop_relay.py), the minimal aiohttp relay and the asyncio pipe, all at once, in front of the
benchmark's echo backend (bench/backends.py), and then takes turns: one set-up on each
candidate, then the next, the order rotating each turn; then one 100-byte round trip on each
candidate's open session, turn by turn. On a machine shared with other work, load that comes
and goes falls on every candidate alike, which `python -m bench` (a candidate's whole
measurement at a time) cannot promise for figures as short as these.

Figures: medians and 99th percentiles over every sample; the relays' CPU per session (their
process's CPU over the set-ups, divided by the sessions); the 1-minute load average before and
after. Every loop is bounded in count and time; every connection goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.candidates import AiohttpRelay, Candidate, Pipe, Vncgate
from bench.client import Conn, connect, ws_frame
from bench.limits import raise_fd_limit
from bench.loops import new_event_loop
from bench.measure import percentile, usage
from bench.stress import start_stress

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 1200.0  # seconds: the whole run stops by then, whatever the counts
SIZE = 100


def _stats(values: list[float], scale: float) -> dict[str, float]:
    if not values:
        return {"median": float("nan"), "p99": float("nan"), "n": 0}
    return {"median": statistics.median(values) * scale,
            "p99": percentile(values, 0.99) * scale, "n": len(values)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    candidates: list[Candidate] = [Vncgate()]
    if args.baseline is not None:
        candidates.append(Vncgate(checkout=args.baseline))
    if args.uvloop:
        candidates.append(Vncgate(uvloop=True))
    candidates += [AiohttpRelay(), Pipe()]
    stop_at = time.monotonic() + DEADLINE
    loads = [os.getloadavg()[0]]
    setups: dict[str, list[float]] = {c.name: [] for c in candidates}
    handshakes: dict[str, list[float]] = {c.name: [] for c in candidates}
    trips: dict[str, list[float]] = {c.name: [] for c in candidates}
    cpu: dict[str, float] = {}
    with contextlib.ExitStack() as stack, \
            tempfile.TemporaryDirectory(prefix="vncgate-bench-") as tmp:
        if args.stress:
            stress = start_stress(args.stress)
            stack.callback(stress.wait, 30)
            stack.callback(stress.terminate)
        backends_proc = subprocess.Popen(  # noqa: ASYNC220 - starts and returns
            [sys.executable, "-m", "bench.backends"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, cwd=ROOT)
        assert backends_proc.stdout is not None
        assert backends_proc.stdin is not None
        stack.callback(backends_proc.wait, 10)
        stack.callback(backends_proc.stdin.close)
        line = await asyncio.get_running_loop().run_in_executor(
            None, backends_proc.stdout.readline)
        backends = json.loads(line)
        for candidate in candidates:
            await candidate.start(backends, Path(tmp))
            stack.callback(candidate.stop)
        await asyncio.sleep(1)
        before = {c.name: usage(c).cpu for c in candidates}
        for turn in range(args.sessions):
            if time.monotonic() > stop_at:
                break
            shift = turn % len(candidates)
            for candidate in candidates[shift:] + candidates[:shift]:
                port, path = candidate.endpoint("echo")
                conn, elapsed = await connect(port, path, within=10)
                conn.abort()
                setups[candidate.name].append(elapsed)
                if conn.upgraded:
                    handshakes[candidate.name].append(conn.upgraded - conn.created)
        for candidate in candidates:
            done = len(setups[candidate.name])
            cpu[candidate.name] = (usage(candidate).cpu - before[candidate.name]) / max(done, 1)
        loads.append(os.getloadavg()[0])
        conns: dict[str, Conn] = {}
        for candidate in candidates:
            port, path = candidate.endpoint("echo")
            conns[candidate.name], _ = await connect(port, path)
        message = bytes(range(SIZE))
        frame = ws_frame(message)
        try:
            for turn in range(args.round_trips):
                if time.monotonic() > stop_at:
                    break
                shift = turn % len(candidates)
                for candidate in candidates[shift:] + candidates[:shift]:
                    conn = conns[candidate.name]
                    got = conn.expect(SIZE)
                    data = frame if candidate.websocket else message
                    started = time.perf_counter()
                    conn.send_prebuilt(data)
                    async with asyncio.timeout(10):
                        await got
                    trips[candidate.name].append(time.perf_counter() - started)
        finally:
            for conn in conns.values():
                conn.abort()
        loads.append(os.getloadavg()[0])
    figures = {name: {"setup_ms": _stats(setups[name], 1e3),
                      "handshake_ms": _stats(handshakes[name], 1e3),
                      "round_trip_us": _stats(trips[name], 1e6),
                      "cpu_ms_per_session": cpu[name] * 1e3} for name in setups}
    return {"command": " ".join(sys.argv), "load_average": loads, "stress_cpu": args.stress,
            "figures": figures}


def report(result: dict[str, Any]) -> str:
    figures = result["figures"]
    names = list(figures)
    refs = [("vncgate@base", "base"), ("vncgate+uvloop", "uvloop"), ("aiohttp relay", "aiohttp"),
            ("asyncio pipe", "pipe")]
    refs = [(r, short) for r, short in refs if r in names]
    rows = [("handshake (to the 101), median ms", "handshake_ms", "median"),
            ("handshake, p99 ms", "handshake_ms", "p99"),
            ("set-up (to the greeting), median ms", "setup_ms", "median"),
            ("set-up, p99 ms", "setup_ms", "p99"),
            ("round trip 100 B, median µs", "round_trip_us", "median"),
            ("round trip 100 B, p99 µs", "round_trip_us", "p99"),
            ("relay CPU ms per session", "cpu_ms_per_session", "")]
    head = ["", *names, *(f"vncgate / {short}" for _, short in refs)]
    lines = [head]
    for label, key, stat in rows:
        values = {n: figures[n][key][stat] if stat else figures[n][key] for n in names}
        cells = [label, *(f"{values[n]:.3f}" if values[n] < 10 else f"{values[n]:,.0f}"
                          for n in names)]
        for ref, _ in refs:
            a, b = values["vncgate"], values[ref]
            cells.append(f"{a / b:.2f}x" if b == b and b > 0 and a == a else "—")
        lines.append(cells)
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j])
                     for j, c in enumerate(row)) for row in lines]
    out.insert(1, "-" * len(out[0]))
    loads = result["load_average"]
    out.append(f"\nsamples: {figures['vncgate']['setup_ms']['n']} set-ups and "
               f"{figures['vncgate']['round_trip_us']['n']} round trips per candidate; "
               f"1-minute load average {min(loads):.1f}-{max(loads):.1f}"
               + (f"; stress-ng --cpu {result['stress_cpu']} beside it"
                  if result["stress_cpu"] else ""))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.interleaved", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="also run DIR/.venv/bin/vncgate-relay as vncgate@base")
    parser.add_argument("--sessions", type=int, default=1000,
                        help="set-ups per candidate (1000)")
    parser.add_argument("--round-trips", type=int, default=5000,
                        help="round trips per candidate (5000)")
    parser.add_argument("--uvloop", action="store_true",
                        help="also run vncgate's relay on uvloop (vncgate+uvloop)")
    parser.add_argument("--stress", type=int, metavar="N", default=0,
                        help="run stress-ng --cpu N beside the whole run")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    raise_fd_limit()
    loop = new_event_loop()
    try:
        result = loop.run_until_complete(run(args))
    finally:
        loop.close()
    print(report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
