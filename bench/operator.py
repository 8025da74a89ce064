"""`python -m bench.operator [--quick]`: the operator at scale, against kmock and real relays.

Measures (the operator's half of the targets in docs/PERFORMANCE.md):
1. create → live: VncTargets created one at a time; the time from the create request to the
   route being stored on both relay replicas (and to `status.phase: Ready`); median and p95.
2. bulk: M VncTargets created at once (16 concurrent creates, as fast as the emulator takes
   them); the time until both replicas hold all M, until every status is Ready, the operator's
   RSS and CPU seconds.
3. full resync: one `RelayFleet.sync_all` pass with nothing to change (revisions match: a GET per
   replica), and one after a replica was emptied (`registry.replace([])`): time and bytes.
4. scaling: bulk at two sizes, per-target time and CPU; and create → live with M targets present.

Layout. Every scenario runs in a fresh process of its own (`--run`), so that RSS figures start
from the same state. In it, the real operator (`build_registry` + `kopf.operator`, on asyncio as
`vncgate-operator` runs it) is alone with a small control client: kmock's emulator, the two
`RelayServer` replicas and an RFB greeter live in a child process (`bench/operator_cluster.py`).
So the RSS and CPU reported are the operator's, not the emulator's or the relays', and the
operator and its "cluster" get a core each, as they would in a cluster. The operator reaches the
relays through byte-counting TCP proxies in the child. The emulator's single-object reads are
indexed (see `IndexedEmulator`; `--stock-kmock` uses kmock as shipped, whose O(N) scan per request
makes it, not the operator, the bottleneck at thousands of objects).

Only 127.0.0.1 receives traffic. Every wait is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PROC = psutil.Process()
MiB = 2**20


def rss() -> int:
    return int(PROC.memory_info().rss)


def cpu() -> float:
    times = PROC.cpu_times()
    return float(times.user + times.system)


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1), nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


# -- one scenario, in its own process -----------------------------------------------------------


class ClusterProcess:
    """`bench/operator_cluster.py` as a child; talks to its control API."""

    def __init__(self, stock_kmock: bool, log: Path) -> None:
        self.stock_kmock = stock_kmock
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.info: dict[str, Any] = {}
        self.http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ClusterProcess:
        args = [sys.executable, "-m", "bench.operator_cluster"]
        if self.stock_kmock:
            args.append("--stock-kmock")
        with self.log.open("ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *args, cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=err)
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout=30)
        if not line:
            raise RuntimeError(f"the cluster process did not start; see {self.log}")
        self.info = json.loads(line)
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.http is not None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self.http.post(self.info["control"] + "/quit",
                                          timeout=aiohttp.ClientTimeout(total=5)):
                    pass
            await self.http.close()
        if self.proc is not None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout=10)
            except TimeoutError:
                self.proc.kill()
                await asyncio.wait_for(self.proc.wait(), timeout=5)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def call(self, method: str, path: str, body: Any = None, **query: Any) -> Any:
        assert self.http is not None
        async with self.http.request(method, self.info["control"] + path, json=body,
                                     params={k: str(v) for k, v in query.items()}) as resp:
            resp.raise_for_status()
            return await resp.json()


@contextlib.asynccontextmanager
async def running_operator(cluster: ClusterProcess, probe_interval: float,
                           resync_interval: float) -> AsyncIterator[Any]:
    """The real operator in this event loop, as tests/operator/conftest.py runs it."""
    import kopf

    from vncgate.operator.handlers import build_registry
    from vncgate.operator.policy import AddressPolicy
    from vncgate.operator.runtime import Runtime
    from vncgate.operator.settings import OperatorSettings

    config = OperatorSettings(
        relay_urls=tuple(cluster.info["relays"]), api_token=cluster.info["token"],
        public_url="https://vnc.example.com",
        policy=AddressPolicy(allow_cidrs=(ipaddress.ip_network("127.0.0.1/32"),)),
        resync_interval=resync_interval, probe_interval=probe_interval, probe_timeout=3.0,
        liveness_endpoint=None, standalone=True)
    from vncgate.common.kube import KubeConnection

    class _NoCredentials:  # the emulator takes requests without a token
        def get_api_key_with_prefix(self, _name: str) -> None:
            return None

    registry = build_registry(config, connect=lambda: KubeConnection(
        server=cluster.info["kmock"].rstrip("/"), ssl_context=False,
        configuration=_NoCredentials()))

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=cluster.info["kmock"], insecure=True)

    memo = kopf.Memo()
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(kopf.operator(
        registry=registry, clusterwide=True, standalone=True, stop_flag=stop, ready_flag=ready,
        settings=kopf.OperatorSettings(), memo=memo))
    try:
        await asyncio.wait_for(ready.wait(), timeout=30)
        for _ in range(300):  # the startup handler puts the runtime in the memo
            if isinstance(memo.get("vncgate"), Runtime):
                break
            await asyncio.sleep(0.05)
        runtime = memo.get("vncgate")
        if not isinstance(runtime, Runtime):
            raise RuntimeError("the operator did not start within 15 s")
        yield runtime
    finally:
        stop.set()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), timeout=3)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        leftover = memo.get("vncgate")  # a stop cut short skips kopf's cleanup handler
        if isinstance(leftover, Runtime):
            await leftover.close()


def configure_logging() -> None:
    """As `vncgate-operator` does (kopf's per-object lines at DEBUG), to stderr, which the
    orchestrator sends to a file: log lines are part of the operator's cost."""
    import kopf

    from vncgate.operator.cli import KopfNoise

    kopf.configure(debug=False, verbose=False, log_format=kopf.LogFormat.FULL)
    for handler in logging.getLogger().handlers:
        handler.addFilter(KopfNoise())


async def wait_registered(cluster: ClusterProcess, prefix: str, count: int, within: float,
                          samples: list[int]) -> dict[str, Any]:
    deadline = time.monotonic() + within
    progress: dict[str, Any] = {}
    while time.monotonic() < deadline:
        samples.append(rss())
        progress = await cluster.call("GET", "/progress", prefix=prefix, count=count)
        if progress["all_at"] is not None:
            return progress
        await asyncio.sleep(0.25)
    raise RuntimeError(f"{prefix}: not on both replicas within {within:g}s: {progress}")


async def wait_phase(cluster: ClusterProcess, prefix: str, count: int, phase: str,
                     within: float, samples: list[int]) -> float:
    deadline = time.monotonic() + within
    phases: dict[str, int] = {}
    while time.monotonic() < deadline:
        samples.append(rss())
        phases = await cluster.call("GET", "/phases", prefix=prefix)
        if phases.get(phase, 0) >= count:
            return time.monotonic()
        await asyncio.sleep(0.25)
    raise RuntimeError(f"{prefix}: not all {phase} within {within:g}s: {phases}")


async def settle(cluster: ClusterProcess, quiet: float = 1.0, within: float = 60.0) -> None:
    """Wait until the operator's CPU is idle for `quiet` seconds (kopf finishing its patches)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        before = cpu()
        await asyncio.sleep(quiet)
        if cpu() - before < 0.05 * quiet:
            return


async def one_by_one(cluster: ClusterProcess, prefix: str, count: int) -> dict[str, Any]:
    got = await cluster.call("POST", "/create", {"prefix": prefix, "count": count,
                                                  "one_by_one": True, "timeout": 30})
    live, ready = got["live_s"], got["ready_s"]
    return {"count": count, "missed": got["missed"],
            "live_median_ms": 1000 * statistics.median(live) if live else None,
            "live_p95_ms": 1000 * pct(live, 0.95) if live else None,
            "live_max_ms": 1000 * max(live) if live else None,
            "ready_median_ms": 1000 * statistics.median(ready) if ready else None,
            "ready_p95_ms": 1000 * pct(ready, 0.95) if ready else None}


async def resync_pass(runtime: Any, cluster: ClusterProcess) -> dict[str, Any]:
    before = await cluster.call("GET", "/bytes")
    t0 = time.monotonic()
    c0 = cpu()
    runtime.desired_routes()
    t1 = time.monotonic()
    ok = await runtime.fleet.sync_all()  # computes the table again, at send time
    t2 = time.monotonic()
    c1 = cpu()
    after = await cluster.call("GET", "/bytes")
    return {"ok": ok, "seconds": t2 - t0, "desired_routes_s": t1 - t0, "operator_cpu_s": c1 - c0,
            "bytes_to_relays": sum(a["to_relay"] - b["to_relay"]
                                   for a, b in zip(after, before, strict=True)),
            "bytes_from_relays": sum(a["from_relay"] - b["from_relay"]
                                     for a, b in zip(after, before, strict=True)),
            "per_replica": [{"to": a["to_relay"] - b["to_relay"],
                             "from": a["from_relay"] - b["from_relay"]}
                            for a, b in zip(after, before, strict=True)]}


async def run_latency(args: argparse.Namespace) -> dict[str, Any]:
    log = Path(args.log)
    async with ClusterProcess(args.stock_kmock, log) as cluster, \
            running_operator(cluster, args.probe_interval, args.resync_interval):
        await one_by_one(cluster, "warm", 5)
        result = await one_by_one(cluster, "lat", args.count)
    return {"latency": result}


async def run_bulk(args: argparse.Namespace) -> dict[str, Any]:
    log = Path(args.log)
    m = args.count
    out: dict[str, Any] = {"targets": m}
    async with ClusterProcess(args.stock_kmock, log) as cluster:
        gc.collect()
        out["rss_before_operator_MiB"] = rss() / MiB
        async with running_operator(cluster, args.probe_interval, args.resync_interval) as runtime:
            await one_by_one(cluster, "warm", 3)  # the first resync pass, connections, imports
            await settle(cluster)
            gc.collect()
            out["rss_idle_MiB"] = rss() / MiB
            cluster_usage0 = await cluster.call("GET", "/usage")
            samples: list[int] = []
            c0 = cpu()
            created = await cluster.call("POST", "/create", {"prefix": "bulk", "count": m,
                                                              "concurrency": 16})
            progress = await wait_registered(cluster, "bulk", m, args.timeout, samples)
            c_registered = cpu()
            ready_at = await wait_phase(cluster, "bulk", m, "Ready",
                                        args.timeout - (time.monotonic() - created["start"]),
                                        samples)
            await settle(cluster)
            c1 = cpu()
            cluster_usage1 = await cluster.call("GET", "/usage")
            start = created["start"]
            out.update({
                "create_s": created["end"] - start,
                "all_registered_s": progress["all_at"] - start,
                "all_ready_s": ready_at - start,
                "per_target_registered_ms": 1000 * (progress["all_at"] - start) / m,
                "operator_cpu_to_registered_s": c_registered - c0,
                "operator_cpu_s": c1 - c0,
                "operator_cpu_per_target_ms": 1000 * (c1 - c0) / m,
                "cluster_cpu_s": cluster_usage1["cpu"] - cluster_usage0["cpu"],
                "rss_peak_MiB": max(samples) / MiB,
                "registry_sizes": progress["registry_sizes"],
            })
            gc.collect()
            out["rss_after_MiB"] = rss() / MiB
            out["rss_per_target_KiB"] = (out["rss_after_MiB"] - out["rss_idle_MiB"]) * 1024 / m
            out["cluster_rss_MiB"] = cluster_usage1["rss"] / MiB

            # Full resync: nothing to change (median of 3), then a replica emptied.
            noops = [await resync_pass(runtime, cluster) for _ in range(3)]
            noops.sort(key=lambda r: r["seconds"])
            out["resync_noop"] = noops[1]
            await cluster.call("POST", "/empty", {"replica": 1})
            out["resync_refill"] = await resync_pass(runtime, cluster)
            refill = await cluster.call("GET", "/progress", prefix="bulk", count=m)
            out["resync_refill"]["replica_holds"] = refill["held"][1]

            # Create → live with M targets present.
            await settle(cluster)
            out["latency_at_scale"] = await one_by_one(cluster, "late", args.late)
            out["rss_end_MiB"] = rss() / MiB
    return out


def scenario_main(args: argparse.Namespace) -> None:
    configure_logging()
    if not args.default_gc:
        from vncgate.operator.cli import tune_gc

        tune_gc()  # as vncgate-operator does
    runner = run_latency if args.run == "latency" else run_bulk
    result = asyncio.run(runner(args))
    print(json.dumps(result), flush=True)


# -- the orchestrator ---------------------------------------------------------------------------


def run_scenario(kind: str, count: int, args: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    log = logdir / f"operator-{kind}-{count}.log"
    log.write_bytes(b"")
    cmd = [sys.executable, "-m", "bench.operator", "--run", kind, "--count", str(count),
           "--log", str(log), "--late", str(args.late), "--timeout", str(args.timeout),
           "--probe-interval", str(args.probe_interval),
           "--resync-interval", str(args.resync_interval)]
    if args.stock_kmock:
        cmd.append("--stock-kmock")
    if args.default_gc:
        cmd.append("--default-gc")
    print(f"  {kind} {count:,} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    with log.open("ab") as err:
        done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err,
                              timeout=args.timeout + 300, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{kind} {count}: exit {done.returncode}; see {log}")
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    result["wall_s"] = time.monotonic() - started
    return result


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def report(results: dict[str, Any]) -> str:
    lat = results["latency"]["latency"]
    lines = [
        f"create → live, {lat['count']} one at a time (ms): median {fmt(lat['live_median_ms'], 2)}"
        f", p95 {fmt(lat['live_p95_ms'], 2)}, max {fmt(lat['live_max_ms'], 2)}; "
        f"→ Ready: median {fmt(lat['ready_median_ms'], 2)}, p95 {fmt(lat['ready_p95_ms'], 2)}"
        f"; missed {lat['missed']}",
        "",
        "| bulk | " + " | ".join(f"{b['targets']:,}" for b in results["bulk"]) + " |",
        "|---|" + "---:|" * len(results["bulk"]),
    ]
    rows = [
        ("creates accepted by the emulator, s", "create_s", 2),
        ("all M on both replicas, s", "all_registered_s", 2),
        ("per target, ms", "per_target_registered_ms", 2),
        ("all M status Ready, s", "all_ready_s", 2),
        ("operator CPU, s", "operator_cpu_s", 2),
        ("operator CPU per target, ms", "operator_cpu_per_target_ms", 2),
        ("cluster process CPU, s", "cluster_cpu_s", 2),
        ("operator RSS idle, MiB", "rss_idle_MiB", 1),
        ("operator RSS peak, MiB", "rss_peak_MiB", 1),
        ("operator RSS after, MiB", "rss_after_MiB", 1),
        ("RSS per target, KiB", "rss_per_target_KiB", 1),
    ]
    for label, key, digits in rows:
        lines.append(f"| {label} | " + " | ".join(fmt(b.get(key), digits)
                                                  for b in results["bulk"]) + " |")
    for label, key in (("no-op resync", "resync_noop"), ("refill one replica", "resync_refill")):
        lines.append(f"| {label}, ms | " + " | ".join(
            fmt(1000 * b[key]["seconds"], 1) for b in results["bulk"]) + " |")
        lines.append(f"| {label}, KiB sent / received | " + " | ".join(
            f"{b[key]['bytes_to_relays'] / 1024:,.1f} / {b[key]['bytes_from_relays'] / 1024:,.1f}"
            for b in results["bulk"]) + " |")
    lines.append("| create → live with M present, median / p95 ms | " + " | ".join(
        f"{fmt(b['latency_at_scale']['live_median_ms'], 2)} / "
        f"{fmt(b['latency_at_scale']['live_p95_ms'], 2)}" for b in results["bulk"]) + " |")
    return "\n".join(lines)


def orchestrate(args: argparse.Namespace) -> None:
    if args.quick:
        latency_n, sizes = args.creations or 50, args.sizes or [100, 500]
    else:
        latency_n, sizes = args.creations or 200, args.sizes or [1000, 5000]
    RESULTS.mkdir(parents=True, exist_ok=True)
    logdir = RESULTS / "operator-logs"
    logdir.mkdir(exist_ok=True)
    started = time.monotonic()
    results: dict[str, Any] = {
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                    "cpu": _cpu_model()},
        "options": {"creations": latency_n, "sizes": sizes, "stock_kmock": args.stock_kmock,
                    "default_gc": args.default_gc,
                    "probe_interval": args.probe_interval,
                    "resync_interval": args.resync_interval},
    }
    results["latency"] = run_scenario("latency", latency_n, args, logdir)
    results["bulk"] = [run_scenario("bulk", m, args, logdir) for m in sizes]
    if len(sizes) >= 2:
        a, b = results["bulk"][0], results["bulk"][-1]
        results["scaling"] = {
            "registered_per_target_ratio": b["per_target_registered_ms"]
            / a["per_target_registered_ms"],
            "cpu_per_target_ratio": b["operator_cpu_per_target_ms"]
            / a["operator_cpu_per_target_ms"],
        }
    results["wall_s"] = time.monotonic() - started
    out = Path(args.json) if args.json else RESULTS / "operator.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    if "scaling" in results:
        s = results["scaling"]
        print(f"\nlargest / smallest size, per target: time to registered "
              f"{s['registered_per_target_ratio']:.2f}x, operator CPU "
              f"{s['cpu_per_target_ratio']:.2f}x (1.00x = linear)")
    print(f"\n{results['wall_s']:.0f} s; every figure in {out}; logs in {logdir}")


def orchestrate_real(args: argparse.Namespace) -> None:
    from bench import operator_real

    sizes = args.sizes or ([200] if args.quick else [1000])
    RESULTS.mkdir(parents=True, exist_ok=True)
    logdir = RESULTS / "operator-logs"
    logdir.mkdir(exist_ok=True)
    started = time.monotonic()
    probe = 30.0 if args.probe_interval == 86400.0 else args.probe_interval
    resync = 30.0 if args.resync_interval == 3600.0 else args.resync_interval
    results: dict[str, Any] = {
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                    "cpu": _cpu_model()},
        "options": {"sizes": sizes, "rate": args.rate, "probe_interval": probe,
                    "resync_interval": resync, "quiet": args.quiet},
        "real": operator_real.run(sizes, args.rate, args.singles, args.quiet, args.timeout,
                                  probe, resync, logdir)}
    results["wall_s"] = time.monotonic() - started
    out = Path(args.json) if args.json else RESULTS / "operator-real.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(operator_real.report(results["real"]))
    print(f"\n{results['wall_s']:.0f} s; every figure in {out}; logs in {logdir}")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.operator", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="50 creations, 100 and 500 targets")
    parser.add_argument("--creations", type=int, help="create → live sample size (default 200)")
    parser.add_argument("--sizes", type=int, action="append",
                        help="bulk sizes (repeatable; default 1000 and 5000)")
    parser.add_argument("--late", type=int, default=20,
                        help="create → live samples with the bulk present (default 20)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="bound on one bulk scenario, seconds (default 600)")
    parser.add_argument("--probe-interval", type=float, default=86400.0,
                        help="operator --probe-interval in seconds (default one day: the timers "
                             "stay out of the figures; creation probes once regardless)")
    parser.add_argument("--resync-interval", type=float, default=3600.0,
                        help="operator --resync-interval in seconds (default one hour: the "
                             "benchmark runs the passes it times itself)")
    parser.add_argument("--stock-kmock", action="store_true",
                        help="kmock as shipped (an O(N) scan per request)")
    parser.add_argument("--default-gc", action="store_true",
                        help="leave Python's collector thresholds as they are (vncgate-operator "
                             "sets them with vncgate.operator.cli.tune_gc)")
    parser.add_argument("--json", help="where to write every figure "
                                       "(default bench/results/operator.json)")
    parser.add_argument("--api-server", choices=("emulator", "real"), default="emulator",
                        help="emulator: kmock, in a child process (default); real: a real "
                             "kube-apiserver from ../shared/envtest (bench/operator_real.py)")
    parser.add_argument("--rate", type=float, default=50.0,
                        help="real mode: creations per second in the burst (default 50)")
    parser.add_argument("--singles", type=int, default=10,
                        help="real mode: single applies timed after the burst (default 10)")
    parser.add_argument("--quiet", type=float, default=60.0,
                        help="real mode: the steady-state window, seconds (default 60)")
    parser.add_argument("--run", choices=("latency", "bulk"), help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--log", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.api_server == "real":
        orchestrate_real(args)
    elif args.run:
        scenario_main(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
