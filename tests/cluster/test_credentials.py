"""Credentials on a real API server: the relay reads a VncTarget's Secret with the chart's relay
ServiceAccount only where the namespace opted in (a RoleBinding to the chart's unbound
ClusterRole), the operator's LocalSubjectAccessReview sees the same thing, and a rotated Secret is
what the next session logs in with. The VNC server is a real Xvnc with VNC Authentication.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml

from harness.xvnc import XvncServer
from tests.cluster.conftest import Release
from tests.cluster.test_relay import open_console, relay_process
from tests.relay.test_upstream_security import (  # noqa: F401 - module-scoped fixtures
    PASSWORD,
    secrets_dir,
    vncauth_xvnc,
)
from vncgate.common.kube import KubeClient, kube_connection
from vncgate.common.model import Route
from vncgate.common.spec import Credentials
from vncgate.operator.secretaccess import unreadable

ROLE = "vncgate-relay-credentials"


def put_secret(release: Release, namespace: str, password: str) -> None:
    release.plane.apply({"apiVersion": "v1", "kind": "Secret",
                         "metadata": {"name": "desk-vnc", "namespace": namespace},
                         "stringData": {"password": password}})


async def operator_verdict(release: Release, kubeconfig: Path, namespace: str) -> str | None:
    """The operator's check, with the operator's own ServiceAccount and the chart's RBAC."""
    client = KubeClient(kube_connection(kubeconfig))
    try:
        route = Route(namespace, "desk", "127.0.0.1", 5900,
                      credentials=Credentials(secret_name="desk-vnc"))
        return await unreadable(client, (release.namespace, release.relay_account), ROLE, route)
    finally:
        await client.close()


def test_opt_in_rolebinding_and_secret_rotation(
        release: Release, namespace: str, vncauth_xvnc: XvncServer,  # noqa: F811
        tmp_path: Path) -> None:
    plane = release.plane
    put_secret(release, namespace, "not-the-password")
    manifest = tmp_path / "desk.yaml"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "vncgate.io/v1alpha1", "kind": "VncTarget",
        "metadata": {"name": "desk", "namespace": namespace},
        "spec": {"endpoint": {"address": {"host": "127.0.0.1", "port": vncauth_xvnc.port}},
                 "credentials": {"secretName": "desk-vnc"}}}))
    operator_kubeconfig = plane.service_account_kubeconfig(
        tmp_path / "operator-kubeconfig", release.namespace, release.operator_account)
    script, port = relay_process(release, tmp_path / "relay", "--auth=none",
                                 "--authorization=manifest", f"--targets={manifest}")
    target = f"{namespace}/desk"
    with script:
        script.wait_for_log("relay listening")

        # 1. No RoleBinding: the relay may not read the Secret, and both sides say which to make.
        data, code, reason = asyncio.run(open_console(port, target))
        assert data is None and code == 4424, (code, reason, script.log()[-2000:])
        assert "RoleBinding" in reason and ROLE in reason, reason
        verdict = asyncio.run(operator_verdict(release, operator_kubeconfig, namespace))
        assert verdict is not None and f"--clusterrole={ROLE}" in verdict, verdict
        assert f"--serviceaccount={release.namespace}:{release.relay_account}" in verdict

        # 2. The namespace opts in with exactly the command the condition gives.
        command = verdict.split("opt this namespace in: ", 1)[1].split()
        assert command[0] == "kubectl"
        plane.kubectl(*command[1:])
        assert asyncio.run(operator_verdict(release, operator_kubeconfig, namespace)) is None
        data, code, reason = asyncio.run(open_console(port, target))
        assert data is None and code == 4424 and "refused the stored credential" in reason, \
            (code, reason)

        # 3. Rotation: the next session logs in with the new password, no restart.
        put_secret(release, namespace, PASSWORD)
        data, code, reason = asyncio.run(open_console(port, target))
        assert data == b"RFB 003.008\n", (code, reason, script.log()[-2000:])

        # Nothing of either password in the relay's log.
        log = script.log()
        assert PASSWORD not in log and "not-the-password" not in log

    # The chart grants the relay no Secret access anywhere else (no ClusterRoleBinding).
    other = plane.kubectl("auth", "can-i", "get", "secrets", "-n", release.namespace,
                          f"--as=system:serviceaccount:{release.namespace}:{release.relay_account}",
                          check=False)
    assert other.stdout.strip() == "no", other.stdout
