"""The console list asks RBAC once per namespace where it can, on a real API server: a user bound
to vncgate-viewer in a namespace sees all of its consoles from one review without a name; a
Role with resourceNames still lists exactly the consoles it names (asked one by one), and a
namespace with no grant lists nothing."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from harness.servers import TcpServer
from tests.cluster.conftest import (  # noqa: F401 - fixtures, by name
    Release,
    control_plane,
    release,
)
from tests.conftest import RelayFactory
from vncgate.common.model import Route
from vncgate.relay.access.authz import KubernetesAuthorizer
from vncgate.relay.access.identity import AuthMode
from vncgate.relay.access.proxies import parse_networks
from vncgate.relay.settings import AuthSettings

WHOLE, SOME, NONE = "list-whole", "list-some", "list-none"


@pytest.fixture(scope="module")
def grants(release: Release) -> None:  # noqa: F811 - the imported fixture, by name
    plane = release.plane
    for namespace in (WHOLE, SOME, NONE):
        if plane.kubectl("get", "namespace", namespace, check=False).returncode != 0:
            plane.kubectl("create", "namespace", namespace)
    plane.kubectl("create", "rolebinding", "vic", "-n", WHOLE, "--clusterrole=vncgate-viewer",
                  "--user=vic")
    plane.kubectl("create", "role", "one-console", "-n", SOME, "--verb=connect",
                  "--resource=vnctargets.vncgate.io", "--resource-name=desk-1")
    plane.kubectl("create", "rolebinding", "vic", "-n", SOME, "--role=one-console",
                  "--user=vic")


async def test_list_asks_per_namespace_then_per_console(
        make_relay: RelayFactory, backend: TcpServer, release: Release,  # noqa: F811
        grants: None, tmp_path: Path) -> None:
    kubeconfig = release.plane.service_account_kubeconfig(
        tmp_path / "relay.kubeconfig", release.namespace, release.relay_account)
    auth = AuthSettings(mode=AuthMode.PROXY, trusted_proxies=parse_networks(["127.0.0.1/32"], "t"),
                        authorization="kubernetes")
    routes = [Route(ns, name, "127.0.0.1", backend.port)
              for ns in (WHOLE, SOME, NONE) for name in ("desk-1", "desk-2")]
    async with make_relay(routes=routes, auth=auth, kubeconfig=kubeconfig) as relay, \
            aiohttp.ClientSession(headers={"X-Forwarded-User": "vic"}) as http:
        async with http.get(f"{relay.public_url}/api/v1/consoles") as resp:
            assert resp.status == 200, await resp.text()
            body = await resp.json()
        listed = [f"{c['namespace']}/{c['name']}" for c in body["consoles"]]
        assert listed == [f"{SOME}/desk-1", f"{WHOLE}/desk-1", f"{WHOLE}/desk-2"]
        # What was asked: the whole namespace (no name) everywhere, the consoles one by one
        # only where that was refused.
        authorizer = relay.state.authorizer
        assert isinstance(authorizer, KubernetesAuthorizer)
        asked = {key[2] for key in authorizer._cache}  # (user, groups, target, verb)
        assert {f"{WHOLE}/", f"{SOME}/", f"{NONE}/"} <= asked
        assert f"{WHOLE}/desk-1" not in asked and f"{SOME}/desk-2" in asked
