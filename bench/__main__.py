"""`python -m bench [--quick] [--rounds N] [--json PATH]`: the relay against websockify, a
minimal aiohttp WebSocket relay, a plain asyncio pipe and direct TCP, side by side in one run; a
table on stdout, every figure in JSON.

Rounds interleave the candidates (a different order each round) so that the noise of a shared
machine falls on all of them; each figure is the median over the rounds. `--latency-only`
measures the handshake, the set-up and the round trip only; `--baseline DIR` adds the relay of
another checkout (`vncgate@base`) for an A/B of a change in the same run; `--stress N` runs
`stress-ng --cpu N` beside the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import measure
from bench.candidates import Candidate, all_candidates
from bench.limits import raise_fd_limit
from bench.loops import loop_name, new_event_loop
from bench.stress import start_stress

ROOT = Path(__file__).resolve().parent.parent
HIGHER, LOWER = "higher", "lower"


def profile(quick: bool, fd_limit: int) -> dict[str, Any]:
    # Each relayed session holds two descriptors in the relay; keep room for its listeners.
    most_sessions = min(10_000, (fd_limit - 100) // 2)
    if quick:
        return {"rounds": 3, "warmup": 0.2, "window": 0.6, "latency": 200, "setup": 50,
                "memory": (200, 1000), "settle": 0.5, "backpressure": 2.0, "message": 65536}
    return {"rounds": 3, "warmup": 0.5, "window": 2.0, "latency": 1000, "setup": 200,
            "memory": (1000, most_sessions), "settle": 1.0, "backpressure": 5.0,
            "message": 65536}


async def one_candidate(candidate: Candidate, backends: dict[str, int], workdir: Path,
                        p: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    await candidate.start(backends, workdir)
    if p.get("latency_only"):
        try:
            await asyncio.sleep(p["settle"])
            figures["setup"] = await measure.setup(candidate, p["setup"])
            figures["latency"] = await measure.latency(candidate, p["latency"])
        finally:
            candidate.stop()
        log(f"  {candidate.name}: handshake "
            f"{figures['setup'].get('handshake_median_ms', math.nan):.3f} ms, "
            f"setup {figures['setup']['median_ms']:.3f} ms, "
            f"rtt {figures['latency']['median_us']:.0f} us "
            f"(p99 {figures['latency']['p99_us']:.0f} us)")
        return figures
    try:
        await asyncio.sleep(p["settle"])
        if candidate.proc is not None:
            idle = measure.usage(candidate, with_pss=True)
            figures["idle_rss_MiB"] = idle.rss / 2**20
            figures["idle_pss_MiB"] = idle.pss / 2**20
            # On the fresh relay: after the throughput tests its heap has room to spare, and
            # a stalled session's buffers would fit in it without growing the RSS.
            figures["backpressure"] = await measure.backpressure(candidate, p["backpressure"])
        figures["setup"] = await measure.setup(candidate, p["setup"])
        figures["latency"] = await measure.latency(candidate, p["latency"])
        for n in (1, 10, 50):
            figures[f"s2c_{n}"] = await measure.server_to_client(
                candidate, n, p["warmup"], p["window"])
        for n in (1, 10):
            figures[f"c2s_{n}"] = await measure.client_to_server(
                candidate, n, p["warmup"], p["window"], p["message"])
        if candidate.proc is not None:
            figures["memory"] = await measure.memory(candidate, p["memory"], p["settle"])
    finally:
        candidate.stop()
    log(f"  {candidate.name}: s2c_1 {figures['s2c_1']['MB/s']:.0f} MB/s, "
        f"c2s_1 {figures['c2s_1']['MB/s']:.0f} MB/s, "
        f"rtt {figures['latency']['median_us']:.0f} us, "
        f"setup {figures['setup']['median_ms']:.2f} ms")
    return figures


# (row label, path into a candidate's figures, which way is better)
ROWS: list[tuple[str, tuple[str, ...], str]] = [
    ("server→client MB/s, 1 session", ("s2c_1", "MB/s"), HIGHER),
    ("server→client MB/s, 10 sessions", ("s2c_10", "MB/s"), HIGHER),
    ("server→client MB/s, 50 sessions", ("s2c_50", "MB/s"), HIGHER),
    ("client→server MB/s, 1 session", ("c2s_1", "MB/s"), HIGHER),
    ("client→server MB/s, 10 sessions", ("c2s_10", "MB/s"), HIGHER),
    ("round trip 100 B, median µs", ("latency", "median_us"), LOWER),
    ("round trip 100 B, p99 µs", ("latency", "p99_us"), LOWER),
    ("setup (handshake + greeting), median ms", ("setup", "median_ms"), LOWER),
    ("setup, p99 ms", ("setup", "p99_ms"), LOWER),
    ("WebSocket handshake (to the 101), median ms", ("setup", "handshake_median_ms"), LOWER),
    ("WebSocket handshake, p99 ms", ("setup", "handshake_p99_ms"), LOWER),
    ("relay CPU ms per session set up and closed", ("setup", "cpu_ms_per_session"), LOWER),
    ("relay CPU s per GiB, server→client", ("s2c_1", "cpu_s_per_GiB"), LOWER),
    ("relay CPU s per GiB, client→server", ("c2s_1", "cpu_s_per_GiB"), LOWER),
    ("relay RSS idle, MiB", ("idle_rss_MiB",), LOWER),
    ("relay PSS idle, MiB", ("idle_pss_MiB",), LOWER),
    ("stalled reader: RSS growth over the test, MiB", ("backpressure", "growth_MiB"), LOWER),
    ("stalled reader: PSS growth, MiB", ("backpressure", "pss_growth_MiB"), LOWER),
]


def memory_rows(counts: tuple[int, ...]) -> list[tuple[str, tuple[str, ...], str]]:
    rows = []
    for n in counts:
        rows += [(f"{n:,} idle sessions: RSS KiB per session", ("memory", f"{n}_KiB_per_session"),
                  LOWER),
                 (f"{n:,} idle sessions: PSS KiB per session",
                  ("memory", f"{n}_pss_KiB_per_session"), LOWER),
                 (f"{n:,} idle sessions: tree RSS MiB", ("memory", f"{n}_rss_MiB"), LOWER),
                 (f"{n:,} idle sessions: alive", ("memory", f"{n}_alive"), HIGHER),
                 (f"{n:,} idle sessions: failed", ("memory", f"{n}_failed"), LOWER)]
    return rows


def dig(figures: dict[str, Any], path: tuple[str, ...]) -> float:
    value: Any = figures
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return math.nan
        value = value[key]
    return float(value)


def median(values: list[float]) -> float:
    present = [v for v in values if not math.isnan(v)]
    return statistics.median(present) if present else math.nan


def fmt(value: float) -> str:
    if math.isnan(value):
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


SHORT = {"websockify": "ws", "asyncio pipe": "pipe", "aiohttp relay": "aiohttp",
         "vncgate@base": "base"}


def table(summary: dict[str, dict[str, float]], names: list[str],
          rows: list[tuple[str, tuple[str, ...], str]]) -> str:
    ours = [n for n in names if n.startswith("vncgate") and n != "vncgate@base"]
    ratio_cols = [(o, ref) for o in ours
                  for ref in ("vncgate@base", "websockify", "aiohttp relay", "asyncio pipe")
                  if ref in names]
    head = ["", *names, *(f"{o} / {SHORT[r]}" for o, r in ratio_cols)]
    lines = [head]
    for label, _, _ in rows:
        values = summary[label]
        cells = [label, *(fmt(values[n]) for n in names)]
        for o, r in ratio_cols:
            a, b = values[o], values[r]
            cells.append("—" if math.isnan(a) or math.isnan(b) or b == 0 else f"{a / b:.2f}x")
        lines.append(cells)
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = []
    for i, row in enumerate(lines):
        out.append("  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j])
                             for j, c in enumerate(row)))
        if i == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def targets(summary: dict[str, dict[str, float]], big: int) -> list[tuple[str, float, str, bool]]:
    """(what, ratio or figure, the target, met) for the targets in docs/PERFORMANCE.md, on
    vncgate's own loop; a target whose reference candidate did not run is left out."""
    v = "vncgate"

    def ratio(label: str, ref: str) -> float:
        values = summary.get(label, {})
        return values.get(v, math.nan) / values.get(ref, math.nan)

    checks = []

    def check(what: str, value: float, target: str, met: bool) -> None:
        if not math.isnan(value):
            checks.append((what, value, target, met))

    for n in (1, 10, 50):
        label = f"server→client MB/s, {n} session{'s' if n > 1 else ''}"
        r = ratio(label, "websockify")
        check(f"s→c {n}: vs websockify", r, "≥ 1.3x", r >= 1.3)
        r = ratio(label, "asyncio pipe")
        check(f"s→c {n}: vs asyncio pipe", r, "≥ 0.8x", r >= 0.8)
    for n in (1, 10):
        label = f"client→server MB/s, {n} session{'s' if n > 1 else ''}"
        r = ratio(label, "websockify")
        check(f"c→s {n}: vs websockify", r, "≥ 2.5x", r >= 2.5)
    r = ratio("round trip 100 B, median µs", "asyncio pipe")
    check("latency median vs pipe", r, "≤ 1.1x", r <= 1.1)
    r = ratio("round trip 100 B, p99 µs", "asyncio pipe")
    check("latency p99 vs pipe", r, "≤ 1.5x", r <= 1.5)
    r = ratio("setup (handshake + greeting), median ms", "asyncio pipe")
    check("setup median vs pipe", r, "≤ 1.5x", r <= 1.5)
    r = ratio("WebSocket handshake (to the 101), median ms", "aiohttp relay")
    check("handshake median vs aiohttp relay", r, "≤ 1.2x", r <= 1.2)
    r = ratio("setup (handshake + greeting), median ms", "websockify")
    check("setup median vs websockify", r, "≤ 0.2x", r <= 0.2)
    per = summary.get(f"{big:,} idle sessions: RSS KiB per session", {}).get(v, math.nan)
    check(f"KiB per idle session ({big:,})", per, "≤ 20", per <= 20)
    failed = summary.get(f"{big:,} idle sessions: failed", {}).get(v, math.nan)
    check(f"idle sessions failed ({big:,})", failed, "0", failed == 0)
    growth = summary.get("stalled reader: RSS growth over the test, MiB", {}).get(v, math.nan)
    check("stalled reader growth MiB", growth, "≤ 4", growth <= 4)
    return checks


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    versions = {}
    for package in ("aiohttp", "websockify", "uvloop", "psutil"):
        try:
            from importlib.metadata import version
            versions[package] = version(package)
        except Exception:
            versions[package] = None
    try:
        revision = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                  capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        revision = ""
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "kernel": platform.release(), "packages": versions, "git": revision,
            "bench_client_loop": loop_name()}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    fd_limit = raise_fd_limit()
    p = profile(args.quick, fd_limit)
    if args.rounds:
        p["rounds"] = args.rounds
    if args.latency_only:
        p.update(latency_only=True, memory=())
        if args.setups:
            p["setup"] = args.setups
        if args.round_trips:
            p["latency"] = args.round_trips
    names_wanted = set(args.only or [])
    candidates = [c for c in all_candidates(uvloop=loop_name() == "uvloop" and not args.no_uvloop,
                                            baseline=args.baseline)
                  if not names_wanted or c.name in names_wanted]
    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    log(f"bench: {len(candidates)} candidates x {p['rounds']} rounds; fd limit {fd_limit}; "
        f"idle sessions {p['memory']}")
    started = time.monotonic()
    stress = None
    if args.stress:
        stress = start_stress(args.stress)
    loads = [os.getloadavg()[0]]
    with contextlib.ExitStack() as stack, \
            tempfile.TemporaryDirectory(prefix="vncgate-bench-") as tmp:
        if stress is not None:
            stack.callback(stress.wait, 30)
            stack.callback(stress.terminate)
        workdir = Path(tmp)
        backends_proc = subprocess.Popen(  # noqa: ASYNC220 - starts and returns
            [sys.executable, "-m", "bench.backends"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         cwd=ROOT)
        try:
            assert backends_proc.stdout is not None
            line = await asyncio.get_running_loop().run_in_executor(
                None, backends_proc.stdout.readline)
            backends = json.loads(line)
            rounds: list[dict[str, Any]] = []
            for r in range(p["rounds"]):
                order = candidates[r % len(candidates):] + candidates[:r % len(candidates)]
                log(f"round {r + 1}/{p['rounds']} ({time.monotonic() - started:.0f}s)")
                figures = {}
                for candidate in order:
                    figures[candidate.name] = await one_candidate(candidate, backends, workdir,
                                                                  p, log)
                rounds.append(figures)
                loads.append(os.getloadavg()[0])
        finally:
            assert backends_proc.stdin is not None
            backends_proc.stdin.close()
            backends_proc.wait(timeout=10)
    names = [c.name for c in candidates]
    rows = ROWS + memory_rows(p["memory"])
    if p.get("latency_only"):
        rows = [row for row in rows if row[1][0] in ("setup", "latency")]
    summary = {label: {n: median([dig(rnd[n], path) for rnd in rounds]) for n in names}
               for label, path, _ in rows}
    print(table(summary, names, rows))
    checks: list[tuple[str, float, str, bool]] = []
    if "vncgate" in names:
        checks = targets(summary, p["memory"][-1] if p["memory"] else 0)
        print("\ntargets (vncgate on asyncio's loop; ratios within this run):")
        for what, value, target, met in checks:
            print(f"  {'met   ' if met else 'MISSED'}  {what}: {fmt(value)} (target {target})")
    elapsed = time.monotonic() - started
    print(f"\n{len(rounds)} rounds in {elapsed:.0f}s; medians over rounds; fd limit {fd_limit}; "
          f"1-minute load average {min(loads):.1f}-{max(loads):.1f} (start and after each round)"
          + (f"; stress-ng --cpu {args.stress} beside it" if args.stress else ""))
    return {"machine": machine(), "command": " ".join(sys.argv), "profile": p,
            "load_average": loads, "stress_cpu": args.stress,
            "fd_limit": fd_limit, "elapsed_s": elapsed, "summary": summary,
            "targets": [{"what": w, "value": v, "target": t, "met": m} for w, v, t, m in checks],
            "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short windows, ~1-2 minutes")
    parser.add_argument("--rounds", type=int, help="rounds (default 3)")
    parser.add_argument("--only", action="append", help="only this candidate (repeatable)")
    parser.add_argument("--no-uvloop", action="store_true",
                        help="leave out the vncgate+uvloop candidate")
    parser.add_argument("--latency-only", action="store_true",
                        help="only the handshake, set-up and round-trip figures")
    parser.add_argument("--setups", type=int,
                        help="with --latency-only: sequential set-ups per round")
    parser.add_argument("--round-trips", type=int,
                        help="with --latency-only: round trips per round")
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="also run DIR/.venv/bin/vncgate-relay as vncgate@base (another "
                             "checkout with scripts/setup run in it): A/B in one run")
    parser.add_argument("--stress", type=int, metavar="N", default=0,
                        help="run stress-ng --cpu N beside the whole run")
    parser.add_argument("--recording", action="store_true",
                        help="instead: vncgate with and without --record-sessions against an "
                             "RFB backend (CPU per GiB, memory per session; ~2 minutes)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "latest.json",
                        help="where to write every figure (default bench/results/latest.json)")
    args = parser.parse_args()
    loop = new_event_loop()
    try:
        if args.recording:
            from bench import recording
            result = loop.run_until_complete(recording.run(args))
        else:
            result = loop.run_until_complete(run(args))
    finally:
        loop.close()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
