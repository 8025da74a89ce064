"""`python -m bench.operator --api-server real`: the operator against a real kube-apiserver.

The control plane is the one the tests use (`harness/cluster.py`: etcd + kube-apiserver
from ../shared/envtest, unpacked by scripts/setup; no controller manager, so that the only
other client of the API server in the steady-state window is the API server itself). The
operator runs as `vncgate-operator` does, in a process of its own (`python -m
vncgate.operator.cli`, credentials from $KUBECONFIG), so its RSS and CPU are its own. One relay
(`RelayServer`) and an RFB greeter run in this process, on 127.0.0.1.

Measures, for each size N (targets created at --rate per second over 10 namespaces):
- operator RSS before the burst, after it (every target Ready, operator idle), and after a
  restart of the operator with the N targets present; KiB per target;
- create → Ready (the first watch event showing phase Ready) p50 / p95 during the burst, and
  for single applies afterwards;
- the relay emptied (as a restarted replica): the time until it holds N routes again;
- steady state: API requests per second (every verb but WATCH, from the API server's
  `apiserver_request_total`) and operator CPU over a quiet window.

Only 127.0.0.1 receives traffic. Every wait and every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

from bench.targetwatch import TargetWatch
from harness import reaper
from harness.cluster import ROOT, ControlPlane
from harness.servers import TcpServer, passwordless_vnc
from vncgate.common.addresses import Address
from vncgate.common.kube import KubeClient, kube_connection
from vncgate.operator import memory
from vncgate.relay.settings import RelaySettings
from vncgate.relay.web.server import RelayServer

MiB = 2**20
TOKEN = "r" * 32
NAMESPACES = 10
TARGETS = "/apis/vncgate.io/v1alpha1/namespaces/{ns}/vnctargets"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Operator:
    """`vncgate-operator` in a child process (harness/reaper.py: ended with this one)."""

    def __init__(self, plane: ControlPlane, relay_urls: Sequence[str], token_file: Path,
                 log: Path, probe_interval: float, resync_interval: float) -> None:
        self.argv = [sys.executable, "-m", "vncgate.operator.cli",
                     *(f"--relay-url={url}" for url in relay_urls),
                     "--api-token-file", str(token_file),
                     "--allow-cidr", "127.0.0.1/32", "--liveness", "off", "--standalone",
                     "--public-url", "https://vnc.example.com",
                     "--probe-interval", f"{probe_interval}s",
                     "--resync-interval", f"{resync_interval}s"]
        self.env = {**os.environ, "KUBECONFIG": str(plane.admin_kubeconfig),
                    "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'operator'}"}
        self.env.pop("KUBERNETES_SERVICE_HOST", None)
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> psutil.Process:
        with self.log.open("ab") as out:
            self.proc = reaper.popen(self.argv, env=self.env, stdout=out,
                                     stderr=subprocess.STDOUT)
        return psutil.Process(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None:
            reaper.end(self.proc, grace=20)
        self.proc = None


async def settle(proc: psutil.Process, quiet: float = 2.0, within: float = 120.0) -> None:
    """Until the operator's CPU stays under 5% for `quiet` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        before = sum(proc.cpu_times()[:2])
        await asyncio.sleep(quiet)
        if sum(proc.cpu_times()[:2]) - before < 0.05 * quiet:
            return


def body(namespace: str, name: str, port: int) -> dict[str, Any]:
    return {"apiVersion": "vncgate.io/v1alpha1", "kind": "VncTarget",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"endpoint": {"address": {"host": "127.0.0.1", "port": port}}}}


async def create_paced(kube: KubeClient, keys: list[str], port: int,
                       rate: float) -> dict[str, float]:
    """Create every key at `rate` per second; the monotonic time of each create request."""
    created: dict[str, float] = {}
    start = time.monotonic()
    pending: set[asyncio.Task[Any]] = set()
    for index, key in enumerate(keys):
        delay = start + index / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        namespace, name = key.split("/")
        created[key] = time.monotonic()
        pending.add(asyncio.create_task(kube.request("POST", TARGETS.format(ns=namespace),
                                                     body(namespace, name, port))))
        done = {t for t in pending if t.done()}
        for task in done:
            task.result()
        pending -= done
    await asyncio.gather(*pending)
    return created


async def api_requests(plane: ControlPlane) -> float:
    """Every request the API server counted so far, WATCH excluded."""
    text = (await asyncio.to_thread(plane.kubectl, "get", "--raw", "/metrics")).stdout
    total = 0.0
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{") and 'verb="WATCH"' not in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@contextlib.asynccontextmanager
async def control_plane(workdir: Path, prepare: Callable[[ControlPlane], None] | None = None
                        ) -> AsyncIterator[tuple[ControlPlane, KubeClient]]:
    """etcd + kube-apiserver (no controller manager) with the CRDs and the namespaces
    bench-0..9, then `prepare(plane)`; a client of it as admin."""
    plane = ControlPlane(workdir / "plane", controller_manager=False).start()
    try:
        plane.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                      "crd/vnctargets.vncgate.io")
        for index in range(NAMESPACES):
            plane.kubectl("create", "namespace", f"bench-{index}")
        if prepare is not None:
            prepare(plane)
        # The benchmark's own writer, not a part measured: aiohttp's former default of 100
        # connections, so that paced creation is not held back (and figures compare with runs
        # before the relay's pool was bounded).
        kube = KubeClient(kube_connection(plane.admin_kubeconfig), timeout=30,
                          max_connections=100)
        try:
            yield plane, kube
        finally:
            await kube.close()
    finally:
        plane.close()


@contextlib.asynccontextmanager
async def environment(workdir: Path) -> AsyncIterator[tuple[ControlPlane, KubeClient,
                                                            RelayServer, TcpServer]]:
    async with control_plane(workdir) as (plane, kube), TcpServer(passwordless_vnc) as greeter, \
            RelayServer(RelaySettings(listen=Address("127.0.0.1", 0),
                                      internal_listen=Address("127.0.0.1", 0),
                                      api_token=TOKEN)) as relay:
        yield plane, kube, relay, greeter


async def run_size(count: int, rate: float, singles: int, quiet: float, within: float,
                   probe_interval: float, resync_interval: float, logdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"targets": count, "rate_per_s": rate}
    with tempfile.TemporaryDirectory(prefix="vncgate-bench-") as tmp:
        workdir = Path(tmp)
        token_file = workdir / "token"
        token_file.write_text(TOKEN)
        async with environment(workdir) as (plane, kube, relay, greeter), TargetWatch(kube) as seen:
            operator = Operator(plane, [relay.internal_url], token_file,
                                logdir / f"operator-real-{count}.log", probe_interval,
                                resync_interval)
            proc = operator.start()
            try:
                await asyncio.sleep(3)
                await settle(proc)
                out["rss_idle_MiB"] = proc.memory_info().rss / MiB
                keys = [f"bench-{i % NAMESPACES}/t-{i}" for i in range(count)]
                cpu0 = sum(proc.cpu_times()[:2])
                created = await create_paced(kube, keys, greeter.port, rate)
                await seen.wait(keys, within)
                latencies = [seen.ready_at[k] - created[k] for k in keys]
                out["all_ready_s"] = max(seen.ready_at[k] for k in keys) - min(created.values())
                out["burst_ready_p50_s"] = statistics.median(latencies)
                out["burst_ready_p95_s"] = pct(latencies, 0.95)
                out["burst_ready_max_s"] = max(latencies)
                await settle(proc)
                burst_cpu = sum(proc.cpu_times()[:2]) - cpu0
                out["operator_cpu_per_target_ms"] = 1000 * burst_cpu / count
                out["rss_after_burst_MiB"] = proc.memory_info().rss / MiB
                out["rss_per_target_KiB"] = ((out["rss_after_burst_MiB"] - out["rss_idle_MiB"])
                                             * 1024 / count)
                # Single applies with N present.
                singles_s = []
                for index in range(singles):
                    key = f"bench-0/single-{index}"
                    t0 = time.monotonic()
                    await kube.request("POST", TARGETS.format(ns="bench-0"),
                                       body("bench-0", key.split("/")[1], greeter.port))
                    await seen.wait([key], 30)
                    singles_s.append(seen.ready_at[key] - t0)
                    await asyncio.sleep(0.3)
                out["single_ready_p50_s"] = statistics.median(singles_s)
                out["single_ready_max_s"] = max(singles_s)
                # The relay loses its table (as a restarted replica would).
                total = len(relay.registry)
                t0 = time.monotonic()
                relay.registry.replace([])
                deadline = t0 + 60
                while len(relay.registry) < total and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)  # (polls another component's table)
                out["relay_refill_s"] = time.monotonic() - t0
                out["relay_refill_routes"] = len(relay.registry)
                # Steady state: nothing changes; count the API server's requests.
                await settle(proc)
                requests0, cpu0, t0 = (await api_requests(plane),
                                       sum(proc.cpu_times()[:2]), time.monotonic())
                await asyncio.sleep(quiet)
                elapsed = time.monotonic() - t0
                requests1 = await api_requests(plane)
                # (the first metrics read is counted in the second: one request less)
                out["steady_api_requests_per_s"] = (requests1 - requests0 - 1) / elapsed
                out["steady_operator_cpu_pct"] = (100 * (sum(proc.cpu_times()[:2]) - cpu0)
                                                  / elapsed)
                out["rss_steady_MiB"] = proc.memory_info().rss / MiB
                # A restart with every target present.
                operator.stop()
                logged = operator.log.stat().st_size
                proc = operator.start()
                await released(operator.log, logged, within)
                await settle(proc, quiet=3.0)
                out["rss_after_restart_MiB"] = proc.memory_info().rss / MiB
                out["rss_restart_peak_MiB"] = peak_rss(proc) / MiB
            finally:
                operator.stop()
    return out


async def released(log: Path, offset: int, within: float) -> None:
    """Wait for the restarted operator to hand back its start-up burst (operator/memory.py)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with log.open("rb") as text:
            text.seek(offset)
            if memory.RELEASED.encode() in text.read():
                return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"no '{memory.RELEASED}' in {log} within {within:.0f}s")


def peak_rss(proc: psutil.Process) -> int:
    """The process's high-water RSS (VmHWM), in bytes."""
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run(sizes: list[int], rate: float, singles: int, quiet: float, timeout: float,
        probe_interval: float, resync_interval: float, logdir: Path) -> list[dict[str, Any]]:
    results = []
    for count in sizes:
        result = asyncio.run(run_size(count, rate, singles, quiet, timeout, probe_interval,
                                      resync_interval, logdir))
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def report(results: list[dict[str, Any]]) -> str:
    rows = [
        ("operator RSS idle / after burst / after restart, MiB", lambda r:
            f"{r['rss_idle_MiB']:.0f} / {r['rss_after_burst_MiB']:.0f} / "
            f"{r['rss_after_restart_MiB']:.0f}"),
        ("operator RSS peak during the restart, MiB", lambda r:
            f"{r['rss_restart_peak_MiB']:.0f}" if "rss_restart_peak_MiB" in r else "-"),
        ("RSS per target (after burst - idle), KiB", lambda r: f"{r['rss_per_target_KiB']:.1f}"),
        ("create → Ready during the burst, p50 / p95 / max s", lambda r:
            f"{r['burst_ready_p50_s']:.2f} / {r['burst_ready_p95_s']:.2f} / "
            f"{r['burst_ready_max_s']:.2f}"),
        ("all Ready after the first create, s", lambda r: f"{r['all_ready_s']:.1f}"),
        ("single apply → Ready, p50 / max s", lambda r:
            f"{r['single_ready_p50_s']:.2f} / {r['single_ready_max_s']:.2f}"),
        ("operator CPU per target (burst), ms", lambda r: f"{r['operator_cpu_per_target_ms']:.1f}"),
        ("emptied relay refilled, s", lambda r: f"{r['relay_refill_s']:.2f}"),
        ("steady state: API requests/s (all clients) / operator CPU %", lambda r:
            f"{r['steady_api_requests_per_s']:.2f} / {r['steady_operator_cpu_pct']:.1f}"),
    ]
    lines = ["| real kube-apiserver | " + " | ".join(f"{r['targets']:,} targets"
                                                    for r in results) + " |",
             "|---|" + "---|" * len(results)]
    lines += [f"| {label} | " + " | ".join(fn(r) for r in results) + " |" for label, fn in rows]
    return "\n".join(lines)

