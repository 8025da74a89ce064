"""`kubectl vnc` as a user runs it: the real kubectl finds the plugin `kubectl-vnc` on PATH, with
a kubeconfig holding a ServiceAccount token (TokenRequest API), against a real API server, the
real operator (status.url) and two relay replicas that ask each other for their sessions.

Who may do what comes from the chart's ClusterRoles as installed by helm: `viewer` is bound to
vncgate-viewer, `editor` to Kubernetes' own `edit` and `admin` to its `admin` (vncgate-editor and
vncgate-admin are aggregated into them), `stranger` to nothing. The relays take only tokens for
their own audience (as the chart's do): each account but `unminted` may mint its own
(`create` on serviceaccounts/token for its name), which the plugin does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml
from Xlib import display as xdisplay

from harness import reaper
from harness.certs import make_ca, make_server_cert
from harness.cluster import ControlPlane, free_port
from harness.waiting import wait_until
from harness.xvnc import XvncServer
from tests.cluster.conftest import Release
from tests.cluster.test_operator import address_target, wait_phase
from tests.support.processes import BIN, ConsoleScript
from tests.support.rfbclient import VERSION_33, security_failure
from vncgate.common.kube import KubeClient, kube_connection
from vncgate.relay.session.peers import Peers

# A hang guard, not a speed check: a test here runs the plugin up to seven times, and each run
# imports kubernetes_asyncio (seconds on a loaded 2-core machine) before it mints its token.
pytestmark = pytest.mark.timeout(300)

TOKEN = "kubectl-test-registration-token-0123456789"
ACCOUNTS = {"viewer": ("ClusterRole", "vncgate-viewer"), "editor": ("ClusterRole", "edit"),
            "admin": ("ClusterRole", "admin"), "stranger": None,
            "unminted": ("ClusterRole", "vncgate-admin")}
# May not mint its own tokens: the plugin cannot get one for the relays' audience. (Kubernetes'
# `edit` and `admin` may: they include `create` on serviceaccounts/token.)
NOT_MINTING = {"unminted"}


@dataclass
class Fleet:
    plane: ControlPlane
    namespace: str
    relays: dict[str, tuple[ConsoleScript, int, int]]  # name -> (process, public, internal)
    operator: ConsoleScript
    kubeconfigs: dict[str, Path]
    workdir: Path
    release: Release

    def url(self, relay: str) -> str:
        return f"http://127.0.0.1:{self.relays[relay][1]}"

    def user(self, account: str) -> str:
        return f"system:serviceaccount:{self.namespace}:{account}"

    @property
    def audience(self) -> str:
        return relay_audience(self.release)

    def token(self, account: str) -> str:
        """A token of `account` for the relays' audience (what kubectl vnc mints)."""
        return self.plane.kubectl("create", "token", account, "-n", self.namespace,
                                  "--audience", self.audience).stdout.strip()

    def api_token(self, account: str) -> str:
        """The kubeconfig's own token: for the API server itself."""
        config = yaml.safe_load(self.kubeconfigs[account].read_text())
        return str(config["users"][0]["user"]["token"])

    def env(self, kubeconfig: Path, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("VNCGATE_", "KUBERNETES_")) and k != "KUBECONFIG"}
        # The plugin on PATH beside the real kubectl, as `pip install vncgate` puts it.
        env.update({"PATH": f"{BIN}:{self.plane.bin}:{env.get('PATH', '')}",
                    "KUBECONFIG": str(kubeconfig), "HOME": str(self.workdir)}, **extra)
        return env

    def kubectl_vnc(self, account: str, *args: str, kubeconfig: Path | None = None,
                    **env: str) -> subprocess.CompletedProcess[str]:
        """`kubectl vnc ARGS` through the real kubectl, with `account`'s kubeconfig."""
        return subprocess.run([str(self.plane.bin / "kubectl"), "vnc", *args],
                              env=self.env(kubeconfig or self.kubeconfigs[account], **env),
                              capture_output=True, text=True, timeout=60, check=False)


def relay_audience(release: Release) -> str:
    """The audience the chart gives its relays: vncgate:<namespace>:<release>."""
    return f"vncgate:{release.namespace}:vncgate"


def _relay(release: Release, workdir: Path, name: str, internal: int, peer: int | None,
           token_file: Path, key_file: Path, users: Path, *extra: str,
           audience: bool = True) -> tuple[ConsoleScript, int]:
    workdir.mkdir(parents=True, exist_ok=True)
    kubeconfig = release.plane.service_account_kubeconfig(
        workdir / "kubeconfig", release.namespace, release.relay_account)
    public = free_port()
    script = ConsoleScript("vncgate-relay", [
        f"--listen=127.0.0.1:{public}", f"--internal-listen=127.0.0.1:{internal}",
        f"--api-token-file={token_file}", f"--kubeconfig={kubeconfig}", "--log-format=json",
        "--auth=token", f"--users-file={users}", "--authorization=kubernetes",
        "--kubernetes-tokens", f"--link-key-file={key_file}", f"--identity={name}",
        *([f"--token-audience={relay_audience(release)}"] if audience else []),
        *([f"--peer-url=http://127.0.0.1:{peer}"] if peer is not None else []),
        # Every session recorded (screen only): a proxy session is recorded as a browser's.
        f"--recording-dir={workdir / 'recordings'}", "--record-sessions", *extra], workdir)
    return script, public


def relay_endpoint_slice(release: Release, replica: str, address: str, *,
                         owned: bool = True) -> dict[str, object]:
    """What the EndpointSlice controller writes for a relay pod of the chart's headless Service
    (the Service as controlling owner; another managed-by label, so that the controller, which
    sees no pods here, leaves it alone); `owned=False`: a slice that only carries the
    service-name label, as anyone who may create EndpointSlices there can write."""
    service = release.plane.get("service", "vncgate-relay-headless", "-n", release.namespace)
    metadata: dict[str, object] = {
        "name": f"vncgate-relay-headless-{replica}", "namespace": release.namespace,
        "labels": {"kubernetes.io/service-name": "vncgate-relay-headless",
                   "endpointslice.kubernetes.io/managed-by": "vncgate-tests"}}
    if owned:
        metadata["ownerReferences"] = [{
            "apiVersion": "v1", "kind": "Service", "name": "vncgate-relay-headless",
            "uid": service["metadata"]["uid"], "controller": True,
            "blockOwnerDeletion": True}]
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": metadata,
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                      {"name": "internal", "port": 8081, "protocol": "TCP"}],
            "endpoints": [{"addresses": [address], "conditions": {"ready": True},
                           "targetRef": {"kind": "Pod", "name": replica,
                                         "namespace": release.namespace}}]}


@pytest.fixture(scope="module")
def fleet(release: Release, xvnc: XvncServer, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Fleet]:
    plane = release.plane
    workdir = tmp_path_factory.mktemp("kubectl-vnc")
    namespace = "kubectl-vnc-team"
    plane.kubectl("create", "namespace", namespace)
    kubeconfigs = {}
    for account, role in ACCOUNTS.items():
        plane.kubectl("create", "serviceaccount", account, "-n", namespace)
        if role is not None:
            plane.kubectl("create", "rolebinding", account, "-n", namespace,
                          f"--clusterrole={role[1]}", f"--serviceaccount={namespace}:{account}")
        kubeconfigs[account] = plane.service_account_kubeconfig(
            workdir / f"{account}.kubeconfig", namespace, account)
        if account not in NOT_MINTING:
            plane.kubectl("create", "role", f"mint-{account}", "-n", namespace,
                          "--verb=create", "--resource=serviceaccounts/token",
                          f"--resource-name={account}")
            plane.kubectl("create", "rolebinding", f"mint-{account}", "-n", namespace,
                          f"--role=mint-{account}", f"--serviceaccount={namespace}:{account}")
    # The aggregation controller copies vncgate-editor/-admin's rules into edit/admin.
    for account, verb in (("editor", "share"), ("admin", "disconnect")):
        wait_until(lambda account=account, verb=verb: plane.kubectl(  # type: ignore[misc]
            "auth", "can-i", verb, "vnctargets.vncgate.io", "-n", namespace,
            f"--as=system:serviceaccount:{namespace}:{account}", check=False
        ).stdout.strip() == "yes", f"{account} may {verb} (aggregated roles)")
    token_file, key_file, users = (workdir / "token", workdir / "link-key",
                                   workdir / "users.yaml")
    token_file.write_text(TOKEN)
    key_file.write_text("k" * 48)
    users.write_text(yaml.safe_dump({"someone": {"secret": "someone-secret-0123456789"}}))
    internal_a, internal_b = free_port(), free_port()
    # Each replica is told the other's internal address (--peer-url); the chart's pods find
    # each other in EndpointSlices (test_peers_are_found_in_the_headless_services_slices).
    relay_a, public_a = _relay(release, workdir / "a", "relay-a", internal_a, internal_b,
                               token_file, key_file, users)
    relay_b, public_b = _relay(release, workdir / "b", "relay-b", internal_b, internal_a,
                               token_file, key_file, users)
    operator_config = plane.service_account_kubeconfig(
        workdir / "operator.kubeconfig", release.namespace, release.operator_account)
    operator = ConsoleScript("vncgate-operator", [
        f"--relay-url=http://127.0.0.1:{internal_a}", f"--relay-url=http://127.0.0.1:{internal_b}",
        f"--api-token-file={token_file}", f"--public-url=http://127.0.0.1:{public_a}",
        f"--namespace={namespace}", "--allow-cidr=127.0.0.0/8", "--probe-interval=2s",
        "--resync-interval=3s", "--liveness=off", "--standalone"], workdir,
        env={"KUBECONFIG": str(operator_config)})
    with relay_a, relay_b:
        relay_a.wait_for_log("relay listening")
        relay_b.wait_for_log("relay listening")
        with operator:
            desk = address_target(namespace, "desk", "127.0.0.1", xvnc.port)
            watch = address_target(namespace, "watch", "127.0.0.1", xvnc.port)
            watch["spec"]["viewOnly"] = True
            plane.apply([desk, watch])
            for name in ("desk", "watch"):
                wait_phase(plane, namespace, name, "Ready", operator, relay_a, relay_b)
            yield Fleet(plane, namespace, {"relay-a": (relay_a, public_a, internal_a),
                                           "relay-b": (relay_b, public_b, internal_b)},
                        operator, kubeconfigs, workdir, release)
    plane.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_peers_are_found_in_the_headless_services_slices(release: Release,
                                                         tmp_path: Path) -> None:
    """--peer-service with the chart's relay account: the other pods' internal URLs from the
    headless Service's EndpointSlices, without this pod. The addresses (TEST-NET-1) are only
    read, never dialled: the API server refuses loopback addresses in EndpointSlices. A slice
    with the service-name label that the Service does not own names no peer."""
    plane = release.plane
    plane.apply([relay_endpoint_slice(release, "relay-0", "192.0.2.10"),
                 relay_endpoint_slice(release, "relay-1", "192.0.2.11"),
                 # Only the label: not the Service's, so never sent the registration token.
                 relay_endpoint_slice(release, "rogue", "192.0.2.66", owned=False)])
    kubeconfig = plane.service_account_kubeconfig(tmp_path / "relay.kubeconfig",
                                                  release.namespace, release.relay_account)

    async def discovered() -> list[str]:
        peers = Peers(TOKEN, "relay-0", service=(release.namespace, "vncgate-relay-headless"),
                      kube=KubeClient(kube_connection(kubeconfig)))
        try:
            return await peers.urls()
        finally:
            await peers.close()

    assert asyncio.run(discovered()) == ["http://192.0.2.11:8081"]


# -- list and open ---------------------------------------------------------------------------------

def test_list_shows_phase_viewers_and_url(fleet: Fleet) -> None:
    result = fleet.kubectl_vnc("viewer", "list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "VIEWERS", "URL"]
    assert lines[1].split() == ["desk", "Ready", "0",
                                f"{fleet.url('relay-a')}/t/{fleet.namespace}/desk/"]
    assert lines[2].split()[:2] == ["watch", "Ready"]

    # RBAC's refusal, as the API server words it: vncgate-viewer is bound in one namespace.
    result = fleet.kubectl_vnc("viewer", "list", "-A")
    assert result.returncode == 1
    assert (f'User "{fleet.user("viewer")}" cannot list resource "vnctargets" in API group '
            '"vncgate.io" at the cluster scope') in result.stderr
    result = fleet.kubectl_vnc("stranger", "list")
    assert result.returncode == 1 and "cannot list resource \"vnctargets\"" in result.stderr


def test_open_prints_the_url_and_opens_the_browser(fleet: Fleet) -> None:
    opened = fleet.workdir / "opened-url"
    # webbrowser honours $BROWSER: a "browser" that writes down the URL it was given.
    browser = (f"{sys.executable} -c \"import sys; open('{opened}', 'w').write(sys.argv[1])\""
               " %s")
    result = fleet.kubectl_vnc("viewer", "open", "desk", BROWSER=browser)
    url = f"{fleet.url('relay-a')}/t/{fleet.namespace}/desk/"
    assert result.returncode == 0 and result.stdout.strip() == url, result.stderr
    wait_until(lambda: opened.exists() and opened.read_text() == url, "the browser given the URL")
    result = fleet.kubectl_vnc("viewer", "open", "nothing-here", "--no-browser")
    assert result.returncode == 1 and 'vnctargets.vncgate.io "nothing-here" not found' \
        in result.stderr


# -- link ------------------------------------------------------------------------------------------

async def _exchange(url: str) -> tuple[int, dict[str, object]]:
    """Hand the link's token to the viewer's exchange, as the viewer page does."""
    page, _, token = url.partition("#link=")
    async with aiohttp.ClientSession() as http, http.post(
            f"{page}link", json={"token": token},
            headers={"X-Requested-With": "vncgate"}) as reply:
        return reply.status, await reply.json()


def test_link_needs_share_and_mints_a_working_link(fleet: Fleet) -> None:
    result = fleet.kubectl_vnc("editor", "link", "desk", "--ttl", "30m", "--view-only",
                               "--once")
    assert result.returncode == 0, result.stderr
    url = result.stdout.strip()
    assert url.startswith(f"{fleet.url('relay-a')}/t/{fleet.namespace}/desk/#link=")
    assert "(view-only, one use)" in result.stderr
    status, body = asyncio.run(_exchange(url))
    assert status == 200 and body["viewOnly"] is True, body
    status, body = asyncio.run(_exchange(url))  # --once: used up
    assert status == 403 and "one use only" in str(body["error"])

    result = fleet.kubectl_vnc("viewer", "link", "desk")
    assert result.returncode == 1
    assert (f"the relay refused (403): {fleet.user('viewer')} may not make share links for "
            f"{fleet.namespace}/desk; ask for a RoleBinding to vncgate-editor in "
            f"{fleet.namespace}") in result.stderr
    result = fleet.kubectl_vnc("editor", "link", "desk", "--ttl", "30")
    assert result.returncode == 1 and "--ttl: '30' is not a duration" in result.stderr


def test_a_kubeconfig_without_a_token_says_how_to_get_one(fleet: Fleet) -> None:
    """A user who is no ServiceAccount (here a client certificate; OIDC and exec-plugin users
    alike) gets no token for the relay's audience from the API server: the plugin says what
    works instead."""
    admin = fleet.plane.admin_kubeconfig  # client certificate, no token
    result = fleet.kubectl_vnc("admin", "link", "desk", "-n", fleet.namespace,
                               kubeconfig=admin)
    assert result.returncode == 1
    assert (f"takes only tokens minted for its audience {fleet.audience}. The API server mints "
            "those for ServiceAccounts only, and your kubeconfig signs in as admin, whose token "
            "(OIDC, an exec plugin, a client certificate) cannot be re-minted") in result.stderr
    assert f"kubectl create token NAME -n NAMESPACE --audience {fleet.audience}" in result.stderr
    # The API server takes the certificate: list works; --token supplies the relay's token.
    assert fleet.kubectl_vnc("admin", "list", "-n", fleet.namespace,
                             kubeconfig=admin).returncode == 0
    result = fleet.kubectl_vnc("admin", "link", "desk", "-n", fleet.namespace,
                               "--token", fleet.token("editor"), kubeconfig=admin)
    assert result.returncode == 0 and "#link=" in result.stdout, result.stderr


async def _relay_status(url: str, token: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(
            f"{url}/api/v1/sessions", headers={"Authorization": f"Bearer {token}"}) as reply:
        return reply.status


def test_the_relay_gets_a_token_for_its_audience_never_the_kubeconfigs(fleet: Fleet) -> None:
    """The kubeconfig's token is for the API server, and the relay (with its own audience)
    refuses it; the plugin mints one for the relay's audience instead (TokenRequest), which
    the API server in turn refuses, so neither side can replay what it was given."""
    api_token = fleet.api_token("admin")
    assert asyncio.run(_relay_status(fleet.url("relay-a"), api_token)) == 401
    result = fleet.kubectl_vnc("admin", "sessions")
    assert result.returncode == 0 and "note:" not in result.stderr, result.stderr
    minted = fleet.token("admin")
    assert asyncio.run(_relay_status(fleet.url("relay-a"), minted)) == 200
    # What the relay takes is no credential at the API server.
    refused = subprocess.run(
        [str(fleet.plane.bin / "kubectl"), "--kubeconfig", os.devnull, "--server", fleet.plane.url,
         "--certificate-authority", str(fleet.plane.certs.ca_crt), "--token", minted,
         "get", "vnctargets.vncgate.io", "-n", fleet.namespace],
        capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 1, refused.stdout
    assert "You must be logged in to the server" in refused.stderr, refused.stderr

    # An account that may not mint its own tokens is told which right, or which --token.
    result = fleet.kubectl_vnc("unminted", "sessions")
    assert result.returncode == 1
    assert (f"the relay takes only tokens minted for its audience {fleet.audience}, and your "
            f"ServiceAccount {fleet.namespace}/unminted may not mint its own (RBAC: create on "
            f"serviceaccounts/token with resourceNames [unminted] in {fleet.namespace})"
            ) in result.stderr
    assert (f'--token "$(kubectl create token unminted -n {fleet.namespace} --audience '
            f'{fleet.audience})"') in result.stderr
    result = fleet.kubectl_vnc("unminted", "sessions", "--token", fleet.token("unminted"))
    assert result.returncode == 0, result.stderr


def test_a_relay_that_takes_api_server_tokens_is_sent_the_kubeconfigs_with_a_note(
        fleet: Fleet) -> None:
    """relay.auth.kubernetesTokens.apiServerTokens: no audience of the relay's own; then, and
    only then, the kubeconfig's token goes to the relay, and the user is told."""
    workdir = fleet.workdir / "api-tokens"
    # A relay of its own, no peer: a peer that cannot be asked makes a bad token a 503 (failure
    # limits count every replica's failures and fail closed), and this test is about the 401.
    script, public = _relay(fleet.release, workdir, "relay-api", free_port(), None,
                            fleet.workdir / "token", fleet.workdir / "link-key",
                            fleet.workdir / "users.yaml", audience=False)
    with script:
        script.wait_for_log("relay listening")
        url = f"http://127.0.0.1:{public}"
        result = fleet.kubectl_vnc("admin", "sessions", "--relay-url", url)
        assert result.returncode == 0, result.stderr
        assert (f"note: the relay at 127.0.0.1:{public} takes tokens minted for the API server "
                "itself, so it is sent your kubeconfig's token, which it could use against the "
                "API server as you") in result.stderr
        # Such a relay refuses a token for another audience (the chart's relays' one).
        assert asyncio.run(_relay_status(url, fleet.token("admin"))) == 401


def test_an_exec_credential_plugin_gives_the_token(fleet: Fleet) -> None:
    """A kubeconfig whose user runs a command for its token (as kubelogin does for OIDC): the
    plugin runs it, as kubectl does; the token it gives is a ServiceAccount's, so the plugin
    mints one for the relay's audience with it."""
    plugin = fleet.workdir / "credential-plugin"
    ran = fleet.workdir / "credential-plugin-ran"
    credential = json.dumps({"apiVersion": "client.authentication.k8s.io/v1",
                             "kind": "ExecCredential",
                             "status": {"token": fleet.api_token("editor")}})
    plugin.write_text(f"#!/bin/sh\ntouch '{ran}'\ncat <<'EOF'\n{credential}\nEOF\n")
    plugin.chmod(0o755)
    config = yaml.safe_load(fleet.kubeconfigs["editor"].read_text())
    config["users"][0]["user"] = {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": str(plugin),
        "interactiveMode": "Never"}}
    exec_config = fleet.workdir / "exec.kubeconfig"
    exec_config.write_text(yaml.safe_dump(config))
    result = fleet.kubectl_vnc("editor", "link", "desk", kubeconfig=exec_config)
    assert result.returncode == 0 and "#link=" in result.stdout, result.stderr
    assert ran.exists()


# -- sessions and kill, across both replicas -------------------------------------------------------

async def _hold_session(url: str, target: str, token: str, opened: asyncio.Event,
                        ending: list[tuple[int | None, str]]) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(
            f"{url}/t/{target}/websockify", protocols=("binary",),
            headers={"Authorization": f"Bearer {token}"}) as ws:
        while True:
            message = await ws.receive(timeout=60)
            if message.type == aiohttp.WSMsgType.BINARY:
                opened.set()
            else:
                ending.append((ws.close_code, str(message.extra or "")))
                return


def test_sessions_and_kill_reach_every_replica(fleet: Fleet) -> None:
    async def scenario() -> None:
        opened, ending = asyncio.Event(), []
        # The viewer's session is on relay-b; kubectl vnc asks relay-a (status.url).
        holder = asyncio.create_task(_hold_session(
            fleet.url("relay-b"), f"{fleet.namespace}/desk", fleet.token("viewer"), opened,
            ending))
        await asyncio.wait_for(opened.wait(), 30)

        result = await asyncio.to_thread(fleet.kubectl_vnc, "admin", "sessions")
        assert result.returncode == 0, result.stderr
        header, *rows = result.stdout.splitlines()
        assert header.split() == ["NAME", "SESSION", "USER", "CLIENT", "AGE", "MODE", "REPLICA"]
        (row,) = [r.split() for r in rows]
        assert row[0] == "desk" and row[2] == fleet.user("viewer") and row[3] == "127.0.0.1"
        assert row[5:] == ["interactive", "relay-b"]
        session_id = row[1]

        # Without `sessions` on vnctargets, refused with the role to ask for (not "nothing");
        # without `disconnect`, refused.
        result = await asyncio.to_thread(fleet.kubectl_vnc, "editor", "sessions")
        assert result.returncode == 1 and result.stdout == "", result.stdout
        assert (f"{fleet.user('editor')} may not see the sessions of the VncTargets in "
                f"{fleet.namespace}; ask for a RoleBinding to vncgate-admin in "
                f"{fleet.namespace}") in result.stderr, result.stderr
        result = await asyncio.to_thread(fleet.kubectl_vnc, "editor", "sessions", "desk")
        assert result.returncode == 1 and result.stdout == "", result.stdout
        assert (f"{fleet.user('editor')} may not see the sessions of {fleet.namespace}/desk; "
                f"ask for a RoleBinding to vncgate-admin in {fleet.namespace}") \
            in result.stderr, result.stderr
        result = await asyncio.to_thread(fleet.kubectl_vnc, "editor", "kill", "desk")
        assert result.returncode == 1
        assert (f"{fleet.user('editor')} may not end sessions of {fleet.namespace}/desk; ask "
                f"for a RoleBinding to vncgate-admin in {fleet.namespace}") in result.stderr
        result = await asyncio.to_thread(fleet.kubectl_vnc, "admin", "kill", "desk",
                                         "--session", "0123456789abcdef")
        assert result.returncode == 1 and "no session 0123456789abcdef" in result.stderr
        assert not holder.done()

        result = await asyncio.to_thread(fleet.kubectl_vnc, "admin", "kill", "desk",
                                         "--session", session_id)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"ended 1 session of {fleet.namespace}/desk"
        await asyncio.wait_for(holder, 30)
        assert ending == [(4409, f"ended by {fleet.user('admin')}")]

        result = await asyncio.to_thread(fleet.kubectl_vnc, "admin", "sessions")
        assert result.returncode == 0 and result.stdout == ""  # may see them: there are none
        assert "No sessions." in result.stderr

    asyncio.run(scenario())

    # A Role limited to one target (resourceNames) may see that target's sessions: no refusal
    # for the namespace, an empty list.
    plane, namespace = fleet.plane, fleet.namespace
    plane.kubectl("create", "serviceaccount", "desk-watcher", "-n", namespace)
    plane.kubectl("create", "role", "desk-sessions", "-n", namespace, "--verb=get,sessions",
                  "--resource=vnctargets.vncgate.io", "--resource-name=desk")
    plane.kubectl("create", "rolebinding", "desk-watcher", "-n", namespace,
                  "--role=desk-sessions", f"--serviceaccount={namespace}:desk-watcher")
    # And the right to mint its own token for the relay's audience, as every account here.
    plane.kubectl("create", "role", "mint-desk-watcher", "-n", namespace, "--verb=create",
                  "--resource=serviceaccounts/token", "--resource-name=desk-watcher")
    plane.kubectl("create", "rolebinding", "mint-desk-watcher", "-n", namespace,
                  "--role=mint-desk-watcher", f"--serviceaccount={namespace}:desk-watcher")
    kubeconfig = plane.service_account_kubeconfig(
        fleet.workdir / "desk-watcher.kubeconfig", namespace, "desk-watcher")
    result = fleet.kubectl_vnc("", "sessions", "desk", kubeconfig=kubeconfig)
    assert result.returncode == 0 and "No sessions." in result.stderr, result.stderr
    result = fleet.kubectl_vnc("", "sessions", kubeconfig=kubeconfig,
                               VNCGATE_RELAY_URL=fleet.url("relay-a"))
    assert result.returncode == 0 and "No sessions." in result.stderr, result.stderr
    result = fleet.kubectl_vnc("", "sessions", "watch", kubeconfig=kubeconfig,
                               VNCGATE_RELAY_URL=fleet.url("relay-a"))
    assert result.returncode == 1, result.stderr
    assert f"may not see the sessions of {namespace}/watch" in result.stderr, result.stderr


# -- proxy for native viewers ----------------------------------------------------------------------

def pointer(vnc: XvncServer) -> tuple[int, int]:
    screen = xdisplay.Display(f":{vnc.display}")
    try:
        reply = screen.screen().root.query_pointer()
        return reply.root_x, reply.root_y
    finally:
        screen.close()


def rfb_point(port: int, x: int, y: int) -> bytes:
    """A scripted native viewer on a TCP port: the RFB 3.8 handshake (security None), a pointer
    event to (x, y), then an update request (answered after the pointer event is handled)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        stream = sock.makefile("rwb")
        greeting = stream.read(12)
        stream.write(b"RFB 003.008\n")
        stream.flush()
        (count,) = stream.read(1)
        assert 1 in stream.read(count)
        stream.write(b"\x01")
        stream.flush()
        assert stream.read(4) == bytes(4)
        stream.write(b"\x01")  # ClientInit, shared
        stream.flush()
        stream.read(20)
        (name_length,) = struct.unpack("!I", stream.read(4))
        stream.read(name_length)
        stream.write(struct.pack("!BBHH", 5, 0, x, y) + struct.pack("!BBHHHH", 3, 0, 0, 0, 1, 1))
        stream.flush()
        (message_type,) = stream.read(1)
        assert message_type == 0  # a FramebufferUpdate
        return greeting


def _proxy(fleet: Fleet, account: str, name: str, *extra: str) -> tuple[ConsoleScript, int]:
    script = ConsoleScript("kubectl-vnc", ["proxy", name, "--port", "0", *extra], fleet.workdir,
                           env={"KUBECONFIG": str(fleet.kubeconfigs[account])})
    script.start()
    found = script.wait_for_log(r"Forwarding 127\.0\.0\.1:(\d+) ->")
    return script, int(found.group(1))


def test_proxy_reaches_xvnc_and_a_view_only_target_keeps_the_pointer(
        fleet: Fleet, xvnc: XvncServer) -> None:
    recordings = fleet.workdir / "a" / "recordings" / fleet.namespace / "desk"
    before = set(recordings.glob("*.vncrec"))
    script, port = _proxy(fleet, "viewer", "desk")
    with script:
        assert rfb_point(port, 123, 77).startswith(b"RFB 003.00")
        wait_until(lambda: pointer(xvnc) == (123, 77), "the real pointer moved to (123, 77)",
                   context=lambda: script.log())
        script.wait_for_log("viewer 127.0.0.1:\\d+ disconnected")
    # relay-a (the target's status.url) recorded the proxied session, as it records a browser's.
    wait_until(lambda: set(recordings.glob("*.vncrec")) - before,
               "a recording of the proxied session on relay-a")
    script, port = _proxy(fleet, "viewer", "watch")
    with script:
        rfb_point(port, 321, 222)
        # The update after the pointer event has been answered: the server has seen everything
        # the relay passed on, and the view-only filter passed no pointer event.
        assert pointer(xvnc) == (123, 77)
    # Without `connect`, the relay refuses the tunnel and the proxy says so (the stranger may
    # not read the VncTarget either, so the relay's address is given).
    result = fleet.kubectl_vnc("stranger", "proxy", "desk")
    assert result.returncode == 1 and 'cannot get resource "vnctargets"' in result.stderr
    script, port = _proxy(fleet, "stranger", "desk", "--relay-url", fleet.url("relay-a"))
    with script:
        # The viewer is told why, in RFB: a security failure with the relay's reason.
        reason = security_failure(port)
        assert reason.startswith("the relay refused: 4403 ") and \
            f"{fleet.user('stranger')} may not connect to {fleet.namespace}/desk" in reason, \
            (reason, script.log())
        found = script.wait_for_log(r"disconnected: 4403 ([^\n]*)")
        assert f"{fleet.user('stranger')} may not connect to {fleet.namespace}/desk" in \
            found.group(1)
    # A relay that cannot be reached: the viewer is told so too.
    script, port = _proxy(fleet, "viewer", "desk", "--relay-url", f"http://127.0.0.1:{free_port()}")
    with script:
        assert security_failure(port, VERSION_33).startswith("cannot reach the relay: ")


@contextlib.contextmanager
def x_display() -> Iterator[int]:
    """A private X display (Xvfb) for TigerVNC's vncviewer."""
    for program in ("vncviewer", "Xvfb"):
        if not (Path("/usr/bin") / program).exists():
            pytest.skip(f"{program} is not installed (apt-get install tigervnc-viewer xvfb; "
                        "scripts/setup does)")
    display = next(d for d in range(90, 200) if not Path(f"/tmp/.X11-unix/X{d}").exists())
    xvfb = reaper.popen(["Xvfb", f":{display}", "-screen", "0", "1024x768x24", "-nolisten",
                         "tcp"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: Path(f"/tmp/.X11-unix/X{display}").exists(), "Xvfb up")
        yield display
    finally:
        reaper.end(xvfb)


def test_tigervnc_vncviewer_under_xvfb_through_the_proxy(fleet: Fleet, tmp_path: Path) -> None:
    with x_display() as display:
        script, port = _proxy(fleet, "viewer", "desk")
        viewer: subprocess.Popen[bytes] | None = None
        try:
            with script:
                viewer = reaper.popen(
                    ["vncviewer", f"127.0.0.1::{port}", "-ViewOnly"],
                    env={**os.environ, "DISPLAY": f":{display}", "HOME": str(tmp_path)},
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                # The relay (through kubectl vnc proxy) sees TigerVNC's session, as any other.
                def listed() -> bool:
                    result = fleet.kubectl_vnc("admin", "sessions", "desk")
                    return bool(re.search(rf"desk\s+\w+\s+{re.escape(fleet.user('viewer'))}",
                                          result.stdout))

                wait_until(listed, "vncviewer's session listed by kubectl vnc sessions")
                assert viewer.poll() is None, "vncviewer exited"
        finally:
            if viewer is not None:
                reaper.end(viewer)
            script.stop()


def test_tigervnc_vncviewer_shows_why_the_relay_refused(fleet: Fleet, tmp_path: Path) -> None:
    """The stranger's viewer is refused by the relay (4403): through the proxy, TigerVNC gets
    an RFB security failure and shows its reason (in its log, and in its error dialog)."""
    log = tmp_path / "vncviewer.log"
    with x_display() as display:
        script, port = _proxy(fleet, "stranger", "desk", "--relay-url", fleet.url("relay-a"))
        viewer: subprocess.Popen[bytes] | None = None
        try:
            with script, log.open("wb") as output:
                viewer = reaper.popen(
                    ["vncviewer", f"127.0.0.1::{port}"],
                    env={**os.environ, "DISPLAY": f":{display}", "HOME": str(tmp_path)},
                    stdout=output, stderr=subprocess.STDOUT)
                expected = (f"{fleet.user('stranger')} may not connect to "
                            f"{fleet.namespace}/desk")

                def shown() -> bool:
                    return expected in " ".join(log.read_text(errors="replace").split())

                wait_until(shown, "vncviewer shows the relay's reason",
                           context=lambda: log.read_text(errors="replace") + script.log())
        finally:
            if viewer is not None:
                reaper.end(viewer)
            script.stop()


def test_a_relay_with_its_own_ca(release: Release, fleet: Fleet, xvnc: XvncServer,
                                 tmp_path: Path) -> None:
    """A relay serving https with a certificate of its own CA (--tls-cert): kubectl vnc trusts
    it with --certificate-authority (kubectl's flag name), or skips the check when told to;
    a native viewer's session through the proxy ends cleanly on the TLS listener."""
    ca = make_ca(tmp_path / "ca")
    pem = make_server_cert(ca, tmp_path / "relay", "relay")
    workdir = fleet.workdir
    script, public = _relay(release, tmp_path / "tls-relay", "relay-tls", free_port(),
                            fleet.relays["relay-a"][2], workdir / "token", workdir / "link-key",
                            workdir / "users.yaml", f"--tls-cert={pem.cert}",
                            f"--tls-key={pem.key}",
                            # Not one the operator fills: the target given on its command line.
                            f"--target={fleet.namespace}/desk=127.0.0.1:{xvnc.port}")
    url = f"https://127.0.0.1:{public}"
    with script:
        script.wait_for_log("relay listening")
        untrusted = fleet.kubectl_vnc("admin", "sessions", "--relay-url", url)
        assert untrusted.returncode == 1, untrusted.stderr
        assert "does not trust" in untrusted.stderr and "--certificate-authority" in \
            untrusted.stderr, untrusted.stderr
        for flags in (("--certificate-authority", str(ca.cert)), ("--insecure-skip-tls-verify",)):
            result = fleet.kubectl_vnc("admin", "sessions", "--relay-url", url, *flags)
            assert result.returncode == 0, (flags, result.stderr)
        proxy, port = _proxy(fleet, "viewer", "desk", "--relay-url", url,
                             "--certificate-authority", str(ca.cert))
        with proxy:
            assert rfb_point(port, 50, 60).startswith(b"RFB 003.00")
            proxy.wait_for_log("viewer 127.0.0.1:\\d+ disconnected")
        # The proxy's close frame and the end of its TLS connection end the session whole: its
        # line with its bytes, no error.
        ended = script.wait_for_log(r'"message": "session end".*"bytes_to_client": (\d+)')
        assert int(ended.group(1)) > 0, ended.group(0)
        log = script.log()
        assert "Traceback" not in log and "Error handling request" not in log, log[-3000:]
