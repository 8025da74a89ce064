"""KubeVirt's console API for tests: an aggregated API server behind the real kube-apiserver.

No KubeVirt runs here. What the relay depends on is KubeVirt's contract, and that is small:
`GET /apis/subresources.kubevirt.io/v1/namespaces/{ns}/virtualmachineinstances/{name}/vnc` on
the Kubernetes API server, which the aggregation layer proxies to virt-api; a WebSocket with the
subprotocol `plain.kubevirt.io` whose binary messages carry the raw RFB stream of the VM's VNC
server; one connection per VMI (a new one replaces the old, unless it asks
`preserveSession=true`: then it is refused with 503 while another holds the console).
`KubeVirtBackend` implements that contract in front of a real Xvnc, and `install_api_service`
registers it with the API server as the `v1.subresources.kubevirt.io` APIService, so requests
take the real path: authentication and RBAC (`get` on `virtualmachineinstances/vnc`) by
kube-apiserver, then its proxy to the backend with the front-proxy client certificate and the
X-Remote-User header.

The aggregator dials a Service's endpoint, which may not be a loopback address. So the backend
listens in a network namespace that the test creates (`NetworkNamespace`): a veth pair with a
private /30, the API server on the host side, the backend's listening socket on the other (bound
there through setns(2) in a short-lived thread). The backend itself runs in the test process and
dials Xvnc on the host's loopback. The namespace and its link are removed at teardown.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import json
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from harness.cluster import ControlPlane
from harness.waiting import wait_until

GROUP, VERSION = "subresources.kubevirt.io", "v1"
SUBPROTOCOL = "plain.kubevirt.io"
BACKEND_NAMESPACE = "kubevirt-test"
SERVICE = "virt-api"
BACKEND_PORT = 8443
CRDS = Path(__file__).resolve().parents[1] / "cluster" / "kubevirt-crds.yaml"
_CLONE_NEWNET = 0x40000000
_T = TypeVar("_T")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


class NetworkNamespace:
    """A network namespace joined to the host by a veth pair on 10.213.N.0/30.

    `host_address` is the host's end, `address` the namespace's; only this test's traffic
    crosses it (nothing routes beyond the /30)."""

    def __init__(self, index: int | None = None) -> None:
        index = os.getpid() % 200 + 20 if index is None else index
        self.name = f"vncgate-kv-{index}"
        self.host_link, self.ns_link = f"vkv{index}h", f"vkv{index}n"
        self.host_address, self.address = f"10.213.{index}.1", f"10.213.{index}.2"

    def __enter__(self) -> NetworkNamespace:
        self._remove()  # a run that was killed may have left ours behind
        try:
            _ip("netns", "add", self.name)
            _ip("link", "add", self.host_link, "type", "veth", "peer", "name", self.ns_link)
            _ip("link", "set", self.ns_link, "netns", self.name)
            _ip("addr", "add", f"{self.host_address}/30", "dev", self.host_link)
            _ip("link", "set", self.host_link, "up")
            _ip("-n", self.name, "addr", "add", f"{self.address}/30", "dev", self.ns_link)
            _ip("-n", self.name, "link", "set", self.ns_link, "up")
            _ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self._remove()

    def _remove(self) -> None:
        _ip("link", "del", self.host_link, check=False)  # takes its peer with it
        _ip("netns", "del", self.name, check=False)

    def run_inside(self, function: Callable[[], _T]) -> _T:
        """Call `function` in a thread that has joined this namespace (sockets it creates
        belong to the namespace for their whole life)."""
        libc = ctypes.CDLL(None, use_errno=True)
        outcome: dict[str, Any] = {}

        def run() -> None:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
            try:
                if libc.setns(target, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {self.name} failed")
                try:
                    outcome["value"] = function()
                finally:
                    libc.setns(own, _CLONE_NEWNET)
            except BaseException as exc:  # handed to the caller's thread
                outcome["error"] = exc
            finally:
                os.close(own)
                os.close(target)

        thread = threading.Thread(target=run, name=f"in {self.name}")
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]  # type: ignore[no-any-return]

    def listen(self, port: int) -> socket.socket:
        def bind() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.address, port))
            sock.listen(64)
            return sock
        return self.run_inside(bind)


class KubeVirtBackend:
    """virt-api's console endpoint, in its own thread and event loop.

    `consoles[(namespace, name)]` is the loopback port of the VNC server of that VMI; a VMI not
    in it is answered 404 as virt-api answers for a VMI that does not exist. `requests` records
    (X-Remote-User, namespace, name) of every console request the API server proxied.
    """

    def __init__(self, sock: socket.socket, server_cert: tuple[Path, Path],
                 front_proxy_ca: Path) -> None:
        self.sock = sock
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(*map(str, server_cert))
        # Only the aggregator may call: it presents the front-proxy client certificate.
        self.context.load_verify_locations(cafile=str(front_proxy_ca))
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.consoles: dict[tuple[str, str], int] = {}
        self.requests: list[tuple[str, str, str]] = []
        self.queries: list[dict[str, str]] = []  # each console request's query parameters
        self.replaced = 0
        self._open: dict[tuple[str, str], web.WebSocketResponse] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kubevirt backend")
        self._runner: web.AppRunner | None = None

    def __enter__(self) -> KubeVirtBackend:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    def __exit__(self, *_: object) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()
        self.sock.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get(f"/apis/{GROUP}/{VERSION}/namespaces/{{namespace}}/"
                           "virtualmachineinstances/{name}/vnc", self._vnc)
        app.router.add_get("/apis", self._group_list)
        app.router.add_get(f"/apis/{GROUP}", self._group)
        app.router.add_get(f"/apis/{GROUP}/{VERSION}", self._resources)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, self.sock, ssl_context=self.context).start()

    async def _stop(self) -> None:
        for ws in list(self._open.values()):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @staticmethod
    def _group_body() -> dict[str, Any]:
        version = {"groupVersion": f"{GROUP}/{VERSION}", "version": VERSION}
        return {"kind": "APIGroup", "apiVersion": "v1", "name": GROUP, "versions": [version],
                "preferredVersion": version}

    async def _group_list(self, _: web.Request) -> web.Response:
        return web.json_response({"kind": "APIGroupList", "apiVersion": "v1",
                                  "groups": [self._group_body()]})

    async def _group(self, _: web.Request) -> web.Response:
        return web.json_response(self._group_body())

    async def _resources(self, _: web.Request) -> web.Response:
        return web.json_response({
            "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{GROUP}/{VERSION}",
            "resources": [{"name": "virtualmachineinstances/vnc", "singularName": "",
                           "namespaced": True, "kind": "VirtualMachineInstance",
                           "verbs": ["get"]}]})

    async def _vnc(self, request: web.Request) -> web.StreamResponse:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        self.requests.append((request.headers.get("X-Remote-User", ""), namespace, name))
        self.queries.append(dict(request.query))
        port = self.consoles.get((namespace, name))
        if request.query.get("preserveSession") == "true" and (namespace, name) in self._open:
            # KubeVirt's answer under preserveSession while another client holds the console.
            return web.json_response(
                {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503,
                 "message": "Active VNC connection. Request denied."}, status=503)
        if port is None:
            return web.json_response(
                {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                 "reason": "NotFound",
                 "message": f'virtualmachineinstance.kubevirt.io "{name}" not found',
                 "details": {"name": name, "group": "kubevirt.io",
                             "kind": "virtualmachineinstance"}}, status=404)
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,))
        await ws.prepare(request)
        if ws.ws_protocol != SUBPROTOCOL:
            await ws.close(code=1002, message=b"plain.kubevirt.io only")
            return ws
        previous = self._open.get((namespace, name))
        if previous is not None:  # KubeVirt: a new VNC connection replaces the old one
            self.replaced += 1
            await previous.close()
        self._open[(namespace, name)] = ws
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def vnc_to_ws() -> None:
            while data := await reader.read(65536):
                await ws.send_bytes(data)

        pump = asyncio.create_task(vnc_to_ws())
        try:
            async for message in ws:
                if message.type is aiohttp.WSMsgType.BINARY:
                    writer.write(message.data)
                    await writer.drain()
        finally:
            pump.cancel()
            with contextlib.suppress(BaseException):
                await pump
            writer.close()
            if self._open.get((namespace, name)) is ws:
                del self._open[(namespace, name)]
            await ws.close()
        return ws


def install_api_service(plane: ControlPlane, netns: NetworkNamespace, ca_bundle: Path) -> None:
    """Register the backend as `v1.subresources.kubevirt.io` and wait until it is Available."""
    if plane.kubectl("get", "namespace", BACKEND_NAMESPACE, check=False).returncode != 0:
        plane.kubectl("create", "namespace", BACKEND_NAMESPACE)
    plane.apply([
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": SERVICE, "namespace": BACKEND_NAMESPACE},
         "spec": {"ports": [{"name": "https", "port": 443, "targetPort": BACKEND_PORT}]}},
        {"apiVersion": "v1", "kind": "Endpoints",
         "metadata": {"name": SERVICE, "namespace": BACKEND_NAMESPACE},
         "subsets": [{"addresses": [{"ip": netns.address}],
                      "ports": [{"name": "https", "port": BACKEND_PORT}]}]},
        {"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
         "metadata": {"name": f"{VERSION}.{GROUP}"},
         "spec": {"group": GROUP, "version": VERSION, "groupPriorityMinimum": 1000,
                  "versionPriority": 15,
                  "service": {"namespace": BACKEND_NAMESPACE, "name": SERVICE, "port": 443},
                  "caBundle": base64.b64encode(ca_bundle.read_bytes()).decode()}},
    ])

    def available() -> bool:
        service = json.loads(plane.kubectl("get", "apiservice", f"{VERSION}.{GROUP}", "-o",
                                           "json").stdout)
        return any(c.get("type") == "Available" and c.get("status") == "True"
                   for c in (service.get("status") or {}).get("conditions") or ())

    wait_until(available, f"the APIService {VERSION}.{GROUP} Available", timeout=90)


def remove_api_service(plane: ControlPlane) -> None:
    plane.kubectl("delete", "apiservice", f"{VERSION}.{GROUP}", "--ignore-not-found",
                  check=False)
    plane.kubectl("delete", "namespace", BACKEND_NAMESPACE, "--wait=false", "--ignore-not-found",
                  check=False)


def serving_certificate(plane: ControlPlane) -> tuple[Path, Path]:
    """The backend's certificate, for the name the aggregator checks (SERVICE.NAMESPACE.svc)."""
    return plane.certs.issue(f"virt-api-{time.monotonic_ns()}", "/CN=virt-api", sans=(
        f"DNS:{SERVICE}.{BACKEND_NAMESPACE}.svc",))
