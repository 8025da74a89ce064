"""A refused stored credential shows in the target's status, without the operator reading it.

Real parts: Xvnc with `-SecurityTypes VncAuth`, a real relay that reads the target's Secret from
the emulated API server (a kubeconfig pointing at kmock), a viewer's session through the relay,
and the real operator, which learns the outcome from the relay's table summary.
"""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness.xvnc import XvncServer
from tests.operator.conftest import (
    TARGETS,
    TOKEN,
    Cluster,
    conditions,
    eventually,
    operator_settings,
    running_operator,
    vnc_target,
)
from tests.relay.test_upstream_security import close_of, handshake_as_viewer
from vncgate.common.addresses import Address
from vncgate.relay import closecodes
from vncgate.relay.settings import RelaySettings
from vncgate.relay.web.server import RelayServer

SECRETS = "v1/secrets"
PASSWORD = "right-pw"


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "passwd"
    result = subprocess.run(["vncpasswd", "-f"], input=PASSWORD.encode() + b"\n",
                            capture_output=True, check=True, timeout=10)
    path.write_bytes(result.stdout)
    return path


def kubeconfig(k8s: Any, folder: Path) -> Path:
    path = folder / "kubeconfig"
    path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: emu, cluster: {{server: "{str(k8s.url).rstrip('/')}"}}}}]
users: [{{name: relay, user: {{token: relay-token}}}}]
contexts: [{{name: emu, context: {{cluster: emu, user: relay}}}}]
current-context: emu
""")
    return path


def secret(password: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": "vncgate.io/credentials",
            "metadata": {"namespace": "lab", "name": "bmc-login"},
            "data": {"password": base64.b64encode(password.encode()).decode()}}


async def test_a_refused_credential_shows_in_status_and_a_good_login_clears_it(
        k8s: Any, tmp_path: Path, password_file: Path) -> None:
    every = {"list", "watch", "get", "patch", "create", "delete", "update"}
    k8s.resources[SECRETS] = {"kind": "Secret", "namespaced": True, "verbs": every}
    settings = RelaySettings(listen=Address("127.0.0.1", 0),
                             internal_listen=Address("127.0.0.1", 0), api_token=TOKEN,
                             kubeconfig=kubeconfig(k8s, tmp_path))
    with XvncServer(log_path=tmp_path / "xvnc.log", extra_args=(
            "-SecurityTypes", "VncAuth", "-PasswordFile", str(password_file))) as server:
        async with RelayServer(settings) as relay:
            cluster = Cluster(k8s)
            await cluster.create(SECRETS, secret("wrong-pw"))
            config = operator_settings(relay_urls=(relay.internal_url,), probe_interval=30.0)
            async with running_operator(k8s, config):
                await cluster.create(TARGETS, vnc_target(
                    "lab", "bmc", {"address": {"host": "127.0.0.1", "port": server.port}},
                    credentials={"secretName": "bmc-login"}))
                # The probe cannot log in (it never has the password): Ready.
                await eventually(lambda: cluster.status("lab", "bmc").get("phase") == "Ready",
                                 "phase Ready before any session")

                code, reason = await close_of(relay.public_url, "bmc")
                assert code == closecodes.CREDENTIAL_REFUSED, reason
                status = await eventually(
                    lambda: ((s := cluster.status("lab", "bmc")).get("phase") == "Unreachable"
                             and s), "phase Unreachable after the refused login")
                found = conditions(status)
                assert (found["Reachable"]["status"], found["Reachable"]["reason"]) == (
                    "False", "CredentialRefused")
                assert found["Ready"]["reason"] == "CredentialRefused"
                message = found["Ready"]["message"]
                assert "refused the stored credential" in message
                assert "Secret lab/bmc-login" in message
                assert "wrong-pw" not in str(status)

                # The Secret is corrected; the next session logs in and status follows.
                await cluster.patch(SECRETS, "lab", "bmc-login", secret(PASSWORD))
                offered, _, _ = await handshake_as_viewer(relay.public_url, "bmc")
                assert offered == [1]
                status = await eventually(
                    lambda: ((s := cluster.status("lab", "bmc")).get("phase") == "Ready"
                             and s), "phase Ready after a session logged in")
                assert conditions(status)["Reachable"]["status"] == "True"


async def test_insecure_skip_verify_is_shown_as_a_warning_while_ready(
        k8s: Any, relay: RelayServer, xvnc: XvncServer) -> None:
    cluster = Cluster(k8s)
    config = operator_settings(relay_urls=(relay.internal_url,))
    async with running_operator(k8s, config):
        await cluster.create(TARGETS, vnc_target(
            "lab", "bmc", {"address": {"host": "127.0.0.1", "port": xvnc.port}},
            tls={"insecureSkipVerify": True}))
        status = await eventually(
            lambda: ((s := cluster.status("lab", "bmc")).get("phase") == "Ready" and s),
            "phase Ready")
        tls = conditions(status)["TLSVerified"]
        assert (tls["status"], tls["reason"]) == ("False", "InsecureSkipVerify")
        assert "does not check the server's identity" in tls["message"]

        # Trust given instead: the warning turns into a verified condition.
        await cluster.patch(TARGETS, "lab", "bmc", {
            "metadata": {"generation": 2},
            "spec": {"tls": {"insecureSkipVerify": None, "serverName": "bmc.lab.example"}}})
        await eventually(
            lambda: conditions(cluster.status("lab", "bmc")).get("TLSVerified", {}).get(
                "reason") == "CertificateVerified", "TLSVerified True after the change")
        assert cluster.status("lab", "bmc")["phase"] == "Ready"
