"""The operator in namespaced mode (`operator.watchNamespaces`) with exactly the chart's RBAC,
on the real API server.

The chart grants only Roles in that mode. kopf, left to its defaults, lists namespaces and
watches CRDs cluster-wide to expand namespace patterns; with Roles only, that is a 403 which kopf
retries for about 54 s before it falls back, and the operator serves nothing meanwhile. The
operator turns kopf's cluster scanning off when it is given exact namespaces.

The test runs the installed `vncgate-operator` and `vncgate-relay` console scripts as processes:
the operator authenticates with a ServiceAccount token bound to the chart's rendered Roles, the
relay fronts a real Xvnc on 127.0.0.1.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.cluster import ROOT, ControlPlane, free_port
from harness.waiting import wait_until
from harness.xvnc import XvncServer
from tests.chart.conftest import CHART, HELM
from tests.support.processes import ConsoleScript

RELEASE = "vncgate"
# Only a deadline for a machine under any load (start-up is about 2 s when idle, over 20 s was
# seen with the load at 10 on 2 cores). What fails kopf's ~54 s of 403 retries is not the clock
# but the operator's log: no refusal may appear in it (FORBIDDEN_MARKS).
FIRST_STATUS_WITHIN = 120.0
# A refusal in any of kopf's or the operator's words; "403" as a status, not inside a port number.
FORBIDDEN_MARKS = re.compile(r"(?<![\d:])403(?!\d)|[Ff]orbidden|Not enough permissions")


def render_chart(release_namespace: str, watch: list[str]) -> list[dict[str, Any]]:
    if not HELM.exists():
        pytest.skip(f"helm is not at {HELM.relative_to(ROOT)}: run scripts/setup")
    result = subprocess.run(
        [str(HELM), "template", RELEASE, str(CHART), "--namespace", release_namespace,
         "--set", "operator.watchNamespaces={" + ",".join(watch) + "}"],
        capture_output=True, text=True, timeout=60, check=True)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def operator_objects(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The operator's ServiceAccount and every RBAC object the chart renders for it."""
    rbac_kinds = {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
    picked = [m for m in manifests
              if (m["kind"] == "ServiceAccount" or m["kind"] in rbac_kinds)
              and m["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "operator"]
    assert picked, "the chart rendered no operator ServiceAccount or RBAC"
    return picked


def operator_args(manifests: list[dict[str, Any]], relay_url: str, token_file: Path
                  ) -> list[str]:
    """The chart's own operator arguments, with the relay found by URL instead of discovery
    (the relay runs on 127.0.0.1, which an EndpointSlice may not name) and files on this host."""
    deployment = next(m for m in manifests if m["kind"] == "Deployment"
                      and m["metadata"]["labels"].get("app.kubernetes.io/component") == "operator")
    args: list[str] = []
    for arg in deployment["spec"]["template"]["spec"]["containers"][0]["args"]:
        flag = arg.split("=", 1)[0]
        if flag == "--relay-service":
            # The chart's operator also watches the relay's namespace (for its EndpointSlices).
            relay_namespace = arg.split("=", 1)[1].split("/")[0]
            args += [f"--relay-url={relay_url}", f"--namespace={relay_namespace}"]
        elif flag == "--api-token-file":
            args.append(f"--api-token-file={token_file}")
        elif flag.startswith("--webhook-") or flag == "--address-grants":
            # Neither is under test here (test_admission is): no pod, no mounted files.
            continue
        elif flag == "--liveness":
            args.append("--liveness=off")
        elif flag == "--log-format":
            args.append("--log-format=text")
        else:
            args.append(arg)
    return [*args, "--allow-cidr=127.0.0.0/8", "--probe-interval=2s", "--resync-interval=5s"]


@pytest.fixture
def watched_namespace(control_plane: ControlPlane, namespace: str) -> Iterator[str]:
    name = f"{namespace[:50]}-vnc"
    control_plane.kubectl("create", "namespace", name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


def target_status(plane: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    found = plane.kubectl("get", "vnctarget", name, "-n", namespace, "-o", "json", check=False)
    if found.returncode != 0:
        return {}
    status: dict[str, Any] = yaml.safe_load(found.stdout).get("status") or {}
    return status


def test_namespaced_operator_serves_at_once_with_the_charts_roles(
        control_plane: ControlPlane, namespace: str, watched_namespace: str,
        tmp_path: Path) -> None:
    release_namespace = namespace
    manifests = render_chart(release_namespace, [watched_namespace])
    objects = operator_objects(manifests)
    assert not [o for o in objects if o["kind"].startswith("Cluster")], (
        "namespaced mode must grant nothing cluster-wide")
    control_plane.apply(objects)
    account = next(o for o in objects if o["kind"] == "ServiceAccount")["metadata"]["name"]
    kubeconfig = control_plane.service_account_kubeconfig(
        tmp_path / "operator.kubeconfig", release_namespace, account)
    # The ServiceAccount really is confined: it may not list namespaces or CRDs.
    for resource in ("namespaces", "customresourcedefinitions"):
        denied = control_plane.kubectl("auth", "can-i", "list", resource,
                                       kubeconfig_path=kubeconfig, check=False)
        assert denied.stdout.strip() == "no", (resource, denied.stdout, denied.stderr)

    token_file = tmp_path / "token"
    token_file.write_text(secrets.token_urlsafe(32))
    public, internal = free_port(), free_port()
    with XvncServer(log_path=tmp_path / "xvnc.log") as xvnc:
        control_plane.apply({
            "apiVersion": "vncgate.io/v1alpha1", "kind": "VncTarget",
            "metadata": {"name": "desk", "namespace": watched_namespace},
            "spec": {"endpoint": {"address": {"host": "127.0.0.1", "port": xvnc.port}}}})
        relay = ConsoleScript("vncgate-relay", [
            f"--listen=127.0.0.1:{public}", f"--internal-listen=127.0.0.1:{internal}",
            f"--api-token-file={token_file}"], tmp_path).start()
        operator: ConsoleScript | None = None
        try:
            args = operator_args(manifests, f"http://127.0.0.1:{internal}", token_file)
            started = time.monotonic()
            operator = ConsoleScript("vncgate-operator", args, tmp_path,
                                     env={"KUBECONFIG": str(kubeconfig)}).start()
            running = operator
            try:
                wait_until(
                    lambda: target_status(control_plane, watched_namespace, "desk")
                    .get("phase") == "Ready" or not running.running(),
                    "the first VncTarget Ready", timeout=FIRST_STATUS_WITHIN)
            except TimeoutError as exc:
                pytest.fail(f"{exc} after the operator's start; its log:\n"
                            f"{operator.log()[-4000:]}")
            output = operator.log()
            assert operator.running(), f"the operator exited:\n{output[-4000:]}"
            took = time.monotonic() - started
            status = target_status(control_plane, watched_namespace, "desk")
            assert status["phase"] == "Ready", (status, took, output[-4000:])
            assert status["endpoint"] == f"127.0.0.1:{xvnc.port}"
            # And nothing it does is refused: no 403 in its log.
            marks = [line for line in output.splitlines()
                     if FORBIDDEN_MARKS.search(line)]
            assert not marks, "\n".join(marks[:10])
        finally:
            if operator is not None:
                operator.stop()
            relay.stop()


def test_namespaced_operator_checks_the_relays_secret_access_with_local_reviews(
        control_plane: ControlPlane, namespace: str, watched_namespace: str,
        tmp_path: Path) -> None:
    """SubjectAccessReviews are cluster-scoped, which namespaced mode does not grant; the
    operator asks with a LocalSubjectAccessReview in the target's namespace instead, granted by
    the chart's Role there, and only there."""
    release_namespace = namespace
    manifests = render_chart(release_namespace, [watched_namespace])
    objects = operator_objects(manifests)
    control_plane.apply(objects)
    # The relay's Secret-reading ClusterRole (bound nowhere by the chart), under a name of this
    # test's own: a helm release on the same control plane owns the chart's name.
    role = next(m for m in manifests if m["kind"] == "ClusterRole"
                and m["metadata"]["name"].endswith("-credentials"))
    role = {**role, "metadata": {"name": f"{release_namespace}-relay-credentials"}}
    control_plane.apply([role])
    account = next(o for o in objects if o["kind"] == "ServiceAccount")["metadata"]["name"]
    kubeconfig = control_plane.service_account_kubeconfig(
        tmp_path / "operator.kubeconfig", release_namespace, account)
    for where, expected in ((watched_namespace, "yes"), ("default", "no")):
        answer = control_plane.kubectl("auth", "can-i", "create", "localsubjectaccessreviews",
                                       "-n", where, kubeconfig_path=kubeconfig, check=False)
        assert answer.stdout.strip() == expected, (where, answer.stdout, answer.stderr)
    denied = control_plane.kubectl("auth", "can-i", "create", "subjectaccessreviews",
                                   kubeconfig_path=kubeconfig, check=False)
    assert denied.stdout.strip() == "no", denied.stdout

    token_file = tmp_path / "token"
    token_file.write_text(secrets.token_urlsafe(32))
    internal = free_port()
    with XvncServer(log_path=tmp_path / "xvnc.log") as xvnc:
        control_plane.apply({
            "apiVersion": "vncgate.io/v1alpha1", "kind": "VncTarget",
            "metadata": {"name": "desk", "namespace": watched_namespace},
            "spec": {"endpoint": {"address": {"host": "127.0.0.1", "port": xvnc.port}},
                     "credentials": {"secretName": "desk-vnc"}}})
        relay = ConsoleScript("vncgate-relay", [
            f"--listen=127.0.0.1:{free_port()}", f"--internal-listen=127.0.0.1:{internal}",
            f"--api-token-file={token_file}"], tmp_path).start()
        operator: ConsoleScript | None = None
        try:
            args = operator_args(manifests, f"http://127.0.0.1:{internal}", token_file)
            assert any(a.startswith("--relay-service-account=") for a in args), args
            args = [f"--relay-credentials-role={role['metadata']['name']}"
                    if a.startswith("--relay-credentials-role=") else a for a in args]
            operator = ConsoleScript("vncgate-operator", args, tmp_path,
                                     env={"KUBECONFIG": str(kubeconfig)}).start()
            running = operator

            def reason() -> str:
                for condition in target_status(control_plane, watched_namespace, "desk").get(
                        "conditions") or ():
                    if condition["type"] == "Ready":
                        return f"{condition['reason']}: {condition['message']}"
                return ""

            wait_until(lambda: reason().startswith("CredentialsNotReadable")
                       or not running.running(),
                       "CredentialsNotReadable in status", timeout=FIRST_STATUS_WITHIN)
            said = reason()
            assert said.startswith("CredentialsNotReadable"), (said, operator.log()[-4000:])
            command = said.split("opt this namespace in: ", 1)[1].split()
            assert command[0] == "kubectl" and f"--clusterrole={role['metadata']['name']}" \
                in command, command
            control_plane.kubectl(*command[1:])
            wait_until(lambda: target_status(control_plane, watched_namespace, "desk")
                       .get("phase") == "Ready" or not running.running(),
                       "Ready after the namespace opted in", timeout=FIRST_STATUS_WITHIN)
            output = operator.log()
            assert target_status(control_plane, watched_namespace, "desk")["phase"] == "Ready", \
                output[-4000:]
            marks = [line for line in output.splitlines() if FORBIDDEN_MARKS.search(line)]
            assert not marks, "\n".join(marks[:10])
        finally:
            if operator is not None:
                operator.stop()
            relay.stop()
            control_plane.kubectl("delete", "clusterrole", role["metadata"]["name"], check=False)
