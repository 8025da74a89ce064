"""Memory per idle session of vncgate's relay and another checkout's, fresh relays in turns.

`python -m bench.idle_memory --baseline DIR [--rounds N] [--sessions N,N]` starts vncgate's
relay, opens idle sessions to the benchmark's echo backend (it greets, then waits) and reads the
relay's RSS (bench.measure.memory), stops it, then does the same with `DIR`'s relay
(`vncgate@base`), the order alternating each round. `python -m bench` measures idle sessions
after the throughput tests, on a heap they have grown and left with room to spare, which moves
a per-session figure by more than a small change makes; here each relay is fresh. Every loop is
bounded in count; every connection goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.candidates import Candidate, Vncgate
from bench.limits import raise_fd_limit
from bench.measure import memory

ROOT = Path(__file__).resolve().parent.parent


async def run(baseline: Path, rounds: int, counts: tuple[int, ...]) -> dict[str, list[float]]:
    backends_proc = subprocess.Popen(  # noqa: ASYNC220 - starts and returns
        [sys.executable, "-m", "bench.backends"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        cwd=ROOT)
    figures: dict[str, list[float]] = {}
    try:
        assert backends_proc.stdout is not None
        line = await asyncio.get_running_loop().run_in_executor(
            None, backends_proc.stdout.readline)
        backends = json.loads(line)
        for turn in range(rounds):
            candidates: list[Candidate] = [Vncgate(), Vncgate(checkout=baseline)]
            if turn % 2:
                candidates.reverse()
            for candidate in candidates:
                with tempfile.TemporaryDirectory(prefix="vncgate-bench-") as workdir:
                    await candidate.start(backends, Path(workdir))
                    try:
                        result = await memory(candidate, counts, 0.5)
                    finally:
                        candidate.stop()
                for count in counts:
                    key = f"{candidate.name}, {count:,} sessions"
                    if result.get(f"{count}_failed", 1) != 0:
                        raise RuntimeError(f"{key}: {result.get(f'{count}_failed')} failed")
                    figures.setdefault(key, []).append(result[f"{count}_KiB_per_session"])
                print(f"round {turn + 1}/{rounds}: {candidate.name} " + ", ".join(
                    f"{count:,}: {result[f'{count}_KiB_per_session']:.1f} KiB"
                    for count in counts), flush=True)
    finally:
        assert backends_proc.stdin is not None
        backends_proc.stdin.close()
        backends_proc.wait(timeout=10)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.idle_memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, metavar="DIR",
                        help="run DIR/.venv/bin/vncgate-relay as vncgate@base")
    parser.add_argument("--rounds", type=int, default=4, help="rounds (4; at most 20)")
    parser.add_argument("--sessions", default="200,1000",
                        help="idle session counts, ascending (200,1000; at most 5,000)")
    args = parser.parse_args()
    counts = tuple(int(n) for n in args.sessions.split(","))
    if not 1 <= args.rounds <= 20 or not counts or max(counts) > 5000:
        parser.error("--rounds 1-20, --sessions up to 5,000")
    if raise_fd_limit() < 2 * max(counts) + 200:
        parser.error("the file descriptor limit is too low for that many sessions")
    load = os.getloadavg()[0]
    figures = asyncio.run(run(args.baseline, args.rounds, counts))
    print(f"\nKiB of relay RSS per idle session, median over {args.rounds} rounds (and range); "
          f"1-minute load average {load:.1f}-{os.getloadavg()[0]:.1f}")
    for key, values in figures.items():
        print(f"  {key}: {statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})")


if __name__ == "__main__":
    main()
