"""One provider, one RoleBinding: the real kube-apiserver trusts the same OpenID provider as the
relay (an AuthenticationConfiguration with the claim mappings and prefixes the relay is given),
and for the same person `kubectl auth can-i` and the relay's decision agree.

The provider is panva's oidc-provider under Node (tests/support/oidc.py); the person signs in at
its login page as kubelogin would, and the ID token goes to kubectl and to the relay alike.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from harness.cluster import (
    ROOT,
    ControlPlane,
    ControlPlaneUnavailable,
    assets_dir,
    free_port,
    kubeconfig,
)
from harness.servers import TcpServer
from harness.waiting import eventually
from harness.xvnc import XvncServer
from tests.conftest import RelayFactory
from tests.relay.test_oidc_refresh import (
    closed,
    open_console,
    payload,
    renewed_until,
    screen_arrives,
    sign_in,
)
from tests.support.oidc import Account, OidcProvider, kubelogin_token, need_provider
from vncgate.common.addresses import Address
from vncgate.common.model import Route
from vncgate.relay import closecodes
from vncgate.relay.access.identity import AuthMode
from vncgate.relay.access.oidc import OidcSettings
from vncgate.relay.settings import AuthSettings

RELAY_CLIENT, KUBECTL_CLIENT = "vncgate", "kubernetes"
SECRET, PASSWORD = "the relay's client secret", "alice's provider password"
GROUPS_PREFIX = "oidc:"


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    need_provider()
    server = OidcProvider(tmp_path_factory.mktemp("oidc"), clients=[
        {"client_id": RELAY_CLIENT, "client_secret": SECRET,
         "redirect_uris": ["http://127.0.0.1:9/login/oidc/callback"]},
        {"client_id": KUBECTL_CLIENT, "token_endpoint_auth_method": "none",
         "redirect_uris": ["http://127.0.0.1:8000"]}],
        accounts={"alice": Account(PASSWORD, {"email": "alice@example.test",
                                              "email_verified": True,
                                              "groups": ["lab-team"]})})
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory, provider: OidcProvider
          ) -> Iterator[ControlPlane]:
    """An API server of its own: it trusts the provider with the relay's claim mappings."""
    try:
        assets_dir()
    except ControlPlaneUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI runs the real-cluster tests: {exc}")
        pytest.skip(str(exc))
    assert provider.ca is not None
    workdir = tmp_path_factory.mktemp("oidc-plane")
    config = workdir / "authentication.yaml"
    config.write_text(yaml.safe_dump({
        "apiVersion": "apiserver.config.k8s.io/v1", "kind": "AuthenticationConfiguration",
        "jwt": [{"issuer": {"url": provider.issuer, "audiences": [KUBECTL_CLIENT],
                            "certificateAuthority": provider.ca.cert.read_text()},
                 "claimMappings": {"username": {"claim": "email", "prefix": ""},
                                   "groups": {"claim": "groups", "prefix": GROUPS_PREFIX}}}]}))
    control = ControlPlane(workdir, controller_manager=False,
                           apiserver_args=[f"--authentication-config={config}"]).start()
    try:
        # The CRD, so that kubectl resolves vnctargets.vncgate.io to its group and resource.
        control.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        control.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                        "crd/vnctargets.vncgate.io")
        control.apply([
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "lab"}},
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
             "metadata": {"name": "vncgate-viewer"},
             "rules": [{"apiGroups": ["vncgate.io"], "resources": ["vnctargets"],
                        "verbs": ["get", "list", "connect"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": "lab-team-consoles", "namespace": "lab"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                         "name": "vncgate-viewer"},
             "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group",
                           "name": f"{GROUPS_PREFIX}lab-team"}]}])
        yield control
    finally:
        control.close()


@pytest.fixture
async def id_token(provider: OidcProvider) -> AsyncIterator[str]:
    assert provider.ca is not None
    context = ssl.create_default_context(cafile=str(provider.ca.cert))
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     connector=aiohttp.TCPConnector(ssl=context)) as http:
        yield await kubelogin_token(http, provider, KUBECTL_CLIENT, "alice", PASSWORD)


def kubectl_as(plane: ControlPlane, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    """kubectl with the person's ID token, as a kubelogin kubeconfig gives it."""
    config = plane.workdir / "alice.kubeconfig"
    config.write_text(kubeconfig(plane.url, plane.certs.ca_crt, token=token))
    return subprocess.run([str(plane.bin / "kubectl"), f"--kubeconfig={config}", *args],
                          capture_output=True, text=True, timeout=60, check=False)


async def test_kubectl_auth_can_i_and_the_relay_agree(
        plane: ControlPlane, provider: OidcProvider, id_token: str, make_relay: RelayFactory,
        backend: TcpServer, tmp_path: Path) -> None:
    # The API server names the person as the relay will: the email, the prefixed group.
    whoami = kubectl_as(plane, id_token, "auth", "whoami", "-o", "json")
    assert whoami.returncode == 0, whoami.stderr
    user = json.loads(whoami.stdout)["status"]["userInfo"]
    assert user["username"] == "alice@example.test"
    assert f"{GROUPS_PREFIX}lab-team" in user["groups"]
    can_i = {namespace: kubectl_as(plane, id_token, "auth", "can-i", "connect",
                                   "vnctargets.vncgate.io/desk", "-n", namespace).stdout.strip()
             for namespace in ("lab", "other")}
    assert can_i == {"lab": "yes", "other": "no"}

    assert provider.ca is not None
    relay_kubeconfig = tmp_path / "relay.kubeconfig"
    relay_kubeconfig.write_text(plane.admin_kubeconfig.read_text())
    auth = AuthSettings(
        mode=AuthMode.OIDC, session_secret=b"s" * 32, public_url="http://127.0.0.1:9",
        authorization="kubernetes",
        oidc=OidcSettings(issuer=provider.issuer, client_id=RELAY_CLIENT, client_secret=SECRET,
                          ca_file=provider.ca.cert, username_claim="email",
                          username_prefix="", groups_claim="groups",
                          groups_prefix=GROUPS_PREFIX, bearer_audiences=(KUBECTL_CLIENT,)))
    routes = [Route(namespace, "desk", "127.0.0.1", backend.port)
              for namespace in ("lab", "other")]
    async with make_relay(routes=routes, auth=auth, kubeconfig=relay_kubeconfig) as relay, \
            aiohttp.ClientSession() as http:
        decided = {}
        for namespace in ("lab", "other"):
            async with http.ws_connect(
                    f"{relay.public_url}/t/{namespace}/desk/websockify",
                    origin=relay.public_url,
                    headers={"Authorization": f"Bearer {id_token}"}) as ws:
                message = await ws.receive(timeout=60)
                decided[namespace] = ("yes" if message.type is aiohttp.WSMsgType.BINARY
                                      else (message.data, message.extra))
    assert decided["lab"] == "yes"
    code, reason = decided["other"]
    assert code == closecodes.FORBIDDEN and "alice@example.test" in reason




@pytest.fixture
def refreshing_provider(tmp_path: Path) -> Iterator[tuple[OidcProvider, int]]:
    """A second provider for the relay only: ID tokens of a few seconds and refresh tokens."""
    need_provider()
    relay_port = free_port()
    server = OidcProvider(tmp_path / "oidc", clients=[
        {"client_id": RELAY_CLIENT, "client_secret": SECRET,
         "grant_types": ["authorization_code", "refresh_token"],
         "redirect_uris": [f"http://127.0.0.1:{relay_port}/login/oidc/callback"]}],
        accounts={"alice": Account(PASSWORD, {"email": "alice@example.test",
                                              "email_verified": True,
                                              "groups": ["lab-team"]})},
        id_token_ttl=6, refresh_tokens=True)
    server.start()
    try:
        yield server, relay_port
    finally:
        server.stop()


async def test_a_renewed_sign_in_is_asked_of_rbac_again(
        plane: ControlPlane, refreshing_provider: tuple[OidcProvider, int],
        make_relay: RelayFactory, xvnc: XvncServer, tmp_path: Path) -> None:
    """A console opened through the RoleBinding to `oidc:lab-team` stays open while renewals
    keep the group, and closes (4403) at the first renewal after the person left the group at
    the provider: the relay's SubjectAccessReview carries the renewed groups."""
    provider, relay_port = refreshing_provider
    assert provider.ca is not None
    relay_kubeconfig = tmp_path / "relay.kubeconfig"
    relay_kubeconfig.write_text(plane.admin_kubeconfig.read_text())
    auth = AuthSettings(
        mode=AuthMode.OIDC, session_secret=b"s" * 32,
        public_url=f"http://127.0.0.1:{relay_port}", authorization="kubernetes",
        oidc=OidcSettings(issuer=provider.issuer, client_id=RELAY_CLIENT, client_secret=SECRET,
                          ca_file=provider.ca.cert, username_claim="email",
                          groups_claim="groups", groups_prefix=GROUPS_PREFIX,
                          extra_scopes=("groups",)))
    routes = [Route("lab", "mine", "127.0.0.1", xvnc.port)]
    context = ssl.create_default_context(cafile=str(provider.ca.cert))
    async with make_relay(routes=routes, auth=auth, kubeconfig=relay_kubeconfig,
                          listen=Address("127.0.0.1", relay_port)) as relay, \
            aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                  connector=aiohttp.TCPConnector(ssl=context)) as http:
        cookie = await sign_in(http, relay)
        first_expiry, sid = payload(cookie)["ie"], payload(cookie)["sid"]
        ws = await open_console(http, relay)
        await eventually(lambda: renewed_until(relay, sid) > first_expiry,
                         "the relay to renew the sign-in", timeout=120)
        await screen_arrives(ws)
        # Alice leaves lab-team at the provider; RBAC grants the console to that group only.
        provider.accounts["alice"].claims["groups"] = ["elsewhere"]
        await asyncio.to_thread(provider.reload)
        msg = await closed(ws)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == closecodes.FORBIDDEN, msg
        assert "alice@example.test" in msg.extra
        # Still signed in (the provider renewed the sign-in), without the console.
        async with http.get(f"{relay.public_url}/", allow_redirects=False) as listing:
            text = await listing.text()
        assert listing.status == 200 and "alice@example.test" in text
        assert "lab/mine" not in text
