"""The operator's view of KubeVirt targets on a real API server, with the chart's RBAC.

The chart is installed with kubevirt.enabled, the operator runs as its ServiceAccount, and
KubeVirt's VirtualMachine/VirtualMachineInstance CRDs (reduced to what the operator reads,
tests/cluster/kubevirt-crds.yaml) come and go during the test: first absent ("KubeVirt is not
installed"), then installed. The probe interval is an hour, so every change of status after the
first look comes from the operator's watch of VMs and VMIs, not from a periodic check.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from harness.cluster import ControlPlane
from harness.waiting import eventually, wait_until
from harness.xvnc import XvncServer
from tests.cluster.conftest import CHART, CRD_APPLIED, CRDS, NO_POD_WEBHOOK, Release, helm
from tests.cluster.test_kubevirt import closed_with
from tests.cluster.test_operator import Relay, status_of
from tests.support.kubevirt import CRDS as KUBEVIRT_CRDS
from tests.support.kubevirt import KubeVirtBackend
from tests.support.processes import ConsoleScript
from vncgate.relay import closecodes


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
         "--set", "kubevirt.enabled=true", "--set", "kubevirt.discovery=true", *NO_POD_WEBHOOK,
         *CRD_APPLIED)
    try:
        yield Release(plane, namespace, home)
    finally:
        helm(plane, home, "uninstall", "vncgate", "--namespace", namespace)
        plane.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        remove_kubevirt_crds(plane)


@pytest.fixture
def relay(kubevirt_release: Release, tmp_path: Path) -> Iterator[Relay]:
    """A relay as the chart's ServiceAccount (kubevirt.enabled: it may open VM consoles)."""
    kubeconfig = kubevirt_release.plane.service_account_kubeconfig(
        tmp_path / "relay.kubeconfig", kubevirt_release.namespace,
        kubevirt_release.relay_account)
    with Relay.running(tmp_path, f"--kubeconfig={kubeconfig}") as relay:
        yield relay


OperatorFactory = Callable[..., ConsoleScript]


@pytest.fixture
def start_operator(kubevirt_release: Release, relay: Relay, tmp_path: Path
                   ) -> Iterator[OperatorFactory]:
    plane = kubevirt_release.plane
    started: list[ConsoleScript] = []

    def start(*extra: str) -> ConsoleScript:
        kubeconfig = plane.service_account_kubeconfig(
            tmp_path / "operator.kubeconfig", kubevirt_release.namespace,
            kubevirt_release.operator_account)
        script = ConsoleScript("vncgate-operator", [
            f"--relay-url={relay.internal_url}", f"--api-token-file={relay.token_file}",
            "--public-url=https://vnc.example.com", "--allow-cidr=127.0.0.0/8",
            "--probe-interval=1h", "--resync-interval=3s", "--liveness=off", "--standalone",
            *extra], tmp_path, env={"KUBECONFIG": str(kubeconfig)})
        started.append(script.start())
        return script

    yield start
    for script in started:
        script.stop()
        log = script.log()
        assert "cannot list resource" not in log and "cannot watch resource" not in log and \
            "cannot create resource" not in log, "the chart's RBAC refused the operator"


@pytest.fixture
def operator(start_operator: OperatorFactory) -> ConsoleScript:
    return start_operator()


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


def test_discovery_makes_a_target_per_labelled_vm(
        kubevirt_release: Release, namespace: str, relay: Relay,
        start_operator: OperatorFactory) -> None:
    plane = kubevirt_release.plane
    plane.kubectl("apply", "-f", str(KUBEVIRT_CRDS))
    plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                  "crd/virtualmachines.kubevirt.io", "crd/virtualmachineinstances.kubevirt.io")
    vm = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
          "metadata": {"name": "vm-1", "namespace": namespace,
                       "labels": {"vncgate.io/console": "true"},
                       "annotations": {"vncgate.io/display-name": "Lab VM 1"}},
          "spec": {"runStrategy": "Always", "template": {"spec": {}}}}
    # One labelled before the operator starts, one after: both are found.
    plane.apply(vm)
    operator = start_operator("--kubevirt-discovery")
    plane.apply({**vm, "metadata": {**vm["metadata"], "name": "vm-2"}})
    plane.apply({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                 "metadata": {"name": "vm-3", "namespace": namespace},
                 "spec": {"runStrategy": "Always", "template": {"spec": {}}}})

    def targets() -> set[str]:
        operator.check_running()
        listing = plane.get("vnc", "-n", namespace)["items"]
        return {item["metadata"]["name"] for item in listing}

    wait_until(lambda: targets() == {"vm-1", "vm-2"}, "VncTargets for the labelled VMs",
               context=lambda: f"{targets()}; the operator's log:\n{operator.log()[-3000:]}")
    target = plane.get("vnc", "vm-1", "-n", namespace)
    owner = plane.get("vm", "vm-1", "-n", namespace)["metadata"]["uid"]
    assert target["spec"] == {"endpoint": {"kubevirt": {"name": "vm-1"}},
                              "displayName": "Lab VM 1", "viewOnly": False}  # CRD default
    assert [(r["kind"], r["name"], r["uid"], r["controller"])
            for r in target["metadata"]["ownerReferences"]] == [
        ("VirtualMachine", "vm-1", owner, True)]
    # It is a target like any other: Ready while its instance runs.
    plane.apply({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                 "metadata": {"name": "vm-1", "namespace": namespace}, "spec": {}})
    set_vmi_phase(plane, namespace, "vm-1", "Running")
    wait_until(lambda: status_of(plane, namespace, "vm-1").get("phase") == "Ready",
               "the discovered target Ready", context=lambda: status_of(plane, namespace, "vm-1"))
    # The label goes: so does the target.
    plane.kubectl("label", "vm", "vm-2", "-n", namespace, "vncgate.io/console-")
    wait_until(lambda: targets() == {"vm-1"}, "the unlabelled VM's target deleted",
               context=targets)
    # The VM goes: the garbage collector deletes its target (the owner reference).
    plane.kubectl("delete", "vm", "vm-1", "-n", namespace)
    wait_until(lambda: targets() == set(), "the deleted VM's target deleted", context=targets)


def test_a_virtual_machine_of_one_mebibyte_is_followed(
        kubevirt_release: Release, namespace: str, relay: Relay,
        operator: ConsoleScript) -> None:
    # Large cloud-init user data is common in VirtualMachines. Each watch event carries the
    # whole object on one line: one over the reader's line limit would end the watch at that
    # event, and the restarted watch would meet it again, for ever.
    plane = kubevirt_release.plane
    plane.kubectl("apply", "-f", str(KUBEVIRT_CRDS))
    plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                  "crd/virtualmachines.kubevirt.io", "crd/virtualmachineinstances.kubevirt.io")
    plane.apply(kubevirt_target(namespace, "big", "big"))
    reachable(plane, namespace, "big", "VirtualMachineNotFound", operator)
    user_data = "#cloud-config\nwrite_files:\n- path: /etc/motd\n  content: |\n" + "".join(
        f"    line {n:07d} of a long message of the day\n" for n in range(24_000))
    assert len(user_data) > 1024 * 1024
    vm = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
          "metadata": {"name": "big", "namespace": namespace},
          "spec": {"runStrategy": "Halted", "template": {"spec": {"volumes": [
              {"name": "cloudinit", "cloudInitNoCloud": {"userData": user_data}}]}}}}
    # `create`, not `apply`: apply would copy the object into an annotation (256 KiB at most).
    plane.kubectl("create", "-f", "-", input=json.dumps(vm))
    stored = plane.get("vm", "big", "-n", namespace)
    assert len(json.dumps(stored)) > 1024 * 1024  # the API server kept all of it
    # The probe interval is an hour: only the watch's event of the new VM can tell the operator.
    status = reachable(plane, namespace, "big", "VirtualMachineStopped", operator)
    assert "has no running instance" in condition(status, "Reachable")["message"]
    # The watch went on past it: the deletion (an event with the whole object again) is seen.
    plane.kubectl("delete", "vm", "big", "-n", namespace)
    reachable(plane, namespace, "big", "VirtualMachineNotFound", operator)
    assert "the most this reader takes" not in operator.log()  # no event refused on its size


async def test_a_console_kubevirt_keeps_for_another_client_shows_in_status(
        kubevirt_release: Release, namespace: str, relay: Relay, operator: ConsoleScript,
        kubevirt_api: KubeVirtBackend, xvnc: XvncServer) -> None:
    """KubeVirt refuses the relay a console that someone on `virtctl vnc` holds
    (preserveSession): the viewer is closed with 4409 saying so, and the target's status says
    so too (ConsoleAvailable), without leaving Ready: the VM runs. A later session that opens
    the console clears it. Real relay and operator processes, the chart's RBAC, KubeVirt's
    console API aggregated into the real API server."""
    plane = kubevirt_release.plane
    plane.kubectl("apply", "-f", str(KUBEVIRT_CRDS))
    plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                  "crd/virtualmachines.kubevirt.io", "crd/virtualmachineinstances.kubevirt.io")
    plane.apply({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                 "metadata": {"name": "vm-1", "namespace": namespace}, "spec": {}})
    set_vmi_phase(plane, namespace, "vm-1", "Running")
    kubevirt_api.consoles[(namespace, "vm-1")] = xvnc.port
    plane.apply(kubevirt_target(namespace, "vm-1", "vm-1"))
    await asyncio.to_thread(wait_until, lambda: status_of(plane, namespace, "vm-1").get(
        "phase") == "Ready", "the target Ready", context=lambda: status_of(plane, namespace,
                                                                        "vm-1"))
    viewer = f"ws://127.0.0.1:{relay.public}/t/{namespace}/vm-1/websockify"

    def console(reason: str) -> dict[str, Any] | None:
        operator.check_running()
        status = status_of(plane, namespace, "vm-1")
        found = {c["type"]: c for c in status.get("conditions") or ()}.get("ConsoleAvailable")
        return status if found is not None and found["reason"] == reason else None

    admin = ssl.create_default_context(cafile=str(plane.certs.ca_crt))
    admin.load_cert_chain(*map(str, plane.certs.admin))
    outside_url = (f"{plane.url}/apis/subresources.kubevirt.io/v1/namespaces/{namespace}/"
                   "virtualmachineinstances/vm-1/vnc")
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(outside_url, protocols=("plain.kubevirt.io",),
                                   ssl=admin) as outside:
            assert (await outside.receive(timeout=20)).data == b"RFB 003.008\n"
            async with http.ws_connect(viewer, protocols=("binary",)) as ws:
                code, reason = await closed_with(ws)
            assert code == closecodes.CONFLICT, (code, reason)
            status = await asyncio.to_thread(
                wait_until, lambda: console("HeldByAnotherClient"),
                "ConsoleAvailable HeldByAnotherClient", timeout=60,
                context=lambda: status_of(plane, namespace, "vm-1"))
            held = condition(status, "ConsoleAvailable")
            assert held["status"] == "False"
            assert reason in held["message"] and "preserveSession" in held["message"], held
            assert status["phase"] == "Ready"  # the VM runs; its console is busy
            assert not outside.closed and kubevirt_api.replaced == 0

        # They leave; the next viewer gets the console, and status follows.
        async def opened() -> bool:
            async with http.ws_connect(viewer, protocols=("binary",)) as ws:
                first = await ws.receive(timeout=20)
                return first.type is aiohttp.WSMsgType.BINARY

        await eventually(opened, "a viewer opening the console once it is free",
                         interval=0.5)
    status = await asyncio.to_thread(
        wait_until, lambda: console("ConsoleOpened"), "ConsoleAvailable ConsoleOpened",
        timeout=60, context=lambda: status_of(plane, namespace, "vm-1"))
    assert condition(status, "ConsoleAvailable")["status"] == "True"
