"""Credentials on a real API server: the relay reads a VncTarget's Secret with the chart's relay
ServiceAccount only where the namespace opted in (a RoleBinding to the chart's unbound
ClusterRole), the operator's LocalSubjectAccessReview sees the same thing, and a rotated Secret is
what the next session logs in with. The VNC server is a real Xvnc with VNC Authentication.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from harness.cluster import free_port
from harness.waiting import wait_until
from harness.xvnc import XvncServer
from tests.cluster.conftest import Release
from tests.cluster.test_relay import open_console, relay_process
from tests.relay.test_upstream_security import (  # noqa: F401 - module-scoped fixtures
    PASSWORD,
    secrets_dir,
    vncauth_xvnc,
)
from tests.support.processes import ConsoleScript
from vncgate.common.client import RelayClient
from vncgate.common.kube import KubeClient, kube_connection
from vncgate.common.model import Route
from vncgate.common.spec import Credentials
from vncgate.operator.secretaccess import NOT_READABLE, binding_hint, login_verdict, unreadable

ROLE = "vncgate-relay-credentials"


def put_secret(release: Release, namespace: str, password: str, name: str = "desk-vnc",
               consent: bool = True) -> None:
    """The Secret, consenting (by annotation) to serve the VncTarget `desk` unless told not to."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if consent:
        meta["annotations"] = {"vncgate.io/allowed-targets": "desk"}
    release.plane.apply({"apiVersion": "v1", "kind": "Secret", "metadata": meta,
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


async def reported_verdict(internal: int, token: str, route: Route) -> tuple[str, str] | None:
    """What the operator's status says from the relay's reported logins (login_verdict)."""
    async with aiohttp.ClientSession() as http:
        logins = (await RelayClient(http, f"http://127.0.0.1:{internal}", token)
                  .get_summary()).logins
    verdict = login_verdict(route, logins.get(route.key))
    return None if verdict is None else (verdict.reason, verdict.message)


def test_a_secret_that_does_not_consent_is_not_used(
        release: Release, namespace: str, vncauth_xvnc: XvncServer,  # noqa: F811
        tmp_path: Path) -> None:
    """Even with the namespace opted in and the right password inside, a Secret that does not
    say it is for VNC (its type, or the annotation naming the target) gives the relay nothing:
    the VncTarget's author may have named someone else's Secret past the webhook."""
    plane = release.plane
    account = (release.namespace, release.relay_account)
    plane.kubectl(*binding_hint(namespace, account, ROLE).split()[1:])
    put_secret(release, namespace, PASSWORD, name="db-password", consent=False)
    manifest = tmp_path / "desk.yaml"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "vncgate.io/v1alpha1", "kind": "VncTarget",
        "metadata": {"name": "desk", "namespace": namespace},
        "spec": {"endpoint": {"address": {"host": "127.0.0.1", "port": vncauth_xvnc.port}},
                 "credentials": {"secretName": "db-password"}}}))
    token = tmp_path / "token"
    token.write_text(secrets.token_urlsafe(32))
    internal = free_port()
    script, port = relay_process(release, tmp_path / "relay", "--auth=none",
                                 "--authorization=manifest", f"--targets={manifest}",
                                 f"--internal-listen=127.0.0.1:{internal}",
                                 f"--api-token-file={token}")
    route = Route(namespace, "desk", "127.0.0.1", vncauth_xvnc.port,
                  credentials=Credentials(secret_name="db-password"))
    with script:
        script.wait_for_log("relay listening")
        data, code, reason = asyncio.run(open_console(port, f"{namespace}/desk"))
        assert data is None and code == 4424, (code, reason, script.log()[-2000:])
        assert reason == (f"Secret {namespace}/db-password is not for VNC: annotate it "
                          "vncgate.io/allowed-targets=desk"), reason
        # The operator's status says the same (from the relays' reported logins).
        said = asyncio.run(reported_verdict(internal, token.read_text(), route))
        assert said is not None and said[0] == NOT_READABLE and reason in said[1], said

        # Another target's name does not do; the Secret's owner names this one: it logs in.
        plane.kubectl("-n", namespace, "annotate", "secret", "db-password",
                      "vncgate.io/allowed-targets=other")
        assert asyncio.run(open_console(port, f"{namespace}/desk"))[1] == 4424
        plane.kubectl("-n", namespace, "annotate", "--overwrite", "secret", "db-password",
                      "vncgate.io/allowed-targets=other,desk")
        data, code, reason = asyncio.run(open_console(port, f"{namespace}/desk"))
        assert data == b"RFB 003.008\n", (code, reason, script.log()[-2000:])

    # The Secret type says it for every target of the namespace.
    plane.kubectl("-n", namespace, "create", "secret", "generic", "typed",
                  "--type=vncgate.io/credentials", f"--from-literal=password={PASSWORD}")
    manifest.write_text(manifest.read_text().replace("db-password", "typed"))
    script, port = relay_process(release, tmp_path / "relay2", "--auth=none",
                                 "--authorization=manifest", f"--targets={manifest}")
    with script:
        script.wait_for_log("relay listening")
        data, code, reason = asyncio.run(open_console(port, f"{namespace}/desk"))
        assert data == b"RFB 003.008\n", (code, reason)


def ready_condition(release: Release, namespace: str, name: str) -> str:
    """`Reason: message` of the target's Ready condition, or ''."""
    status = release.plane.get("vnc", name, "-n", namespace).get("status") or {}
    for condition in status.get("conditions") or ():
        if condition["type"] == "Ready":
            return f"{condition['reason']}: {condition['message']}"
    return ""


def test_credentials_not_readable_clears_once_the_namespace_opts_in(
        release: Release, namespace: str, xvnc: XvncServer, tmp_path: Path) -> None:
    """The relay's own `may not read` (from a viewer's attempt) is older than the RoleBinding
    the condition advised: the operator's next access review outranks it, and the target turns
    Ready without anyone logging in."""
    plane = release.plane
    put_secret(release, namespace, PASSWORD)
    plane.apply({"apiVersion": "vncgate.io/v1alpha1", "kind": "VncTarget",
                 "metadata": {"name": "desk", "namespace": namespace},
                 "spec": {"endpoint": {"address": {"host": "127.0.0.1", "port": xvnc.port}},
                          "credentials": {"secretName": "desk-vnc"}}})
    token_file = tmp_path / "registration-token"
    token_file.write_text(secrets.token_urlsafe(32))
    internal = free_port()
    relay, port = relay_process(release, tmp_path / "relay", "--auth=none",
                                "--authorization=manifest", f"--api-token-file={token_file}",
                                f"--internal-listen=127.0.0.1:{internal}")
    operator_dir = tmp_path / "operator"
    operator_dir.mkdir()
    kubeconfig = plane.service_account_kubeconfig(
        operator_dir / "kubeconfig", release.namespace, release.operator_account)
    operator = ConsoleScript("vncgate-operator", [
        f"--relay-url=http://127.0.0.1:{internal}", f"--api-token-file={token_file}",
        "--public-url=https://vnc.example.com", "--allow-cidr=127.0.0.0/8",
        "--probe-interval=2s", "--resync-interval=3s", "--liveness=off", "--standalone",
        f"--namespace={namespace}", "--verbose",
        f"--relay-service-account={release.namespace}/{release.relay_account}",
        f"--relay-credentials-role={ROLE}"], operator_dir, env={"KUBECONFIG": str(kubeconfig)})
    target = f"{namespace}/desk"

    def logs() -> str:
        return relay.log()[-3000:] + operator.log()[-3000:]

    with relay, operator:
        relay.wait_for_log("relay listening")
        wait_until(lambda: ready_condition(release, namespace, "desk").startswith(
            "CredentialsNotReadable"), "CredentialsNotReadable from the access review",
            timeout=60)
        # A viewer tries: the relay may not read the Secret, and reports so.
        data, code, reason = asyncio.run(open_console(port, target))
        assert data is None and code == 4424 and ROLE in reason, (code, reason, logs())
        # The operator has that report before the namespace opts in.
        operator.wait_for_log(re.escape(f"{target}: relay http://127.0.0.1:{internal} reports "
                                        "its last login: forbidden"), timeout=30)
        command = ready_condition(release, namespace, "desk").split(
            "opt this namespace in: ", 1)[1].split()
        plane.kubectl(*command[1:])
        try:
            wait_until(lambda: ready_condition(release, namespace, "desk").startswith(
                "Ready") or not operator.running(), "Ready once the namespace opted in",
                timeout=60)
        except TimeoutError:
            raise AssertionError(f"still {ready_condition(release, namespace, 'desk')!r}\n"
                                 f"{logs()}") from None
        status = plane.get("vnc", "desk", "-n", namespace)["status"]
        assert status["phase"] == "Ready", (status, logs())
