"""The real operator (kopf) in the test's event loop, against kmock's Kubernetes emulator.

Every test builds a fresh registry with `build_registry`, runs `kopf.operator` as a task, and
stops it at the end. Relays are real `RelayServer`s on 127.0.0.1; the VNC server is a real Xvnc.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import itertools
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import kopf
import pytest

from harness.waiting import eventually
from harness.xvnc import XvncServer
from vncgate.common.addresses import Address
from vncgate.common.kube import KubeConnection
from vncgate.operator.handlers import build_registry
from vncgate.operator.policy import AddressPolicy
from vncgate.operator.runtime import MEMO_KEY, Prober, Runtime
from vncgate.operator.settings import OperatorSettings
from vncgate.relay.settings import RelaySettings
from vncgate.relay.web.server import RelayServer

TOKEN = "t" * 32
TARGETS = "vncgate.io/v1alpha1/vnctargets"
SERVICES = "v1/services"
SLICES = "discovery.k8s.io/v1/endpointslices"
EVENTS = "v1/events"
PUBLIC_URL = "https://vnc.example.com"
_uids = itertools.count(1)


@pytest.fixture(scope="session")
def xvnc() -> Iterator[XvncServer]:
    with XvncServer() as vnc:
        yield vnc


@pytest.fixture
def k8s(kmock: Any) -> Any:
    """The emulator with every resource the operator lists, watches or writes."""
    every = {"list", "watch", "get", "patch", "create", "delete", "update"}
    kmock.resources[TARGETS] = {"kind": "VncTarget", "singular": "vnctarget", "namespaced": True,
                                "verbs": every, "shortnames": {"vnc"}, "subresources": {"status"}}
    kmock.resources["v1/namespaces"] = {"kind": "Namespace", "namespaced": False,
                                        "verbs": {"list", "watch", "get"}}
    kmock.resources[SERVICES] = {"kind": "Service", "namespaced": True, "verbs": every}
    kmock.resources[SLICES] = {"kind": "EndpointSlice", "namespaced": True, "verbs": every}
    kmock.resources[EVENTS] = {"kind": "Event", "namespaced": True, "verbs": {"create", "list"}}
    return kmock


@pytest.fixture
async def relay() -> AsyncIterator[RelayServer]:
    async with start_relay() as server:
        yield server


def start_relay(internal_port: int = 0) -> RelayServer:
    return RelayServer(RelaySettings(listen=Address("127.0.0.1", 0),
                                     internal_listen=Address("127.0.0.1", internal_port),
                                     api_token=TOKEN))


def loopback_policy() -> AddressPolicy:
    # Tests point targets at Xvnc on 127.0.0.1, which the default policy rightly refuses.
    return AddressPolicy(allow_cidrs=(ipaddress.ip_network("127.0.0.1/32"),))


def operator_settings(**overrides: Any) -> OperatorSettings:
    values: dict[str, Any] = {
        "api_token": TOKEN, "public_url": PUBLIC_URL, "policy": loopback_policy(),
        "resync_interval": 1.0, "probe_interval": 1.0, "probe_timeout": 1.0,
        "liveness_endpoint": None, "standalone": True,
    }
    values.update(overrides)
    return OperatorSettings(**values)


class _NoCredentials:
    """The emulator takes requests without a token."""

    def get_api_key_with_prefix(self, _name: str) -> None:
        return None


def emulator_connection(k8s: Any) -> KubeConnection:
    return KubeConnection(server=str(k8s.url).rstrip("/"), ssl_context=False,
                          configuration=_NoCredentials())


@contextlib.asynccontextmanager
async def running_operator(k8s: Any, config: OperatorSettings,
                           prober: Prober | None = None) -> AsyncIterator[Runtime]:
    """The operator running as a task in this loop; yields its `Runtime` once started."""
    connect = functools.partial(emulator_connection, k8s)
    registry = (build_registry(config, prober=prober, connect=connect) if prober
                else build_registry(config, connect=connect))

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=str(k8s.url).rstrip("/"), insecure=True)

    stop, ready, memo = asyncio.Event(), asyncio.Event(), kopf.Memo()
    task = asyncio.create_task(kopf.operator(
        registry=registry, clusterwide=True, standalone=True, stop_flag=stop, ready_flag=ready,
        settings=kopf.OperatorSettings(), memo=memo))
    try:
        await asyncio.wait_for(ready.wait(), timeout=10)
        yield await eventually(lambda: memo.get(MEMO_KEY), "the startup handler's runtime")
    finally:
        stop.set()
        # kopf runs the cleanup handlers on a stop; a short wait, then cancel whatever hangs.
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), timeout=3)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        # A stop cut short (a busy machine) skips kopf's cleanup handler: without this, the
        # runtime's resync and scheduler would go on working in this loop, from a stale view,
        # beside the next operator a test starts.
        runtime = memo.get(MEMO_KEY)
        if isinstance(runtime, Runtime):
            await runtime.close()


class Cluster:
    """Writes through the emulator's API, so that kopf's watches see every change."""

    def __init__(self, k8s: Any) -> None:
        self.k8s = k8s
        self.base = str(k8s.url).rstrip("/")

    @staticmethod
    def _path(resource: str, namespace: str | None, name: str | None = None) -> str:
        group_version, plural = resource.rsplit("/", 1)
        prefix = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        path = f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"
        return f"{path}/{name}" if name else path

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        async with aiohttp.ClientSession() as session, session.request(
                method, self.base + path, json=body, headers=headers) as resp:
            text = await resp.text()
            assert resp.status < 400, f"{method} {path} -> {resp.status}: {text}"
            return await resp.json() if text else None

    async def create(self, resource: str, body: dict[str, Any]) -> Any:
        meta = body.setdefault("metadata", {})
        # The emulator keeps these as given; kopf's JSON patches test resourceVersion.
        meta.setdefault("uid", f"uid-{next(_uids)}")
        meta.setdefault("resourceVersion", "1")
        meta.setdefault("generation", 1)
        return await self._call("POST", self._path(resource, meta.get("namespace")), body)

    async def patch(self, resource: str, namespace: str, name: str, body: dict[str, Any]) -> Any:
        return await self._call("PATCH", self._path(resource, namespace, name), body)

    async def delete(self, resource: str, namespace: str, name: str) -> Any:
        return await self._call("DELETE", self._path(resource, namespace, name))

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj = self.k8s.objects[resource, namespace, name]
        except KeyError:
            return None
        return None if obj.deleted else dict(obj.raw)

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        obj = self.get(TARGETS, namespace, name) or {}
        return dict(obj.get("status") or {})

    def versions(self, resource: str, namespace: str, name: str) -> int:
        return len(self.k8s.objects[resource, namespace, name].history)

    def events(self, namespace: str) -> list[dict[str, Any]]:
        return [dict(obj.raw) for (res, ns, _), obj in self.k8s.objects.items()
                if res == EVENTS and ns == namespace and not obj.deleted]


def vnc_target(namespace: str, name: str, endpoint: dict[str, Any],
               **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "vncgate.io/v1alpha1", "kind": "VncTarget",
            "metadata": {"namespace": namespace, "name": name},
            "spec": {"endpoint": endpoint, **spec}}


def service(namespace: str, name: str, ports: list[dict[str, Any]],
            **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": namespace, "name": name},
            "spec": {"ports": ports, "clusterIP": "10.96.0.10", **spec}}


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions") or ()}


async def rfb_greeting(relay: RelayServer, namespace: str, name: str) -> tuple[bytes, int | None]:
    """Open the target through the relay's WebSocket bridge, as noVNC does.

    Returns the first bytes (the RFB greeting) or b"" and the close code."""
    url = f"{relay.public_url}/t/{namespace}/{name}/websockify"
    async with aiohttp.ClientSession() as session, session.ws_connect(
            url, protocols=("binary",), origin=relay.public_url,
            timeout=aiohttp.ClientWSTimeout(ws_close=5)) as ws:
        data = b""
        async with asyncio.timeout(5):
            while len(data) < 12:
                msg = await ws.receive()
                if msg.type != aiohttp.WSMsgType.BINARY:
                    return data, ws.close_code
                data += msg.data
        return data, None


def settled(runtime: Runtime, quiet: float = 5.0) -> bool:
    """The operator has done what it had to: the relays had a full resync, and no evaluation
    runs or is due within `quiet` seconds (so no status write is on its way)."""
    return runtime.fleet.synced_once.is_set() and runtime.scheduler.quiet(quiet)
