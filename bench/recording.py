"""`python -m bench --recording`: what recording costs the relay. vncgate with and without
`--record-sessions`, against the rfb backends (bench/backends.py), rounds interleaved.

Per candidate and round: relay CPU seconds per GiB of RFB updates at a fixed rate (1 and 4
sessions; the CPU of the whole relay process, its recording writer thread included), relay
memory per idle RFB session (past ServerInit, so a recording is open for each), and, for the
recording candidate, what reached the disk: files, bytes, and how many recordings were complete
(a recording that falls behind is cut, never the session: docs/RECORDING.md).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import measure
from bench.backends import RFB_RATE
from bench.candidates import Vncgate
from vncgate.relay.recording.capture import END, SUFFIX, FormatError, read_records

ROOT = Path(__file__).resolve().parent.parent


def profile(quick: bool) -> dict[str, Any]:
    if quick:
        return {"rounds": 2, "warmup": 0.3, "window": 1.0, "idle": (100,), "settle": 0.5}
    return {"rounds": 3, "warmup": 0.5, "window": 2.0, "idle": (100, 500), "settle": 1.0}


def on_disk(directory: Path | None) -> dict[str, float]:
    """Files, compressed bytes, and complete recordings (their end record says so)."""
    files = sorted(directory.rglob(f"*{SUFFIX}")) if directory is not None else []
    complete = 0
    for path in files:
        try:
            ends = [r for r in read_records(path) if r.kind == END]
        except FormatError:
            continue
        if ends and ends[-1].json().get("complete"):
            complete += 1
    return {"files": len(files), "MiB": sum(p.stat().st_size for p in files) / 2**20,
            "complete": complete}


async def one(candidate: Vncgate, backends: dict[str, int], workdir: Path,
              p: dict[str, Any]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    await candidate.start(backends, workdir)
    try:
        await asyncio.sleep(p["settle"])
        idle = measure.usage(candidate, with_pss=True)
        figures["idle_rss_MiB"] = idle.rss / 2**20
        for n in (1, 4):
            figures[f"rfb_{n}"] = await measure.server_to_client(
                candidate, n, p["warmup"], p["window"], kind="rfb")
        figures["memory"] = await measure.memory(candidate, p["idle"], p["settle"],
                                                 kind="rfb-idle")
    finally:
        candidate.stop()  # the relay finishes its files on the way out
    figures["disk"] = on_disk(candidate.recording_dir)
    if candidate.recording_dir is not None:
        shutil.rmtree(candidate.recording_dir, ignore_errors=True)
    return figures


ROWS: list[tuple[str, tuple[str, ...]]] = [
    ("RFB updates MB/s, 1 session", ("rfb_1", "MB/s")),
    ("RFB updates MB/s, 4 sessions", ("rfb_4", "MB/s")),
    ("relay CPU s per GiB, 1 session", ("rfb_1", "cpu_s_per_GiB")),
    ("relay CPU s per GiB, 4 sessions", ("rfb_4", "cpu_s_per_GiB")),
    ("relay RSS idle, MiB", ("idle_rss_MiB",)),
]


def rows(counts: tuple[int, ...]) -> list[tuple[str, tuple[str, ...]]]:
    found = list(ROWS)
    for n in counts:
        found += [(f"{n:,} idle RFB sessions: RSS KiB per session",
                   ("memory", f"{n}_KiB_per_session")),
                  (f"{n:,} idle RFB sessions: PSS KiB per session",
                   ("memory", f"{n}_pss_KiB_per_session")),
                  (f"{n:,} idle RFB sessions: failed", ("memory", f"{n}_failed"))]
    return [*found, ("recordings written (files)", ("disk", "files")),
            ("recordings complete", ("disk", "complete")),
            ("recordings on disk, MiB", ("disk", "MiB"))]


def dig(figures: dict[str, Any], path: tuple[str, ...]) -> float:
    value: Any = figures
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return float("nan")
        value = value[key]
    return float(value)


async def run(args: Any) -> dict[str, Any]:
    from bench.__main__ import fmt, machine  # the one formatting and machine description

    p = profile(args.quick)
    if args.rounds:
        p["rounds"] = args.rounds
    candidates = [Vncgate(), Vncgate(recording=True)]
    print(f"bench --recording: 2 candidates x {p['rounds']} rounds; rfb backend at "
          f"{RFB_RATE / 2**20:.0f} MiB/s per session; idle sessions {p['idle']}",
          file=sys.stderr, flush=True)
    started = time.monotonic()
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vncgate-bench-") as tmp:
        workdir = Path(tmp)
        backends_proc = subprocess.Popen(  # noqa: ASYNC220 - starts and returns
            [sys.executable, "-m", "bench.backends"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, cwd=ROOT)
        try:
            assert backends_proc.stdout is not None
            line = await asyncio.get_running_loop().run_in_executor(
                None, backends_proc.stdout.readline)
            backends = json.loads(line)
            for r in range(p["rounds"]):
                order = candidates[r % 2:] + candidates[:r % 2]
                print(f"round {r + 1}/{p['rounds']} ({time.monotonic() - started:.0f}s)",
                      file=sys.stderr, flush=True)
                rounds.append({c.name: await one(c, backends, workdir, p) for c in order})
        finally:
            assert backends_proc.stdin is not None
            backends_proc.stdin.close()
            backends_proc.wait(timeout=10)
    names = [c.name for c in candidates]
    table_rows = rows(p["idle"])
    summary = {label: {n: statistics.median([dig(rnd[n], path) for rnd in rounds])
                       for n in names} for label, path in table_rows}
    width = max(len(label) for label, _ in table_rows)
    print(f"{'':{width}}  {'vncgate':>10}  {'+recording':>10}  {'on / off':>8}")
    for label, _ in table_rows:
        off, on = summary[label]["vncgate"], summary[label]["vncgate+recording"]
        ratio = f"{on / off:.2f}x" if off and off == off and on == on else "—"
        print(f"{label:{width}}  {fmt(off):>10}  {fmt(on):>10}  {ratio:>8}")
    elapsed = time.monotonic() - started
    print(f"\n{len(rounds)} rounds in {elapsed:.0f}s; medians over rounds")
    return {"machine": machine(), "command": " ".join(sys.argv), "profile": p,
            "rfb_rate": RFB_RATE, "elapsed_s": elapsed, "summary": summary, "rounds": rounds}

