"""docs/KUBERNETES.md, followed to the letter against a real API server.

Install, a first console, upgrade and uninstall: each section's shell block runs as written
(real helm, real kubectl). The chart's pods cannot start here (no node), so the relay and the
operator run as local processes with exactly what the chart created for them: their
Deployment's flags, the Secrets they mount, and their ServiceAccounts' tokens (tests/support/
pods.py). The desktop behind the doc's Service `lab/desk-1` is a real Xvnc on a loopback
address that stands in for the Service's cluster IP, which the processes resolve through their
own /etc/hosts, as cluster DNS would.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from harness.cluster import ControlPlane, free_port
from harness.waiting import wait_until
from harness.xvnc import XvncServer
from tests.support.docs import shell_blocks
from tests.support.pods import LocalPod, replace_flag
from tests.support.processes import can_isolate

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "KUBERNETES.md"
HELM_DIR = ROOT / ".tools" / "helm"
SERVICE_HOST = "desk-1.lab.svc.cluster.local"


def run_block(plane: ControlPlane, home: Path, heading: str,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the section's shell block(s) as a reader would: bash, helm and kubectl on PATH."""
    env = {**os.environ, "PATH": f"{HELM_DIR}:{plane.bin}:{os.environ['PATH']}",
           "KUBECONFIG": str(plane.admin_kubeconfig), "HOME": str(home)}
    output = ""
    result = None
    for block in shell_blocks(DOC, heading):
        try:
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=ROOT,
                                    env=env, capture_output=True, text=True, timeout=timeout,
                                    check=False)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"'## {heading}' did not finish within {timeout:.0f} s:\n"
                                 f"{block}\n{exc.stdout!r}\n{exc.stderr!r}") from None
        output += result.stdout
        assert result.returncode == 0, (f"'## {heading}' failed:\n{block}\n"
                                        f"{result.stdout}{result.stderr}")
    assert result is not None
    return subprocess.CompletedProcess(result.args, 0, output, result.stderr)


def loopback_service_ip() -> str:
    """A 127.x address whose port 5900 is free: the stand-in for the Service's cluster IP."""
    for _ in range(50):
        address = f"127.0.{random.randint(1, 254)}.{random.randint(2, 254)}"  # noqa: S311
        with socket.socket() as sock:
            try:
                sock.bind((address, 5900))
            except OSError:
                continue
            return address
    raise RuntimeError("no loopback address with a free port 5900")


@pytest.fixture
def desktop() -> Iterator[XvncServer]:
    with XvncServer(colour="#00ff00", interface=loopback_service_ip(), port=5900) as vnc:
        yield vnc


def secret_value(plane: ControlPlane, namespace: str, name: str, key: str) -> str:
    data = plane.get("secret", name, "-n", namespace)["data"]
    return base64.b64decode(data[key]).decode()


async def first_bytes(url: str, token: str, origin: str) -> bytes:
    """Open the viewer's WebSocket as a browser behind the Ingress would; the first message."""
    async with aiohttp.ClientSession() as session, session.ws_connect(
            url, protocols=("binary",), timeout=aiohttp.ClientWSTimeout(ws_close=5),
            headers={"Authorization": f"Bearer {token}", "Origin": origin}) as ws:
        message = await ws.receive(timeout=15)
        assert message.type == aiohttp.WSMsgType.BINARY, (message.type, message.data,
                                                          message.extra)
        return bytes(message.data)


def test_install_first_console_upgrade_uninstall(control_plane: ControlPlane, tmp_path: Path,
                                                 desktop: XvncServer) -> None:
    why_not = can_isolate()
    if why_not:
        if os.environ.get("CI") == "true":
            pytest.fail(why_not)
        pytest.skip(why_not)
    plane = control_plane
    home = tmp_path / "home"
    home.mkdir()

    # ## Install, on a cluster without vncgate: the chart brings the CRD (other tests applied
    # crds/ outside any release, which the release would refuse to take over).
    plane.kubectl("delete", "crd", "vnctargets.vncgate.io", "--ignore-not-found", "--timeout=60s")
    run_block(plane, home, "Install")
    deployments = {d["metadata"]["name"]
                   for d in plane.get("deployments", "-n", "vncgate")["items"]}
    assert deployments == {"vncgate-relay", "vncgate-operator"}
    ingress = plane.get("ingress", "-n", "vncgate")["items"][0]
    assert ingress["spec"]["rules"][0]["host"] == "vnc.example.com"
    token_before = secret_value(plane, "vncgate", "vncgate-registration-token", "token")
    def drop_webhook() -> None:
        # The API server reaches the admission webhook through its Service, which has no pod
        # here: left in place, it would refuse the doc's VncTarget writes ("failed calling
        # webhook"). test_admission tests it. Each install and upgrade puts it back.
        plane.kubectl("delete", "validatingwebhookconfiguration", "vncgate-operator-vncgate")

    drop_webhook()

    # The desktop pod's Service, which the doc's VncTarget names, in the team's namespace.
    plane.kubectl("create", "namespace", "lab")
    plane.apply({"apiVersion": "v1", "kind": "Service",
                 "metadata": {"name": "desk-1", "namespace": "lab"},
                 "spec": {"ports": [{"name": "vnc", "port": 5900, "targetPort": 5900}],
                          "selector": {"app": "desk-1"}}})

    public, internal, metrics = free_port(), free_port(), free_port()
    relay_pod = LocalPod(plane, "vncgate", "vncgate-relay", tmp_path / "relay")
    operator_pod = LocalPod(plane, "vncgate", "vncgate-operator", tmp_path / "operator")

    def relay_args(args: list[str]) -> list[str]:
        args = replace_flag(args, "--listen", f"127.0.0.1:{public}")
        args = replace_flag(args, "--internal-listen", f"127.0.0.1:{internal}")
        args = replace_flag(args, "--metrics-listen", f"127.0.0.1:{metrics}")
        # The chart denies loopback destinations; here the Service's stand-in is on loopback.
        return [arg for arg in args if arg not in ("--deny-cidr=127.0.0.0/8",)]

    def operator_args(args: list[str]) -> list[str]:
        # Without pods there are no EndpointSlices to find the relay by: name it directly.
        args = replace_flag(args, "--relay-service", None)
        # The webhook's Service has no pod behind it here (test_admission tests the webhook).
        for flag in ("--webhook-listen", "--webhook-cert-file", "--webhook-key-file"):
            args = replace_flag(args, flag, None)
        args = replace_flag(args, "--relay-url", f"http://127.0.0.1:{internal}")
        return replace_flag(args, "--liveness", "off")

    hosts = {SERVICE_HOST: desktop.interface}
    relay = relay_pod.script(relay_args, hosts=hosts)
    operator = operator_pod.script(operator_args, hosts=hosts)
    with relay, operator:
        relay.wait_for_log(r"relay listening")

        # ## A first console
        shown = run_block(plane, home, "A first console")
        assert "desk-1" in shown.stdout

        def ready() -> bool:
            relay.check_running()
            operator.check_running()
            status = plane.get("vnc", "desk-1", "-n", "lab").get("status") or {}
            return bool(status.get("phase") == "Ready")

        try:
            wait_until(ready, "lab/desk-1 Ready", timeout=60)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\nstatus: {plane.get('vnc', 'desk-1', '-n', 'lab')}\n"
                                 f"operator:\n{operator.log()[-3000:]}\n"
                                 f"relay:\n{relay.log()[-3000:]}") from None
        status = plane.get("vnc", "desk-1", "-n", "lab")["status"]
        assert status["url"] == "https://vnc.example.com/t/lab/desk-1/"
        assert status["endpoint"] == f"{SERVICE_HOST}:5900"
        listing = plane.kubectl("get", "vnc", "-n", "lab").stdout
        assert "Ready" in listing and "https://vnc.example.com/t/lab/desk-1/" in listing

        # The URL opens the desktop: the generated admin, as the notes say, through the relay
        # (its SubjectAccessReview goes to the real API server with the relay's own token).
        users = yaml.safe_load(secret_value(plane, "vncgate", "vncgate-users", "users.yaml"))
        admin_secret = users["admin"]["token"]
        greeting = asyncio.run(first_bytes(
            f"http://127.0.0.1:{public}/t/lab/desk-1/websockify", admin_secret,
            "https://vnc.example.com"))
        assert greeting.startswith(b"RFB 003.00")

        # ## Upgrade, as written, then once more with a changed value.
        run_block(plane, home, "Upgrade")
        run_block_env = {**os.environ, "PATH": f"{HELM_DIR}:{os.environ['PATH']}",
                         "KUBECONFIG": str(plane.admin_kubeconfig), "HOME": str(home)}
        subprocess.run([str(HELM_DIR / "helm"), "upgrade", "vncgate", "charts/vncgate",
                        "--namespace", "vncgate", "--reset-then-reuse-values",
                        "--set", "relay.replicas=3"], cwd=ROOT, env=run_block_env,
                       check=True, capture_output=True, timeout=120)
        drop_webhook()
        relay_deployment = plane.get("deployment", "vncgate-relay", "-n", "vncgate")
        assert relay_deployment["spec"]["replicas"] == 3
        assert plane.get("ingress", "-n", "vncgate")["items"][0]["spec"]["rules"][0][
            "host"] == "vnc.example.com", "the values of the install were kept"
        assert secret_value(plane, "vncgate", "vncgate-registration-token", "token") == \
            token_before, "the registration token must survive upgrades"
        # The route survived: the same relay still serves the console.
        assert asyncio.run(first_bytes(
            f"http://127.0.0.1:{public}/t/lab/desk-1/websockify", admin_secret,
            "https://vnc.example.com")).startswith(b"RFB 003.00")

    # ## Uninstall: the pods are gone with the release (here: the processes stopped first).
    # A VncTarget as an older operator left it, with its finalizer and no operator to remove it:
    # without the section's clean-up, deleting the CRD would wait for it until the timeout.
    plane.kubectl("patch", "vnctarget", "desk-1", "--namespace", "lab", "--type", "merge",
                  "--patch", '{"metadata": {"finalizers": ["vncgate.io/finalizer"]}}')
    run_block(plane, home, "Uninstall", timeout=60)
    assert plane.kubectl("get", "crd", "vnctargets.vncgate.io", check=False).returncode != 0
    assert plane.kubectl("get", "deployments", "-n", "vncgate", "-o", "name").stdout == ""
    remaining = plane.kubectl("get", "clusterroles", "-o", "name").stdout
    assert "vncgate" not in remaining
    plane.kubectl("delete", "namespace", "lab", "vncgate", "--wait=false")
