"""KubeVirt targets on a real API server.

The relay: its dialer opens `virtualmachineinstances/{name}/vnc` through the real kube-apiserver,
whose aggregation layer proxies it to a backend that implements KubeVirt's console contract in
front of a real Xvnc (tests/support/kubevirt.py); RBAC is the API server's own. The operator:
KubeVirt's VirtualMachine and VirtualMachineInstance CRDs (reduced to what it reads) on the
same API server, and the target's status following the VMI's phase.
"""

from __future__ import annotations

import dataclasses
import json
import ssl
import struct
from pathlib import Path

import aiohttp

from harness.cluster import ControlPlane
from harness.waiting import wait_until
from harness.xvnc import XvncServer
from tests.conftest import RelayFactory
from tests.relay.test_sessions import pointer_position
from tests.relay.test_upstream_security import (  # noqa: F401 - fixtures
    SERVER_NAME,
    secrets_dir,
    vncauth_xvnc,
    x509_xvnc,
)
from tests.support.kubevirt import (
    KubeVirtBackend,
)
from tests.support.rfbclient import WsStream, viewer_handshake
from vncgate.common.model import Route
from vncgate.common.spec import KUBEVIRT_SESSIONS, Credentials, TlsSpec
from vncgate.relay import closecodes

VNC_RULE = {"apiGroups": ["subresources.kubevirt.io"],
            "resources": ["virtualmachineinstances/vnc"], "verbs": ["get"]}


def relay_account(plane: ControlPlane, namespace: str, folder: Path, *,
                  may_open: bool) -> Path:
    """A ServiceAccount for the relay (with the chart's kubevirt rule, or without); its
    kubeconfig."""
    plane.kubectl("create", "serviceaccount", "relay", "-n", namespace)
    user = f"system:serviceaccount:{namespace}:relay"
    if may_open:
        plane.apply([
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": {"name": "relay-kubevirt", "namespace": namespace},
             "rules": [VNC_RULE]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": "relay-kubevirt", "namespace": namespace},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                         "name": "relay-kubevirt"},
             "subjects": [{"kind": "ServiceAccount", "name": "relay",
                           "namespace": namespace}]}])
    review = json.dumps({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": user, "groups": ["system:serviceaccounts",
                                          f"system:serviceaccounts:{namespace}",
                                          "system:authenticated"],
                 "resourceAttributes": {"group": "subresources.kubevirt.io", "version": "v1",
                                        "resource": "virtualmachineinstances",
                                        "subresource": "vnc", "verb": "get",
                                        "namespace": namespace, "name": "vm-1"}}})

    def allowed() -> bool:
        reply = plane.kubectl("create", "-f", "-", "-o", "json", input=review)
        return bool(json.loads(reply.stdout)["status"].get("allowed"))

    wait_until(lambda: allowed() is may_open,
               f"a SubjectAccessReview saying {'yes' if may_open else 'no'} for {user}")
    return plane.service_account_kubeconfig(folder / "relay.kubeconfig", namespace, "relay")


def kubevirt_route(namespace: str, name: str) -> Route:
    return Route(namespace, name, "", 0, kubevirt=name, sessions=KUBEVIRT_SESSIONS)


async def read_update(stream: WsStream) -> None:
    """One whole FramebufferUpdate (no SetEncodings was sent: Raw, 32 bits per pixel)."""
    (kind,) = await stream.read(1)
    assert kind == 0, f"expected a FramebufferUpdate, got message type {kind}"
    _, rects = struct.unpack("!BH", await stream.read(3))
    for _ in range(rects):
        _, _, width, height, encoding = struct.unpack("!HHHHi", await stream.read(12))
        assert encoding == 0, f"Raw encoding expected, got {encoding}"
        await stream.read(width * height * 4)


async def rfb_session(ws: aiohttp.ClientWebSocketResponse) -> tuple[int, int, WsStream]:
    """Security None, ClientInit, one pixel asked for and its update read whole: the stream
    flows both ways. The framebuffer size and the stream, at a message boundary."""
    stream, init = await viewer_handshake(ws)
    width, height = init.width, init.height
    await ws.send_bytes(struct.pack("!BBHHHH", 3, 0, width // 2, height // 2, 1, 1))
    await read_update(stream)
    return width, height, stream


async def rfb_handshake(ws: aiohttp.ClientWebSocketResponse) -> tuple[int, int]:
    width, height, _ = await rfb_session(ws)
    return width, height


async def closed_with(ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, str]:
    while True:
        message = await ws.receive(timeout=20)
        if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
            return ws.close_code, str(message.extra or "")


async def test_relay_opens_a_vmi_console_through_the_api_server(
        kubevirt_api: KubeVirtBackend, control_plane: ControlPlane, namespace: str,
        make_relay: RelayFactory, xvnc: XvncServer, tmp_path: Path) -> None:
    kubevirt_api.consoles[(namespace, "vm-1")] = xvnc.port
    kubeconfig = relay_account(control_plane, namespace, tmp_path, may_open=True)
    url_path = f"/t/{namespace}/vm-1/websockify"
    async with make_relay(routes=[kubevirt_route(namespace, "vm-1")],
                          kubeconfig=kubeconfig) as relay, aiohttp.ClientSession() as http, \
            http.ws_connect(f"{relay.public_url}{url_path}", protocols=("binary",)) as ws:
        assert await rfb_handshake(ws) == (800, 600)
        # KubeVirt keeps one VNC connection per VMI: the target is exclusive, and a second
        # viewer is told who holds it instead of silently taking the VM's console over.
        async with http.ws_connect(f"{relay.public_url}{url_path}",
                                   protocols=("binary",)) as second:
            code, reason = await closed_with(second)
        assert code == closecodes.CONFLICT
        assert reason.startswith("in use by "), reason
        assert kubevirt_api.replaced == 0
    # The API server proxied it as the relay's ServiceAccount (its own token, its CA).
    assert (f"system:serviceaccount:{namespace}:relay", namespace, "vm-1") in \
        kubevirt_api.requests


async def test_a_console_held_outside_vncgate_is_not_taken(
        kubevirt_api: KubeVirtBackend, control_plane: ControlPlane, namespace: str,
        make_relay: RelayFactory, xvnc: XvncServer, tmp_path: Path) -> None:
    """The relay asks KubeVirt to preserve an open console (preserveSession=true): a person on
    `virtctl vnc` keeps the VM, and the viewer is told that someone else holds it."""
    kubevirt_api.consoles[(namespace, "vm-1")] = xvnc.port
    kubeconfig = relay_account(control_plane, namespace, tmp_path, may_open=True)
    plane = control_plane
    admin = ssl.create_default_context(cafile=str(plane.certs.ca_crt))
    admin.load_cert_chain(*map(str, plane.certs.admin))
    console = (f"{plane.url}/apis/subresources.kubevirt.io/v1/namespaces/{namespace}/"
               "virtualmachineinstances/vm-1/vnc")
    async with aiohttp.ClientSession() as http, http.ws_connect(
            console, protocols=("plain.kubevirt.io",), ssl=admin) as outside:
        greeting = await outside.receive(timeout=20)  # virtctl's connection is live
        assert greeting.data == b"RFB 003.008\n", greeting
        async with make_relay(routes=[kubevirt_route(namespace, "vm-1")],
                              kubeconfig=kubeconfig) as relay, http.ws_connect(
                f"{relay.public_url}/t/{namespace}/vm-1/websockify",
                protocols=("binary",)) as ws:
            code, reason = await closed_with(ws)
        assert code == closecodes.CONFLICT, (code, reason)
        assert reason.startswith("in use by another console client (virtctl vnc or a web "
                                 "console) of VM vm-1"), reason
        assert kubevirt_api.queries[-1] == {"preserveSession": "true"}
        assert kubevirt_api.replaced == 0 and not outside.closed


async def test_relay_without_the_rbac_rule_is_refused(
        kubevirt_api: KubeVirtBackend, control_plane: ControlPlane, namespace: str,
        make_relay: RelayFactory, xvnc: XvncServer, tmp_path: Path) -> None:
    kubevirt_api.consoles[(namespace, "vm-1")] = xvnc.port
    kubeconfig = relay_account(control_plane, namespace, tmp_path, may_open=False)
    async with make_relay(routes=[kubevirt_route(namespace, "vm-1")],
                          kubeconfig=kubeconfig) as relay, aiohttp.ClientSession() as http, \
            http.ws_connect(f"{relay.public_url}/t/{namespace}/vm-1/websockify",
                            protocols=("binary",)) as ws:
        code, reason = await closed_with(ws)
    assert code == closecodes.FORBIDDEN
    assert "virtualmachineinstances/vnc" in reason and "kubevirt.enabled" in reason, reason
    # Refused by the API server's RBAC: the request never reached KubeVirt.
    assert not [r for r in kubevirt_api.requests if r[1] == namespace]


async def test_a_vmi_that_does_not_exist(
        kubevirt_api: KubeVirtBackend, control_plane: ControlPlane, namespace: str,
        make_relay: RelayFactory, tmp_path: Path) -> None:
    kubeconfig = relay_account(control_plane, namespace, tmp_path, may_open=True)
    async with make_relay(routes=[kubevirt_route(namespace, "gone")],
                          kubeconfig=kubeconfig) as relay, aiohttp.ClientSession() as http, \
            http.ws_connect(f"{relay.public_url}/t/{namespace}/gone/websockify",
                            protocols=("binary",)) as ws:
        code, reason = await closed_with(ws)
    assert code == closecodes.BAD_UPSTREAM
    assert reason == "virtualmachineinstance gone does not exist; is the VM running?", reason


# -- what applies to every endpoint applies through KubeVirt too ----------------------------


async def pointer_through(relay_url: str, namespace: str, target: str, x: int, y: int) -> None:
    """A PointerEvent, then an update request answered: the server has read what came before."""
    async with aiohttp.ClientSession() as http, http.ws_connect(
            f"{relay_url}/t/{namespace}/{target}/websockify", protocols=("binary",)) as ws:
        width, height, stream = await rfb_session(ws)
        await ws.send_bytes(struct.pack("!BBHH", 5, 0, x, y))
        await ws.send_bytes(struct.pack("!BBHHHH", 3, 0, width // 2, height // 2, 1, 1))
        await read_update(stream)


async def test_view_only_and_credentials_apply_to_kubevirt_targets(
        kubevirt_api: KubeVirtBackend, control_plane: ControlPlane, namespace: str,
        make_relay: RelayFactory, xvnc: XvncServer, vncauth_xvnc: XvncServer,  # noqa: F811
        secrets_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    kubevirt_api.consoles.update({(namespace, "vm-rw"): xvnc.port,
                                  (namespace, "vm-ro"): xvnc.port,
                                  (namespace, "vm-pw"): vncauth_xvnc.port})
    kubeconfig = relay_account(control_plane, namespace, tmp_path, may_open=True)
    routes = [kubevirt_route(namespace, "vm-rw"),
              dataclasses.replace(kubevirt_route(namespace, "vm-ro"), view_only=True),
              dataclasses.replace(kubevirt_route(namespace, "vm-pw"), credentials=Credentials(
                  password_file=str(secrets_dir / "password")))]
    async with make_relay(routes=routes, kubeconfig=kubeconfig) as relay:
        # The relay logs in with the stored password over the KubeVirt stream; the viewer is
        # offered None only and gets the server's real desktop.
        async with aiohttp.ClientSession() as http, http.ws_connect(
                f"{relay.public_url}/t/{namespace}/vm-pw/websockify",
                protocols=("binary",)) as ws:
            assert await rfb_handshake(ws) == (800, 600)
        # The pointer moves through an interactive target (the control) ...
        await pointer_through(relay.public_url, namespace, "vm-rw", 123, 45)
        wait_until(lambda: pointer_position(xvnc) == (123, 45), "the pointer at (123, 45)",
                   timeout=10)
        # ... and not through a view-only one: the relay dropped the message.
        await pointer_through(relay.public_url, namespace, "vm-ro", 300, 300)
        assert pointer_position(xvnc) == (123, 45)


async def test_vencrypt_x509_over_the_kubevirt_stream(
        kubevirt_api: KubeVirtBackend, control_plane: ControlPlane, namespace: str,
        make_relay: RelayFactory, x509_xvnc: XvncServer, secrets_dir: Path,  # noqa: F811
        tmp_path: Path) -> None:
    # TLS started by the relay inside the WebSocket (asyncio's TLS layer over its transport).
    kubevirt_api.consoles[(namespace, "vm-tls")] = x509_xvnc.port
    kubeconfig = relay_account(control_plane, namespace, tmp_path, may_open=True)
    route = dataclasses.replace(
        kubevirt_route(namespace, "vm-tls"),
        credentials=Credentials(password_file=str(secrets_dir / "password")),
        tls=TlsSpec(ca_file=str(secrets_dir / "ca.crt"), server_name=SERVER_NAME))
    async with make_relay(routes=[route], kubeconfig=kubeconfig) as relay, \
            aiohttp.ClientSession() as http, http.ws_connect(
                f"{relay.public_url}/t/{namespace}/vm-tls/websockify",
                protocols=("binary",)) as ws:
        assert await rfb_handshake(ws) == (800, 600)
