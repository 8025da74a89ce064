"""The operator's view of KubeVirt targets on a real API server, with the chart's RBAC.

The chart is installed with kubevirt.enabled, the operator runs as its ServiceAccount, and
KubeVirt's VirtualMachine/VirtualMachineInstance CRDs (reduced to what the operator reads,
tests/cluster/kubevirt-crds.yaml) come and go during the test: first absent ("KubeVirt is not
installed"), then installed. The probe interval is an hour, so every change of status after the
first look comes from the operator's watch of VMs and VMIs, not from a periodic check.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.conftest import CHART, CRDS, Release, helm
from tests.cluster.test_operator import Relay, status_of
from tests.support.cluster import ControlPlane
from tests.support.kubevirt import CRDS as KUBEVIRT_CRDS
from tests.support.processes import ConsoleScript
from tests.support.waiting import wait_until


def remove_kubevirt_crds(plane: ControlPlane) -> None:
    plane.kubectl("delete", "-f", str(KUBEVIRT_CRDS), "--ignore-not-found", "--wait=true",
                  timeout=120)


@pytest.fixture(scope="module")
def kubevirt_release(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
                     ) -> Iterator[Release]:
    plane = control_plane
    remove_kubevirt_crds(plane)  # KubeVirt starts out not installed
    if plane.kubectl("get", "crd", "vnctargets.vncgate.io", check=False).returncode != 0:
        plane.kubectl("apply", "--server-side", "-f", str(CRDS))
    plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                  "crd/vnctargets.vncgate.io")
    namespace, home = "vncgate-kubevirt", tmp_path_factory.mktemp("helm-home")
    helm(plane, home, "install", "vncgate", str(CHART), "--namespace", namespace,
         "--create-namespace", "--set", "ingress.host=vnc.example.com",
         "--set", "kubevirt.enabled=true")
    try:
        yield Release(plane, namespace, home)
    finally:
        helm(plane, home, "uninstall", "vncgate", "--namespace", namespace)
        plane.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        remove_kubevirt_crds(plane)


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    relay = Relay(tmp_path)
    with relay.script:
        relay.script.wait_for_log("relay listening")
        yield relay


@pytest.fixture
def operator(kubevirt_release: Release, relay: Relay, tmp_path: Path
             ) -> Iterator[ConsoleScript]:
    plane = kubevirt_release.plane
    kubeconfig = plane.service_account_kubeconfig(
        tmp_path / "operator.kubeconfig", kubevirt_release.namespace,
        kubevirt_release.operator_account)
    script = ConsoleScript("vncgate-operator", [
        f"--relay-url={relay.internal_url}", f"--api-token-file={relay.token_file}",
        "--public-url=https://vnc.example.com", "--allow-cidr=127.0.0.0/8",
        "--probe-interval=1h", "--resync-interval=3s", "--liveness=off", "--standalone"],
        tmp_path, env={"KUBECONFIG": str(kubeconfig)})
    with script:
        yield script
    assert 'cannot list resource' not in script.log() and \
        'cannot watch resource' not in script.log(), "the chart's RBAC refused the operator"


def kubevirt_target(namespace: str, name: str, vm: str) -> dict[str, Any]:
    return {"apiVersion": "vncgate.io/v1alpha1", "kind": "VncTarget",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"endpoint": {"kubevirt": {"name": vm}}}}


def reachable(plane: ControlPlane, namespace: str, name: str, reason: str,
              *processes: ConsoleScript) -> dict[str, Any]:
    """Wait until the Reachable condition has `reason`; the status then."""
    def seen() -> dict[str, Any] | None:
        for process in processes:
            process.check_running()
        status = status_of(plane, namespace, name)
        conditions = {c["type"]: c for c in status.get("conditions") or ()}
        return status if conditions.get("Reachable", {}).get("reason") == reason else None

    return wait_until(seen, f"{namespace}/{name} Reachable reason {reason}", timeout=90,
                      context=lambda: status_of(plane, namespace, name))


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


def set_vmi_phase(plane: ControlPlane, namespace: str, name: str, phase: str) -> None:
    plane.kubectl("patch", "vmi", name, "-n", namespace, "--subresource=status",
                  "--type=merge", "-p", f'{{"status": {{"phase": "{phase}"}}}}')


def test_status_follows_the_virtual_machine(
        kubevirt_release: Release, namespace: str, relay: Relay,
        operator: ConsoleScript) -> None:
    plane = kubevirt_release.plane
    plane.apply(kubevirt_target(namespace, "vm-1", "vm-1"))
    # KubeVirt is not installed yet: the target says so, and is not Ready.
    status = reachable(plane, namespace, "vm-1", "KubeVirtNotInstalled", operator)
    assert status["phase"] == "Unreachable"
    assert "KubeVirt is not installed" in condition(status, "Reachable")["message"]
    assert condition(status, "Ready")["status"] == "False"
    assert status["endpoint"] == f"kubevirt/{namespace}/vm-1"
    # The route is on the relay all the same: it is what the relay dials once the VM runs.
    wait_until(lambda: f"{namespace}/vm-1" in relay.table(), "the route on the relay")
    assert relay.table()[f"{namespace}/vm-1"]["endpoint"] == {
        "kubevirt": {"namespace": namespace, "name": "vm-1"}}

    # KubeVirt arrives: the operator starts watching, and the target names a missing VM.
    plane.kubectl("apply", "-f", str(KUBEVIRT_CRDS))
    plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                  "crd/virtualmachines.kubevirt.io", "crd/virtualmachineinstances.kubevirt.io")
    status = reachable(plane, namespace, "vm-1", "VirtualMachineNotFound", operator)
    assert "spec.endpoint.kubevirt.name" in condition(status, "Reachable")["message"]

    # A stopped VM: a VirtualMachine without an instance is not Ready, and says why.
    plane.apply({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                 "metadata": {"name": "vm-1", "namespace": namespace},
                 "spec": {"runStrategy": "Halted", "template": {"spec": {}}}})
    status = reachable(plane, namespace, "vm-1", "VirtualMachineStopped", operator)
    assert "has no running instance" in condition(status, "Reachable")["message"]
    assert status["phase"] == "Unreachable"

    # Started: the instance is being scheduled, then Running -> Ready.
    plane.apply({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                 "metadata": {"name": "vm-1", "namespace": namespace}, "spec": {}})
    set_vmi_phase(plane, namespace, "vm-1", "Scheduling")
    status = reachable(plane, namespace, "vm-1", "VirtualMachineStarting", operator)
    assert "not scheduled and running yet" in condition(status, "Reachable")["message"]
    set_vmi_phase(plane, namespace, "vm-1", "Running")
    status = reachable(plane, namespace, "vm-1", "VirtualMachineRunning", operator)
    wait_until(lambda: status_of(plane, namespace, "vm-1").get("phase") == "Ready",
               "the target Ready", context=lambda: status_of(plane, namespace, "vm-1"))

    # Stopped again: the instance goes away, and so does Ready.
    plane.kubectl("delete", "vmi", "vm-1", "-n", namespace)
    status = reachable(plane, namespace, "vm-1", "VirtualMachineStopped", operator)
    assert status["phase"] == "Unreachable"
    assert condition(status, "Ready")["status"] == "False"
