"""`python -m bench.scale`: the scale the design plans, on one machine (issue #32).

Everything runs on 127.0.0.1, each part in processes of its own, as a cluster runs them:

- the control plane the tests use (`harness/cluster.py`: etcd + kube-apiserver, no controller
  manager), the CRDs, 10 namespaces of targets and one for the relays' Leases, and RBAC that
  lets the group `vncgate-bench-viewers` connect to every VncTarget;
- `vncgate-operator` (bench/operator_real.py's `Operator`) registering routes on every relay;
- R `vncgate-relay` processes (bench/replicas_setup.py's `Relays`) that know each other
  (`--peer-url`), hold their liveness and seat Leases in the API server (`--lease-namespace`)
  and authorize every viewer by SubjectAccessReview (`--auth proxy`, `--kubeconfig`), as the
  chart runs them;
- idle VNC servers (bench/scale_greeter.py) on a pool of ports, few thousand sessions per port
  (the relays all dial from 127.0.0.1, and one destination takes at most one connection per
  local port: 32768-60999);
- lanes of viewers: each lane one HAProxy (`mode tcp`, `balance roundrobin`, health checks on
  /readyz, `option redispatch`: harness/haproxy.py's `balancer_config`, the tests' replicas'
  balancer, with room for a lane's sessions) in front of all R relays, and one client process
  (bench/scale_clients.py) that opens its sessions through it. A lane carries at most LANE
  sessions, so that no process needs more descriptors than the hard limit (HAProxy holds two
  per session).

The run: T VncTargets created at --target-rate over 10 namespaces (every --seat-every'th with
`maxViewers`, so its sessions take seat Leases) until each is Ready and on every relay; a quiet
window; N = R x --sessions-per-relay sessions opened at --session-rate, each to ServerInit as
a user of its own through its lane's HAProxy (sessions dealt round-robin over the targets);
a quiet window; then one relay is SIGKILLed and every session it held reconnects at once
through the balancers to the others (the storm), until each is back at ServerInit.

Measured: RSS of each part before and after the targets (per target) and the sessions (per
session), the API server's requests per second by kind (`apiserver_request_total`: Leases,
VncTarget status, Events, reviews, ...) in every phase, CPU of each part in the quiet windows,
and the storm: time from the kill until the last session is back, the attempts that failed
and why, and the API requests it caused. Results to bench/results/scale.json and a table.

    .venv/bin/python -m bench.scale --quick      # ~2 minutes: 3 relays, 300 targets, 600 sessions
    .venv/bin/python -m bench.scale              # 10 relays, 10,000 targets, 10 x 8,000 sessions

Every wait and loop is bounded in count and in time; every process is started through
harness/reaper.py (its own process group, the parent-death signal, the run's mark) and ended on
any exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench.limits import raise_fd_limit
from bench.operator_real import NAMESPACES, TARGETS, Operator, control_plane, settle
from bench.replicas_setup import TOKEN, Relays
from bench.targetwatch import TargetWatch
from harness import reaper
from harness.cluster import ROOT, ControlPlane
from harness.haproxy import Haproxy, balancer_config
from vncgate.common.client import RelayClient, RelayError
from vncgate.common.kube import KubeClient

MiB = 2**20
LEASES_NS = "vncgate-bench"
GROUP = "vncgate-bench-viewers"
LANE = 9_000  # sessions per HAProxy and client process: 2 x 9,000 + its own < 20,000 fds
RESULTS = ROOT / "bench" / "results"
# Waiting for the operator to go quiet: bounded, since its probes (every target every 30 s)
# keep it busy for good at 10,000 targets.
SETTLE = 15.0

RBAC = """\
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: vncgate-bench-viewer}
rules:
- apiGroups: [vncgate.io]
  resources: [vnctargets]
  verbs: [get, list, watch, connect]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: vncgate-bench-viewers}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: vncgate-bench-viewer}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: Group, name: vncgate-bench-viewers}
"""

@dataclass
class Size:
    relays: int
    targets: int
    sessions_per_relay: int
    target_rate: float
    session_rate: float
    seat_every: int
    max_viewers: int
    greeter_ports: int
    window: float
    storm_timeout: float
    auth: str = "proxy"

    @property
    def sessions(self) -> int:
        return self.relays * self.sessions_per_relay


# -- the API server's request counts, by kind ------------------------------------------------

LABELS = re.compile(r'(\w+)="([^"]*)"')


def kind_of(labels: dict[str, str]) -> str:
    resource, sub, verb = labels.get("resource", ""), labels.get("subresource", ""), \
        labels.get("verb", "")
    if verb == "WATCH":
        return "watches opened"
    if resource == "leases":
        return f"leases {verb}"
    if resource == "vnctargets":
        return "vnctargets/status" if sub == "status" else f"vnctargets {verb}"
    if resource == "events":
        return "events"
    if resource.endswith("reviews"):
        return resource
    if not resource:
        return "non-resource (incl. the bench's /metrics reads)"
    return "other"


def parse_requests(text: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{"):
            head, value = line.rsplit(" ", 1)
            counts[kind_of(dict(LABELS.findall(head)))] += int(float(value))
    return counts


class ApiCounter:
    """Reads the API server's /metrics (as admin) and keeps the samples of a run."""

    def __init__(self, kube: KubeClient) -> None:
        self.kube = kube
        self._http: aiohttp.ClientSession | None = None

    async def read(self) -> tuple[float, Counter[str]]:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        connection = self.kube.connection
        async with self._http.get(f"{connection.server}/metrics", ssl=connection.ssl_context,
                                  headers=connection.headers(),
                                  timeout=aiohttp.ClientTimeout(total=30)) as reply:
            text = await reply.text()
        return time.monotonic(), parse_requests(text)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()


def rates(before: tuple[float, Counter[str]], after: tuple[float, Counter[str]]
          ) -> dict[str, float]:
    elapsed = after[0] - before[0]
    return {kind: round((after[1][kind] - before[1][kind]) / elapsed, 3)
            for kind in sorted(after[1]) if after[1][kind] != before[1][kind]}


def totals(before: tuple[float, Counter[str]], after: tuple[float, Counter[str]]
           ) -> dict[str, int]:
    return {kind: after[1][kind] - before[1][kind] for kind in sorted(after[1])
            if after[1][kind] != before[1][kind]}


# -- the processes ---------------------------------------------------------------------------

class Child:
    """A benchmark child that answers one JSON line per command on its stdin."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name, self.proc = name, proc
        self.ps = psutil.Process(proc.pid)

    @classmethod
    async def start(cls, name: str, argv: list[str], log: Path) -> Child:
        with log.open("ab") as err:
            proc = await reaper.exec_async(*argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           stderr=err)
        return cls(name, proc)

    async def line(self, within: float = 60) -> dict[str, Any]:
        assert self.proc.stdout is not None
        async with asyncio.timeout(within):
            raw = await self.proc.stdout.readline()
        if not raw:
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode})")
        answer: dict[str, Any] = json.loads(raw)
        return answer

    async def ask(self, command: str, within: float = 60) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()
        return await self.line(within)

    async def end(self, grace: float = 30) -> None:
        if self.proc.returncode is None and self.proc.stdin is not None:
            with contextlib.suppress(ConnectionError):
                self.proc.stdin.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self.proc.wait()
        if self.proc.returncode is None:
            reaper.kill_group(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


def rss(procs: Iterable[psutil.Process]) -> float:
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total / MiB


def cpu(procs: Iterable[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def control_plane_procs() -> dict[str, psutil.Process]:
    found = {}
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.name() in ("kube-apiserver", "etcd"):
                found[child.name()] = child
    return found


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- the run ---------------------------------------------------------------------------------

@dataclass
class Parts:
    """The processes whose RSS and CPU are read, by part."""

    groups: dict[str, list[psutil.Process]] = field(default_factory=dict)

    def rss(self) -> dict[str, float]:
        return {name: round(rss(procs), 1) for name, procs in self.groups.items()}

    def cpu(self) -> dict[str, float]:
        return {name: cpu(procs) for name, procs in self.groups.items()}


def cpu_pct(before: dict[str, float], after: dict[str, float], elapsed: float
            ) -> dict[str, float]:
    return {name: round(100 * (after[name] - before.get(name, 0.0)) / elapsed, 1)
            for name in after}


def target_key(index: int) -> str:
    return f"bench-{index % NAMESPACES}/t-{index}"


def target_body(index: int, port: int, size: Size) -> dict[str, Any]:
    namespace, name = target_key(index).split("/")
    spec: dict[str, Any] = {"endpoint": {"address": {"host": "127.0.0.1", "port": port}}}
    if index % size.seat_every == 0:
        spec["sessions"] = {"mode": "shared", "maxViewers": size.max_viewers}
    return {"apiVersion": "vncgate.io/v1alpha1", "kind": "VncTarget",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


async def create_paced(kube: KubeClient, size: Size, ports: list[int]) -> float:
    """Create the targets at `size.target_rate` per second; seconds it took."""
    start = time.monotonic()
    pending: set[asyncio.Task[Any]] = set()
    for index in range(size.targets):
        delay = start + index / size.target_rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        namespace = target_key(index).split("/")[0]
        pending.add(asyncio.create_task(kube.request(
            "POST", TARGETS.format(ns=namespace), target_body(index, ports[index % len(ports)],
                                                             size))))
        done = {t for t in pending if t.done()}
        for task in done:
            task.result()
        pending -= done
    await asyncio.gather(*pending)
    return time.monotonic() - start


async def summaries(http: aiohttp.ClientSession, urls: list[str]
                    ) -> list[tuple[int, int] | None]:
    """(routes, sessions) of each relay; None for one that does not answer."""
    async def one(url: str) -> tuple[int, int] | None:
        try:
            snapshot = await RelayClient(http, url, TOKEN, timeout=20).get_summary()
        except (RelayError, aiohttp.ClientError, TimeoutError):
            return None
        return snapshot.route_count, sum(snapshot.sessions.values())
    return list(await asyncio.gather(*(one(url) for url in urls)))


async def until(check: Any, what: str, within: float, every: float = 1.0) -> float:
    """Poll the coroutine function `check` until it returns true; seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        if await check():
            return time.monotonic() - start
        await asyncio.sleep(every)
    raise TimeoutError(f"{what}: not within {within:.0f}s")


def prepare(plane: ControlPlane) -> None:
    """The relays' Lease namespace and the viewers' RBAC, besides bench.operator_real's."""
    plane.kubectl("create", "namespace", LEASES_NS)
    plane.apply(RBAC)


async def run(size: Size, workdir: Path, logdir: Path, out: dict[str, Any]) -> None:
    """Fills `out` as it goes, so that a run stopped half-way keeps what it measured."""
    out.update({"size": size.__dict__ | {"sessions": size.sessions},
                "load_start": load(), "fd_limit": raise_fd_limit(),
                "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())})
    lanes = max(2, math.ceil(size.sessions / LANE))
    # The relays' peak after the storm: their sessions and a share of the dead one's.
    peak = math.ceil(size.sessions_per_relay * size.relays / max(1, size.relays - 1))
    greeters = max(1, math.ceil((size.sessions + size.targets) / 15_000))
    out["layout"] = {"lanes": lanes, "greeter_processes": greeters,
                     "relay_peak_sessions_after_storm": peak}
    print(f"scale: {size.relays} relays, {size.targets} targets, {size.sessions} sessions in "
          f"{lanes} lanes, {greeters} greeter processes; fd limit {out['fd_limit']}", flush=True)
    async with contextlib.AsyncExitStack() as stack:
        plane, kube = await stack.enter_async_context(control_plane(workdir, prepare))
        api = ApiCounter(kube)
        stack.push_async_callback(api.close)
        http = await stack.enter_async_context(aiohttp.ClientSession())
        # The idle VNC servers.
        per = max(1, math.ceil(size.greeter_ports / greeters))
        greeter_children = []
        for index in range(greeters):
            child = await Child.start(f"greeter-{index}", [
                sys.executable, "-m", "bench.scale_greeter", "--ports", str(per)],
                logdir / f"greeter-{index}.log")
            stack.push_async_callback(child.end)
            greeter_children.append(child)
        ports = [port for child in greeter_children for port in (await child.line())["ports"]]
        # The relays and the operator.
        (workdir / "relays").mkdir()
        relays = Relays(workdir / "relays", None, size.relays,
                        (plane.admin_kubeconfig, LEASES_NS),
                        extra=["--auth=proxy", "--trusted-proxy=127.0.0.1/32"]
                        if size.auth == "proxy" else ["--auth=none"])
        await stack.enter_async_context(relays)
        relay_ps = [psutil.Process(proc.pid) for proc in relays.procs]
        operator = Operator(plane, relays.internal_urls, workdir / "relays" / "token",
                            logdir / "operator.log", probe_interval=30.0, resync_interval=60.0)
        operator_ps = operator.start()
        stack.callback(operator.stop)
        plane_ps = control_plane_procs()
        parts = Parts({"operator": [operator_ps], "kube-apiserver": [plane_ps["kube-apiserver"]],
                       "etcd": [plane_ps["etcd"]], "relays (all)": relay_ps,
                       "VNC servers (all)": [c.ps for c in greeter_children]})
        await asyncio.sleep(3)
        await settle(operator_ps)
        out["rss_before_targets_MiB"] = parts.rss()
        out["relay_rss_before_targets_MiB"] = [round(rss([p]), 1) for p in relay_ps]

        # -- targets --
        print(f"scale: creating {size.targets} VncTargets at {size.target_rate:g}/s", flush=True)
        keys = [target_key(i) for i in range(size.targets)]
        before = await api.read()
        cpu0 = parts.cpu()
        async with TargetWatch(kube) as seen:  # closed after: its watch would cost the rest
            out["targets_created_s"] = round(await create_paced(kube, size, ports), 1)
            await seen.wait(keys, within=300 + size.targets / size.target_rate)
        out["targets_all_ready_s"] = round(time.monotonic() - before[0], 1)

        async def all_routes() -> bool:
            return all(s is not None and s[0] >= size.targets
                       for s in await summaries(http, relays.internal_urls))
        await until(all_routes, "every route on every relay", 300)
        out["targets_on_every_relay_s"] = round(time.monotonic() - before[0], 1)
        after = await api.read()
        out["api_rates_targets"] = rates(before, after)
        out["cpu_s_targets"] = {k: round(v - cpu0[k], 1) for k, v in parts.cpu().items()}
        await settle(operator_ps, within=SETTLE)
        out["rss_after_targets_MiB"] = parts.rss()
        out["relay_rss_after_targets_MiB"] = [round(rss([p]), 1) for p in relay_ps]
        out["load_after_targets"] = load()

        # -- quiet, targets only --
        out["window_targets"] = await window(api, parts, size.window)

        # -- sessions --
        backends = [url.removeprefix("http://") for url in relays.urls]
        balancers = [Haproxy(workdir, partial(balancer_config, backends=backends,
                                              maxconn=LANE + 500, frontend_maxconn=LANE + 500,
                                              backlog=4096))
                     for _ in range(lanes)]
        for balancer in balancers:
            balancer.start()
            stack.callback(balancer.stop)
        clients = []
        for lane in range(lanes):
            plan = []
            for j in range(lane, size.sessions, lanes):
                namespace, name = target_key(j % size.targets).split("/")
                plan.append([f"/t/{namespace}/{name}/websockify", f"viewer-{j}"])
            (workdir / f"plan-{lane}.json").write_text(json.dumps(plan))
            child = await Child.start(f"clients-{lane}", [
                sys.executable, "-m", "bench.scale_clients", "--port", str(balancers[lane].port),
                "--plan", str(workdir / f"plan-{lane}.json"), "--group", GROUP,
                "--rate", f"{size.session_rate / lanes:.3f}", "--deadline", "7200"],
                logdir / f"clients-{lane}.log")
            stack.push_async_callback(child.end)
            clients.append(child)
        parts.groups["HAProxy (all)"] = [psutil.Process(b.process.pid) for b in balancers
                                         if b.process is not None]
        parts.groups["clients (all)"] = [c.ps for c in clients]
        out["rss_before_sessions_MiB"] = parts.rss()
        print(f"scale: opening {size.sessions} sessions at {size.session_rate:g}/s", flush=True)
        before, cpu0 = await api.read(), parts.cpu()
        for child in clients:
            await child.ask("open")

        async def stats() -> list[dict[str, Any]]:
            return [await child.ask("stats") for child in clients]

        said = [time.monotonic()]

        async def all_open() -> bool:
            got = await stats()
            done = sum(s["alive"] + s["gave_up"] for s in got)
            if time.monotonic() - said[0] > 15:
                said[0] = time.monotonic()
                print(f"scale: {sum(s['alive'] for s in got)} sessions open, "
                      f"{sum(s['gave_up'] for s in got)} given up, load {load()}", flush=True)
            return bool(done >= size.sessions)
        await until(all_open, "every session open or given up",
                    600 + 3 * size.sessions / size.session_rate)
        after = await api.read()
        opened = await stats()
        elapsed = after[0] - before[0]
        out["sessions_open_s"] = round(elapsed, 1)
        out["sessions_open"] = sum(s["alive"] for s in opened)
        out["sessions_given_up"] = sum(s["gave_up"] for s in opened)
        out["sessions_failed_attempts"] = sum(s["failed_attempts"] for s in opened)
        out["sessions_failures"] = dict(sum((Counter(s["failures"]) for s in opened),
                                            Counter()))
        out["setup_p50_ms_by_lane"] = [s["setup_p50_ms"] for s in opened]
        out["setup_p99_ms_by_lane"] = [s["setup_p99_ms"] for s in opened]
        out["api_rates_sessions"] = rates(before, after)
        out["api_totals_sessions"] = totals(before, after)
        out["cpu_pct_sessions"] = cpu_pct(cpu0, parts.cpu(), elapsed)
        out["load_after_sessions"] = load()
        # The operator writes session counts into status every 2 s: let it catch up.
        await asyncio.sleep(10)
        await settle(operator_ps, quiet=3.0, within=SETTLE)
        per_relay = [s[1] if s else 0 for s in await summaries(http, relays.internal_urls)]
        out["sessions_per_relay"] = per_relay
        out["rss_after_sessions_MiB"] = parts.rss()
        out["relay_rss_after_sessions_MiB"] = [round(rss([p]), 1) for p in relay_ps]
        out["relay_fds_after_sessions"] = [p.num_fds() for p in relay_ps]
        out["haproxy_fds"] = [p.num_fds() for p in parts.groups["HAProxy (all)"]]
        out["relay_KiB_per_session"] = [
            round((a - b) * 1024 / n, 1) if n else None for a, b, n in zip(
                out["relay_rss_after_sessions_MiB"], out["relay_rss_after_targets_MiB"],
                per_relay, strict=True)]

        # -- quiet, with the sessions --
        out["window_sessions"] = await window(api, parts, size.window)

        # -- the storm --
        victim = max(range(size.relays), key=lambda i: per_relay[i])
        held = per_relay[victim]
        lost_before = sum(s["lost"] for s in opened)
        gave_up_before = sum(s["gave_up"] for s in opened)
        failures_before = sum((Counter(s["failures"]) for s in opened), Counter())
        print(f"scale: SIGKILL relay {victim} holding {held} sessions", flush=True)
        samples = [await api.read()]
        parts.groups["relays (all)"] = [p for i, p in enumerate(relay_ps) if i != victim]
        cpu0 = parts.cpu()
        killed_at = time.monotonic()
        relays.procs[victim].kill()

        async def sample() -> None:
            """One more /metrics read; one the API server is too busy to answer is skipped."""
            with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                samples.append(await api.read())

        async def storm_over() -> bool:
            await sample()
            got = await stats()
            lost = sum(s["lost"] for s in got) - lost_before
            settled = sum(s["back"] for s in got) + sum(s["gave_up"] for s in got) \
                - gave_up_before
            everyone = sum(s["alive"] + s["gave_up"] for s in got) >= size.sessions
            # (`held` is the relay's own count; should a client see fewer losses, every
            # session back and 30 s gone ends the wait too)
            return bool(settled >= lost > 0 and everyone
                        and (lost >= held or time.monotonic() - killed_at > 30))
        out["storm_poll_s"] = round(await until(storm_over, "every lost session back",
                                                size.storm_timeout, every=1.0), 1)
        finished = await stats()
        storm_outages: list[tuple[float, float, int]] = []  # (down s, back at, failed attempts)
        for child in clients:
            times = await child.ask("times")
            storm_outages += [(down, back, failed) for (down, back), failed
                              in zip(times["outages"], times["retries"], strict=True)
                              if back >= killed_at]
        downs = sorted(o[0] for o in storm_outages)
        out["storm"] = {
            "victim": victim, "sessions_held": held,
            "lost": sum(s["lost"] for s in finished) - lost_before,
            "back": len(storm_outages),
            "gave_up": sum(s["gave_up"] for s in finished) - gave_up_before,
            "settle_s": round(max(o[1] for o in storm_outages) - killed_at, 2)
            if storm_outages else None,
            "outage_p50_s": round(statistics.median(downs), 2) if downs else None,
            "outage_p99_s": round(downs[min(len(downs) - 1, int(0.99 * len(downs)))], 2)
            if downs else None,
            "failed_attempts": sum(o[2] for o in storm_outages),
            "sessions_that_retried": sum(1 for o in storm_outages if o[2]),
            "failures": dict(sum((Counter(s["failures"]) for s in finished), Counter())
                             - failures_before),
            "load": load(),
        }
        # The API requests the storm caused: until the operator has written every status (no
        # status or Event written for 10 s), at least 30 s.
        writes = ("vnctargets/status", "events")
        quiet_since = time.monotonic()
        while time.monotonic() - killed_at < size.storm_timeout:
            await asyncio.sleep(2)
            await sample()
            if len(samples) > 1 and any(samples[-1][1][k] != samples[-2][1][k] for k in writes):
                quiet_since = samples[-1][0]
            elif time.monotonic() - quiet_since >= 10 and time.monotonic() - killed_at >= 30:
                break
        out["storm"]["api_writes_until_s"] = round(quiet_since - killed_at, 1)
        storm_elapsed = samples[-1][0] - samples[0][0]
        out["storm"]["api_window_s"] = round(storm_elapsed, 1)
        out["api_rates_storm"] = rates(samples[0], samples[-1])
        out["api_totals_storm"] = totals(samples[0], samples[-1])
        out["cpu_pct_storm"] = cpu_pct(cpu0, parts.cpu(), storm_elapsed)
        out["api_storm_series"] = [
            {"t": round(b[0] - killed_at, 1), **rates(a, b)}
            for a, b in itertools.pairwise(samples)]
        per_relay_after = [s[1] if s else 0 for s in await summaries(http, relays.internal_urls)]
        out["sessions_per_relay_after_storm"] = per_relay_after
        out["relay_fds_after_storm"] = [p.num_fds() if i != victim else None
                                        for i, p in enumerate(relay_ps)]
        out["rss_after_storm_MiB"] = parts.rss()

        # -- the killed relay restarted in its place, as its pod's container would be --
        async with TargetWatch(kube) as phases:
            async def listed() -> bool:
                return len(phases.phase) >= size.targets
            await until(listed, "every target listed", 120, every=0.5)
            not_ready = size.targets - phases.ready()
            print(f"scale: restarting relay {victim} ({not_ready} targets not Ready)", flush=True)
            before, cpu0 = await api.read(), parts.cpu()
            restarted = reaper.popen(relays.argvs[victim], stdout=subprocess.DEVNULL,
                                     stderr=relays.logs[victim].open("ab"))
            relays.procs[victim] = restarted
            parts.groups["relays (all)"] = [p for i, p in enumerate(relay_ps) if i != victim] \
                + [psutil.Process(restarted.pid)]

            async def all_ready() -> bool:
                return phases.ready() >= size.targets
            ready_s = await until(all_ready, "every target Ready again", size.storm_timeout,
                                  every=0.5)
            await settle(operator_ps, quiet=3.0, within=SETTLE)
            after = await api.read()
        out["restart"] = {"not_ready_before": not_ready, "all_ready_s": round(ready_s, 1),
                          "api_window_s": round(after[0] - before[0], 1), "load": load()}
        out["api_rates_restart"] = rates(before, after)
        out["api_totals_restart"] = totals(before, after)
        out["cpu_pct_restart"] = cpu_pct(cpu0, parts.cpu(), after[0] - before[0])
        out["load_end"] = load()
        for child in clients:
            with contextlib.suppress(RuntimeError, TimeoutError):
                await child.ask("close", within=120)
        print("scale: stopping everything", flush=True)


async def window(api: ApiCounter, parts: Parts, seconds: float) -> dict[str, Any]:
    """A quiet window: API requests per second by kind, CPU % by part."""
    before, cpu0 = await api.read(), parts.cpu()
    await asyncio.sleep(seconds)
    after = await api.read()
    elapsed = after[0] - before[0]
    return {"seconds": round(elapsed, 1), "api_rates": rates(before, after),
            "cpu_pct": cpu_pct(cpu0, parts.cpu(), elapsed), "load": load()}


# -- the report --------------------------------------------------------------------------------

def per_target(r: dict[str, Any], part: str) -> float:
    delta = float(r["rss_after_targets_MiB"][part] - r["rss_before_targets_MiB"][part])
    return round(delta * 1024 / int(r["size"]["targets"]), 2)


def rate(value: float) -> str:
    return "0" if not value else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def report(r: dict[str, Any]) -> str:
    size = r["size"]
    lines = [f"scale: {size['relays']} relays, {size['targets']:,} targets, "
             f"{size['sessions']:,} sessions, started {r['started_utc']} UTC, "
             f"load {r['load_start']} at start, {r['load_end']} at the end", ""]
    lines += ["| memory | before | after targets | after sessions | per target KiB | "
              "per session KiB |", "|---|---|---|---|---|---|"]
    sessions = max(1, r["sessions_open"])
    for part in r["rss_after_sessions_MiB"]:
        b = r["rss_before_targets_MiB"].get(part)
        t = r["rss_after_targets_MiB"].get(part)
        s0 = r["rss_before_sessions_MiB"].get(part, t)
        s1 = r["rss_after_sessions_MiB"][part]
        lines.append(f"| {part} MiB | {b if b is not None else '-'} | "
                     f"{t if t is not None else '-'} | {s1} | "
                     f"{per_target(r, part) if b is not None else '-'} | "
                     f"{round((s1 - s0) * 1024 / sessions, 1) if s0 is not None else '-'} |")
    per_relay = [x for x in r["relay_KiB_per_session"] if x is not None]
    per_route = [round((a - b) * 1024 / size["targets"], 2) for a, b in zip(
        r["relay_rss_after_targets_MiB"], r["relay_rss_before_targets_MiB"], strict=True)]
    lines += ["", "(all): the sum over the processes of that part.",
              f"relay RSS per idle session, KiB (each relay): {per_relay}; median "
              f"{statistics.median(per_relay) if per_relay else '-'}",
              f"relay RSS per route, KiB (each relay): {per_route}",
              f"sessions per relay: {r['sessions_per_relay']}; fds per relay: "
              f"{r['relay_fds_after_sessions']}",
              f"targets: created in {r['targets_created_s']} s, all Ready after "
              f"{r['targets_all_ready_s']} s, on every relay after "
              f"{r['targets_on_every_relay_s']} s",
              f"sessions: {r['sessions_open']:,} open of {size['sessions']:,} in "
              f"{r['sessions_open_s']} s ({r['sessions_open'] / r['sessions_open_s']:.0f}/s), "
              f"{r['sessions_given_up']} given up, {r['sessions_failed_attempts']} failed "
              f"attempts {r['sessions_failures']}; set-up p50 by lane "
              f"{[round(x or 0, 1) for x in r['setup_p50_ms_by_lane']]} ms, p99 "
              f"{[round(x or 0, 1) for x in r['setup_p99_ms_by_lane']]} ms", ""]
    phases = [("creating targets", r["api_rates_targets"]),
              ("quiet, targets only", r["window_targets"]["api_rates"]),
              ("opening sessions", r["api_rates_sessions"]),
              ("quiet, with sessions", r["window_sessions"]["api_rates"]),
              ("storm", r["api_rates_storm"]), ("relay restarted", r["api_rates_restart"])]
    kinds = sorted({k for _, rs in phases for k in rs})
    opened = max(1, r["sessions_open"])
    lines += ["API requests per session opened: " + ", ".join(
        f"{kind} {count / opened:.2f}" for kind, count in r["api_totals_sessions"].items()),
        "API requests in the storm window: " + ", ".join(
        f"{kind} {count}" for kind, count in r["api_totals_storm"].items()),
        "API requests/s at the storm's busiest sample (~2 s): " + ", ".join(
        f"{kind} {max(x.get(kind, 0.0) for x in r['api_storm_series']):.1f}"
        for kind in sorted({k for x in r["api_storm_series"] for k in x if k != "t"})),
        "API requests after the restart: " + ", ".join(
        f"{kind} {count}" for kind, count in r["api_totals_restart"].items()), ""]
    lines += ["| API requests/s | " + " | ".join(name for name, _ in phases) + " |",
              "|---|" + "---|" * len(phases)]
    for kind in kinds:
        lines.append(f"| {kind} | " + " | ".join(rate(rs.get(kind, 0.0)) for _, rs in phases)
                     + " |")
    lines += ["", "| CPU % | quiet, targets only | opening sessions | quiet, with sessions "
              "| storm | relay restarted |", "|---|---|---|---|---|---|"]
    for part in r["cpu_pct_storm"]:
        lines.append(f"| {part} | {r['window_targets']['cpu_pct'].get(part, '-')} | "
                     f"{r['cpu_pct_sessions'].get(part, '-')} | "
                     f"{r['window_sessions']['cpu_pct'].get(part, '-')} | "
                     f"{r['cpu_pct_storm'].get(part, '-')} | "
                     f"{r['cpu_pct_restart'].get(part, '-')} |")
    storm = r["storm"]
    lines += ["", f"storm: relay {storm['victim']} SIGKILLed holding {storm['sessions_held']:,} "
              f"sessions; {storm['lost']:,} lost, {storm['back']:,} back at ServerInit, "
              f"{storm['gave_up']} given up; all back {storm['settle_s']} s after the kill "
              f"(outage p50 {storm['outage_p50_s']} s, p99 {storm['outage_p99_s']} s); "
              f"{storm['sessions_that_retried']} sessions needed more than one attempt, "
              f"{storm['failed_attempts']} failed attempts {storm['failures']}; "
              f"load {storm['load']}",
              f"sessions per relay after the storm: {r['sessions_per_relay_after_storm']}; "
              f"status and Event writes went on until {storm['api_writes_until_s']} s after "
              f"the kill (API window {storm['api_window_s']} s)",
              f"relay restarted: {r['restart']['not_ready_before']:,} targets not Ready before, "
              f"all Ready {r['restart']['all_ready_s']} s after the restart (API window "
              f"{r['restart']['api_window_s']} s), load {r['restart']['load']}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="3 relays, 300 targets, 3 x 200 sessions, 10 s windows")
    parser.add_argument("--relays", type=int, default=10)
    parser.add_argument("--targets", type=int, default=10_000)
    parser.add_argument("--sessions-per-relay", type=int, default=8_000,
                        help="8,000: after the storm a survivor holds 10/9 of it, two "
                             "descriptors each, under the 20,000 hard limit")
    parser.add_argument("--target-rate", type=float, default=100.0, help="creates per second")
    parser.add_argument("--session-rate", type=float, default=200.0,
                        help="sessions opened per second, over all lanes")
    parser.add_argument("--seat-every", type=int, default=10,
                        help="every Nth target has maxViewers (its sessions take seat Leases)")
    parser.add_argument("--max-viewers", type=int, default=32)
    parser.add_argument("--greeter-ports", type=int, default=40)
    parser.add_argument("--window", type=float, default=30.0, help="quiet windows, seconds")
    parser.add_argument("--storm-timeout", type=float, default=600.0)
    parser.add_argument("--auth", choices=("proxy", "none"), default="proxy",
                        help="the relays' --auth: proxy (each viewer a user of its own, each "
                             "session a SubjectAccessReview), or none (no review: an A/B)")
    parser.add_argument("--json", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args()
    if args.quick:
        size = Size(relays=3, targets=300, sessions_per_relay=200, target_rate=100.0,
                    session_rate=100.0, seat_every=args.seat_every, max_viewers=args.max_viewers,
                    greeter_ports=4, window=10.0, storm_timeout=120.0, auth=args.auth)
    else:
        size = Size(args.relays, args.targets, args.sessions_per_relay, args.target_rate,
                    args.session_rate, args.seat_every, args.max_viewers, args.greeter_ports,
                    args.window, args.storm_timeout, args.auth)
    if size.relays < 2:
        parser.error("--relays: at least 2 (one is killed)")
    reaper.install()
    RESULTS.mkdir(parents=True, exist_ok=True)
    logdir = RESULTS / "scale-logs"
    logdir.mkdir(parents=True, exist_ok=True)
    for old in logdir.glob("*.log"):
        old.unlink()
    result: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="vncgate-scale-") as tmp:
            try:
                asyncio.run(run(size, Path(tmp), logdir, result))
            finally:
                # The relays' and balancers' logs, kept beside the others: they say why a
                # session ended on a relay that was not killed.
                for log in [*Path(tmp).glob("relays/*.log"), *Path(tmp).glob("haproxy-*.log")]:
                    shutil.copyfile(log, logdir / log.name)
    except BaseException as exc:
        result["error"] = repr(exc)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"scale: stopped by {exc!r}; what was measured is in {args.json}", flush=True)
        raise
    args.json.write_text(json.dumps(result, indent=1))
    print(report(result))
    print(f"(every figure in {args.json}; logs in {logdir})")


if __name__ == "__main__":
    main()
