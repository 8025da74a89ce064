"""Session set-up with the state the replicas share, against one replica alone.

One real Xvnc; a console with `maxViewers` and `interactive: first` (the routes whose sessions
take seats: a slot and the control); `vncgate-relay` processes on loopback: one alone (seats in
its memory), three that know each other (`--peer-url`) and hold seats as Leases in a real
kube-apiserver (harness/cluster.py: etcd without fsync, so an etcd commit costs less than on
a cluster's disks), as the chart runs them, and three with `--peer-url` only (no Leases: the
viewers counted over the peers, fail open). A client opens the viewer's WebSocket and times it
until ServerInit has arrived (bench/security_setup.py's `one_session`), sequential sessions
dealt round-robin over the replicas, the set-ups interleaved round by round so that a shared
machine's noise falls on all. Prints median and p99 side by side, and the ratio.

    .venv/bin/python -m bench.replicas_setup --sessions 300 --rounds 3

Not measured here: the single-use link exchange and the sign-out, which write a Lease to the
API server once per link or sign-out, not per session.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import yaml

from bench.security_setup import one_session
from harness import reaper
from harness.cluster import ControlPlane, free_port
from harness.xvnc import XvncServer

BIN = Path(sys.executable).parent
TOKEN = "bench-registration-token-0123456789"  # noqa: S105 - the throw-away relays'


class Relays:
    """`count` relay processes that know each other; `urls`: their public addresses,
    `internal_urls`: their internal ones (registration API). `targets` None: no manifest, the
    routes come from an operator; `extra`: more flags for each (e.g. another --auth)."""

    def __init__(self, workdir: Path, targets: Path | None, count: int,
                 leases: tuple[Path, str] | None = None, extra: Sequence[str] = ()) -> None:
        ports = [(free_port(), free_port()) for _ in range(count)]
        (workdir / "token").write_text(TOKEN)
        self.urls = [f"http://127.0.0.1:{public}" for public, _ in ports]
        self.internal_urls = [f"http://127.0.0.1:{internal}" for _, internal in ports]
        self.argvs = []
        for index, (public, internal) in enumerate(ports):
            peers = [f"--peer-url=http://127.0.0.1:{other}"
                     for n, (_, other) in enumerate(ports) if n != index]
            self.argvs.append([str(BIN / "vncgate-relay"), f"--listen=127.0.0.1:{public}",
                               f"--internal-listen=127.0.0.1:{internal}",
                               *(extra if any(a.startswith("--auth") for a in extra)
                                 else ["--auth=none", *extra]),
                               *([f"--targets={targets}"] if targets is not None else []),
                               f"--api-token-file={workdir / 'token'}",
                               f"--identity=bench-{workdir.name}-{index}",
                               "--log-level=WARNING", *peers,
                               *([f"--kubeconfig={leases[0]}", f"--lease-namespace={leases[1]}"]
                                 if leases is not None else [])])
        self.logs = [workdir / f"relay-{index}.log" for index in range(count)]
        self.procs: list[subprocess.Popen[bytes]] = []

    async def __aenter__(self) -> Relays:
        self.procs = [reaper.popen(argv, stdout=subprocess.DEVNULL, stderr=log.open("ab"))
                      for argv, log in zip(self.argvs, self.logs, strict=True)]
        async with aiohttp.ClientSession() as http:
            for url in self.urls:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        async with http.get(f"{url}/readyz") as reply:
                            if reply.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    if time.monotonic() > deadline:
                        logs = "".join(log.read_text()[-2000:] for log in self.logs)
                        raise RuntimeError(f"the relay at {url} did not turn ready:\n{logs}")
                    await asyncio.sleep(0.1)
        return self

    async def __aexit__(self, *_: object) -> None:
        for proc in self.procs:
            reaper.end(proc)


async def batch(relays: Relays, sessions: int) -> list[float]:
    times = []
    for n in range(sessions):
        url = relays.urls[n % len(relays.urls)]
        times.append(await one_session(f"{url}/t/bench/desk/websockify"))
    return times


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=300, help="per set-up and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, XvncServer() as xvnc:
        folder = Path(tmp)
        plane = ControlPlane(folder / "control-plane", controller_manager=False).start()
        try:
            plane.kubectl("create", "namespace", "vncgate-bench")
            results = measure(folder, xvnc, (plane.admin_kubeconfig, "vncgate-bench"), args)
        finally:
            plane.close()
    labels = {"one": "one replica alone", "leases": "three replicas, seats as Leases",
              "peers": "three replicas, peers only (no Leases)"}
    base_median, base_p99 = statistics.median(results["one"]), p99(results["one"])
    print(f"| session set-up to ServerInit ({len(results['one'])} sessions each) "
          "| median ms | p99 ms | median vs one | p99 vs one |")
    print("|---|---|---|---|---|")
    for name, times in results.items():
        print(f"| {labels[name]} | {statistics.median(times) * 1000:.2f} | "
              f"{p99(times) * 1000:.2f} | {statistics.median(times) / base_median:.2f}x | "
              f"{p99(times) / base_p99:.2f}x |")


def measure(folder: Path, xvnc: XvncServer, leases: tuple[Path, str],
            args: argparse.Namespace) -> dict[str, list[float]]:
    targets = folder / "targets.yaml"
    targets.write_text(yaml.safe_dump({
        "apiVersion": "vncgate.io/v1alpha1", "kind": "VncTarget",
        "metadata": {"name": "desk", "namespace": "bench"},
        "spec": {"endpoint": {"address": {"host": "127.0.0.1", "port": xvnc.port}},
                 "sessions": {"mode": "shared", "maxViewers": 1000, "interactive": "first"}}}))
    for name in ("one", "leases", "peers"):
        (folder / name).mkdir()

    async def run() -> dict[str, list[float]]:
        results: dict[str, list[float]] = {"one": [], "leases": [], "peers": []}
        async with Relays(folder / "one", targets, 1) as one, \
                Relays(folder / "leases", targets, 3, leases) as with_leases, \
                Relays(folder / "peers", targets, 3) as peers:
            order = [("one", one), ("leases", with_leases), ("peers", peers)]
            for _, relays in order:
                await batch(relays, 5)  # warm-up
            for round_ in range(args.rounds):
                for name, relays in order if round_ % 2 == 0 else order[::-1]:
                    results[name] += await batch(relays, args.sessions)
        return results

    return asyncio.run(run())


if __name__ == "__main__":
    main()
