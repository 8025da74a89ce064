"""`vncgate-operator` as a user runs it, against a real API server, with the chart's RBAC.

The chart is installed for real (`release`); the operator authenticates with a token of the
chart's own operator ServiceAccount, either in a kubeconfig or as a pod has it (token and CA
files, KUBERNETES_SERVICE_HOST), so anything the chart forgot to grant fails here. The relay is a
real `vncgate-relay` process in front of a real Xvnc.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from harness.cluster import ControlPlane, free_port
from harness.waiting import wait_until
from harness.xvnc import XvncServer
from tests.cluster.conftest import Release
from tests.support.processes import ConsoleScript, can_isolate

TOKEN = "cluster-test-registration-token-0123456789"


class Relay:
    def __init__(self, workdir: Path, *extra: str) -> None:
        self.public, self.internal = free_port(), free_port()
        token_file = workdir / "registration-token"
        token_file.write_text(TOKEN)
        self.token_file = token_file
        self.script = ConsoleScript("vncgate-relay", [
            f"--listen=127.0.0.1:{self.public}", f"--internal-listen=127.0.0.1:{self.internal}",
            f"--api-token-file={token_file}", "--auth=none", "--log-format=json", *extra],
            workdir)

    @classmethod
    @contextlib.contextmanager
    def running(cls, workdir: Path, *extra: str) -> Iterator[Relay]:
        relay = cls(workdir, *extra)
        with relay.script:
            relay.script.wait_for_log("relay listening")
            yield relay

    @property
    def internal_url(self) -> str:
        return f"http://127.0.0.1:{self.internal}"

    def table(self) -> dict[str, Any]:
        request = urllib.request.Request(  # noqa: S310 - http on loopback
            f"{self.internal_url}/api/v1/targets", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=5) as reply:  # noqa: S310 - loopback
            body = json.load(reply)
        return {f"{t['namespace']}/{t['name']}": t for t in body["targets"]}


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    with Relay.running(tmp_path) as relay:
        yield relay


OperatorFactory = Callable[..., ConsoleScript]


@pytest.fixture
def start_operator(release: Release, relay: Relay, tmp_path: Path
                   ) -> Iterator[OperatorFactory]:
    started: list[ConsoleScript] = []

    def start(*extra: str, in_cluster: bool = False,
              hosts: dict[str, str] | None = None) -> ConsoleScript:
        plane = release.plane
        args = [f"--relay-url={relay.internal_url}", f"--api-token-file={relay.token_file}",
                "--public-url=https://vnc.example.com", "--allow-cidr=127.0.0.0/8",
                "--probe-interval=2s", "--resync-interval=3s", "--liveness=off",
                "--standalone", *extra]
        workdir = tmp_path / f"operator-{len(started)}"
        workdir.mkdir()
        if in_cluster:
            account = workdir / "serviceaccount"
            env = plane.in_cluster_files(account, release.namespace, release.operator_account)
            script = ConsoleScript("vncgate-operator", args, workdir, env=env, hosts=hosts,
                                   service_account=account)
        else:
            kubeconfig = plane.service_account_kubeconfig(
                workdir / "kubeconfig", release.namespace, release.operator_account)
            script = ConsoleScript("vncgate-operator", args, workdir, hosts=hosts,
                                   env={"KUBECONFIG": str(kubeconfig)})
        started.append(script.start())
        return script

    yield start
    for script in started:
        script.stop()
        # RBAC's refusals name the account ("User \"system:serviceaccount:...\" cannot list
        # ..."); other 403s (writing into a namespace being deleted) are not the chart's doing.
        refused = re.search(r'User \\?"system:serviceaccount:[^"\\]+\\?" cannot [^.]*',
                            script.log())
        assert refused is None, f"the chart's RBAC refused the operator: {refused.group(0)}"


def address_target(namespace: str, name: str, host: str, port: int) -> dict[str, Any]:
    return {"apiVersion": "vncgate.io/v1alpha1", "kind": "VncTarget",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"endpoint": {"address": {"host": host, "port": port}}}}


def service_target(namespace: str, name: str, service: str, port: int | str) -> dict[str, Any]:
    return {"apiVersion": "vncgate.io/v1alpha1", "kind": "VncTarget",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"endpoint": {"service": {"name": service, "port": port}}}}


def status_of(plane: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    return plane.get("vnc", name, "-n", namespace).get("status") or {}


def wait_phase(plane: ControlPlane, namespace: str, name: str, phase: str,
               *processes: ConsoleScript, timeout: float = 60) -> dict[str, Any]:
    def reached() -> bool:
        for process in processes:
            process.check_running()
        return status_of(plane, namespace, name).get("phase") == phase

    try:
        wait_until(reached, f"{namespace}/{name} {phase}", timeout=timeout)
    except TimeoutError as exc:
        logs = "\n".join(p.log()[-3000:] for p in processes)
        raise AssertionError(f"{exc}: status {status_of(plane, namespace, name)}\n{logs}") \
            from None
    return status_of(plane, namespace, name)


def test_targets_become_ready_with_the_charts_operator_account(
        release: Release, namespace: str, relay: Relay, xvnc: XvncServer,
        start_operator: OperatorFactory) -> None:
    plane = release.plane
    why_not = can_isolate()
    service_ip = "127.0.0.1"
    hosts = {f"desk.{namespace}.svc.cluster.local": service_ip} if why_not is None else None
    operator = start_operator(hosts=hosts)
    plane.apply(address_target(namespace, "bmc", "127.0.0.1", xvnc.port))
    status = wait_phase(plane, namespace, "bmc", "Ready", operator, relay.script)
    assert status["url"] == f"https://vnc.example.com/t/{namespace}/bmc/"
    assert status["serverVersion"].startswith("RFB 003.")
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Registered"]["status"] == conditions["Reachable"]["status"] == "True"
    assert relay.table()[f"{namespace}/bmc"]["endpoint"]["port"] == xvnc.port

    # The printer columns, as `kubectl get vnc` shows them.
    listing = plane.kubectl("get", "vnc", "-n", namespace).stdout
    assert "Ready" in listing and f"127.0.0.1:{xvnc.port}" in listing

    # An Event for the transition, posted with the operator's own RBAC.
    def event_posted() -> bool:
        events = plane.get("events", "-n", namespace)["items"]
        return any(e["involvedObject"].get("name") == "bmc" and "Ready" in e["message"]
                   for e in events)

    wait_until(event_posted, "an Event for bmc's transition to Ready", timeout=30)

    if why_not is not None:
        pytest.skip(f"the Service half of this test needs a private /etc/hosts: {why_not}")
    plane.apply({"apiVersion": "v1", "kind": "Service",
                 "metadata": {"name": "desk", "namespace": namespace},
                 "spec": {"ports": [{"name": "vnc", "port": xvnc.port}],
                          "selector": {"app": "desk"}}})
    plane.apply(service_target(namespace, "desk", "desk", "vnc"))
    status = wait_phase(plane, namespace, "desk", "Ready", operator, relay.script)
    assert status["endpoint"] == f"desk.{namespace}.svc.cluster.local:{xvnc.port}"


def test_in_cluster_credentials(release: Release, namespace: str, relay: Relay,
                                xvnc: XvncServer, start_operator: OperatorFactory) -> None:
    why_not = can_isolate()
    if why_not is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(why_not)
        pytest.skip(why_not)
    operator = start_operator(in_cluster=True)
    release.plane.apply(address_target(namespace, "desk", "127.0.0.1", xvnc.port))
    wait_phase(release.plane, namespace, "desk", "Ready", operator, relay.script)


def test_invalid_targets_say_what_to_fix(release: Release, namespace: str, relay: Relay,
                                         start_operator: OperatorFactory) -> None:
    plane = release.plane
    operator = start_operator()
    plane.apply({"apiVersion": "v1", "kind": "Service",
                 "metadata": {"name": "web", "namespace": namespace},
                 "spec": {"ports": [{"name": "http", "port": 80}], "selector": {"app": "x"}}})
    plane.apply([
        service_target(namespace, "no-service", "missing", 5900),
        service_target(namespace, "no-port", "web", "vnc"),
        # Outside the operator's policy (127.0.0.0/8 only here): Invalid without a probe.
        address_target(namespace, "lab", "10.20.0.15", 5900),
    ])
    for name, words in (("no-service", "Service"), ("no-port", "vnc"), ("lab", "10.20.0.15")):
        status = wait_phase(plane, namespace, name, "Invalid", operator, relay.script)
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        assert words in ready["message"], ready
        assert f"{namespace}/{name}" not in relay.table()


def test_deletion_is_never_blocked(release: Release, namespace: str, relay: Relay,
                                   xvnc: XvncServer, start_operator: OperatorFactory) -> None:
    plane = release.plane
    operator = start_operator()
    plane.apply([address_target(namespace, f"desk-{i}", "127.0.0.1", xvnc.port)
                 for i in range(5)])
    for i in range(5):
        wait_phase(plane, namespace, f"desk-{i}", "Ready", operator, relay.script)

    # One target, with the operator running: gone from the API and from the relay.
    plane.kubectl("delete", "vnc", "desk-0", "-n", namespace, "--timeout=30s")
    wait_until(lambda: f"{namespace}/desk-0" not in relay.table(), "desk-0 leaving the relay",
               timeout=30)

    # The operator uninstalled (stopped): the rest, and their namespace, still delete.
    operator.stop()
    result = plane.kubectl("delete", "namespace", namespace, "--timeout=60s", check=False,
                           timeout=90)
    assert result.returncode == 0, result.stderr
    assert plane.kubectl("get", "namespace", namespace, check=False).returncode != 0


def test_active_sessions_follow_a_viewer_without_waiting_for_the_next_look(
        release: Release, namespace: str, relay: Relay, xvnc: XvncServer,
        start_operator: OperatorFactory) -> None:
    """status.activeSessions (and `kubectl vnc list`, which prints it) changes when a viewer
    comes or goes, not at the target's next look: here the next look is an hour away."""
    plane = release.plane
    operator = start_operator("--probe-interval=1h", "--resync-interval=1h")
    plane.apply(address_target(namespace, "desk", "127.0.0.1", xvnc.port))
    status = wait_phase(plane, namespace, "desk", "Ready", operator, relay.script)
    assert status["activeSessions"] == 0

    def sessions_are(count: int) -> Callable[[], bool]:
        return lambda: operator.check_running() and \
            status_of(plane, namespace, "desk").get("activeSessions") == count

    async def scenario() -> None:
        url = f"http://127.0.0.1:{relay.public}"
        async with aiohttp.ClientSession() as http, http.ws_connect(
                f"{url}/t/{namespace}/desk/websockify", protocols=("binary",),
                origin=url) as ws:
            first = await ws.receive(timeout=20)
            assert first.type == aiohttp.WSMsgType.BINARY, first
            await asyncio.to_thread(wait_until, sessions_are(1), "activeSessions 1",
                                    timeout=30)
        await asyncio.to_thread(wait_until, sessions_are(0), "activeSessions 0", timeout=30)

    asyncio.run(scenario())
