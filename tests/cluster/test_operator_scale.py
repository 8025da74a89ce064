"""The operator's scheduler, finalizers, Events and resync on the real API server.

The operator runs in the test's event loop (so that the test sees the relay's registry as it
changes), with real credentials: the control plane's kubeconfig through $KUBECONFIG, found by
kopf's own login and by the operator's API client alike. Every request from the test goes
through an aiohttp client too, never through a blocking kubectl, so that the operator keeps
running while the test waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import kopf
import pytest

from harness.cluster import ControlPlane
from harness.waiting import eventually
from harness.xvnc import XvncServer
from vncgate.common.addresses import Address
from vncgate.common.kube import KubeClient, KubeError, kube_connection
from vncgate.common.model import Route
from vncgate.operator.handlers import build_registry
from vncgate.operator.kubeapi import OLD_FINALIZER
from vncgate.operator.policy import AddressPolicy
from vncgate.operator.runtime import MEMO_KEY, Runtime
from vncgate.operator.settings import OperatorSettings
from vncgate.relay.settings import RelaySettings
from vncgate.relay.web.server import RelayServer

TOKEN = "s" * 32
T = TypeVar("T")
TARGETS = "/apis/vncgate.io/v1alpha1/namespaces/{ns}/vnctargets"


@pytest.fixture
async def kube(control_plane: ControlPlane,
               monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[KubeClient]:
    monkeypatch.setenv("KUBECONFIG", str(control_plane.admin_kubeconfig))
    # The kubernetes package reads $KUBECONFIG once, when it is first imported (kopf's own
    # login calls it without a path): a process started with $KUBECONFIG set sees it anyway.
    from kubernetes.config import kube_config
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION",
                        str(control_plane.admin_kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    client = KubeClient(kube_connection(control_plane.admin_kubeconfig), timeout=30)
    yield client
    await client.close()


@pytest.fixture
def vnc(xvnc: XvncServer) -> XvncServer:
    """The session's real Xvnc: the probe goes through its handshake as far as a login."""
    return xvnc


@pytest.fixture
async def relay() -> AsyncIterator[RelayServer]:
    async with RelayServer(RelaySettings(listen=Address("127.0.0.1", 0),
                                         internal_listen=Address("127.0.0.1", 0),
                                         api_token=TOKEN)) as server:
        yield server


def settings(relay: RelayServer, namespace: str, **overrides: Any) -> OperatorSettings:
    values: dict[str, Any] = {
        "namespaces": (namespace,), "relay_urls": (relay.internal_url,), "api_token": TOKEN,
        "policy": AddressPolicy(allow_cidrs=(ipaddress.ip_network("127.0.0.1/32"),)),
        "resync_interval": 2.0, "probe_interval": 5.0, "probe_timeout": 1.0,
        "liveness_endpoint": None, "standalone": True}
    values.update(overrides)
    return OperatorSettings(**values)


@contextlib.asynccontextmanager
async def operator(config: OperatorSettings) -> AsyncIterator[Runtime]:
    stop, ready, memo = asyncio.Event(), asyncio.Event(), kopf.Memo()
    task = asyncio.create_task(kopf.operator(
        registry=build_registry(config), clusterwide=False, namespaces=list(config.namespaces),
        standalone=True, stop_flag=stop, ready_flag=ready, settings=kopf.OperatorSettings(),
        memo=memo))
    try:
        await asyncio.wait_for(ready.wait(), timeout=30)
        yield await eventually(lambda: memo.get(MEMO_KEY), "the startup handler's runtime")
    finally:
        stop.set()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), timeout=5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        runtime = memo.get(MEMO_KEY)  # a stop cut short skips kopf's cleanup handler
        if isinstance(runtime, Runtime):
            await runtime.close()


def target(namespace: str, name: str, port: int, **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "vncgate.io/v1alpha1", "kind": "VncTarget",
            "metadata": {"name": name, "namespace": namespace, **meta},
            "spec": {"endpoint": {"address": {"host": "127.0.0.1", "port": port}}}}


async def create(kube: KubeClient, body: dict[str, Any]) -> dict[str, Any]:
    reply = await kube.request("POST", TARGETS.format(ns=body["metadata"]["namespace"]), body)
    assert isinstance(reply, dict)
    return reply


async def get(kube: KubeClient, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        reply = await kube.request("GET", f"{TARGETS.format(ns=namespace)}/{name}")
    except KubeError as exc:
        if exc.status == 404:
            return None
        raise
    return reply if isinstance(reply, dict) else None


async def phase(kube: KubeClient, namespace: str, name: str) -> str | None:
    body = await get(kube, namespace, name) or {}
    return (body.get("status") or {}).get("phase")


def is_phase(kube: KubeClient, namespace: str, name: str,
             wanted: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await phase(kube, namespace, name) == wanted
    return check


async def events_of(kube: KubeClient, namespace: str, name: str) -> list[dict[str, Any]]:
    reply = await kube.request(
        "GET", f"/api/v1/namespaces/{namespace}/events"
               f"?fieldSelector=involvedObject.name%3D{name}")
    return list(reply.get("items") or [])


async def test_targets_carry_no_finalizer_and_lose_the_old_one(
        kube: KubeClient, namespace: str, relay: RelayServer, vnc: XvncServer) -> None:
    # One created before the operator starts, as an older operator left it.
    await create(kube, target(namespace, "old", vnc.port, finalizers=[OLD_FINALIZER]))
    async with operator(settings(relay, namespace)):
        await create(kube, target(namespace, "new", vnc.port))
        for name in ("old", "new"):
            await eventually(is_phase(kube, namespace, name, "Ready"), f"{name} Ready")
        for name in ("old", "new"):
            body = await get(kube, namespace, name) or {}
            assert not body["metadata"].get("finalizers"), (name, body["metadata"])
        # One Event for the one transition of each (New -> Ready), however often status moved.
        for name in ("old", "new"):
            events = await events_of(kube, namespace, name)
            ready = [e for e in events if e["reason"] == "Ready"]
            assert len(ready) == 1 and ready[0]["count"] == 1, events
            assert ready[0]["message"].startswith("New -> Ready")
    # Without the operator, deleting a target (and its namespace) does not wait for anyone.
    await kube.request("DELETE", f"{TARGETS.format(ns=namespace)}/old")
    assert await get(kube, namespace, "old") is None


async def test_namespace_of_targets_deletes_with_the_operator_stopped(
        kube: KubeClient, control_plane: ControlPlane, relay: RelayServer,
        vnc: XvncServer) -> None:
    namespace = f"gone-{int(time.time() * 1000) % 10**9}"
    await kube.request("POST", "/api/v1/namespaces", {"metadata": {"name": namespace}})
    async with operator(settings(relay, namespace)):
        for index in range(5):
            await create(kube, target(namespace, f"desk-{index}", vnc.port))
        await eventually(lambda: len(relay.registry) == 5, "five routes")
    await kube.request("DELETE", f"/api/v1/namespaces/{namespace}")

    async def gone() -> bool:
        try:
            await kube.request("GET", f"/api/v1/namespaces/{namespace}")
        except KubeError as exc:
            return exc.status == 404
        return False

    await eventually(gone, "namespace deleted with the operator stopped", timeout=60)


async def test_a_deleted_target_is_never_served_again_while_resyncs_run(
        kube: KubeClient, namespace: str, relay: RelayServer, vnc: XvncServer) -> None:
    """Deletions in batches while full resyncs run back to back: once the relay dropped a
    deleted route, nothing ever puts it back (a resync that built its table before a deletion
    and sent it after must not resurrect the route)."""
    removed_at: dict[str, float] = {}
    resurrected: list[str] = []
    put = relay.registry.put

    def watching_put(route: Route) -> bool:
        if route.key in removed_at:
            resurrected.append(route.key)
        return put(route)

    relay.registry.put = watching_put  # type: ignore[method-assign]
    relay.registry.add_listener(
        lambda old, new: removed_at.setdefault(old.key, time.monotonic()) if new is None else None)
    names = [f"desk-{index}" for index in range(60)]
    # A resync pass every 50 ms: one is nearly always in flight when a deletion is handled.
    async with operator(settings(relay, namespace, resync_interval=0.05)) as runtime:
        for name in names:
            await create(kube, target(namespace, name, vnc.port))
        await eventually(lambda: len(relay.registry) == len(names), "every route registered")
        for round_ in range(4):
            batch = names[round_ * 15:(round_ + 1) * 15]
            await asyncio.gather(*(kube.request("DELETE", f"{TARGETS.format(ns=namespace)}/{n}")
                                   for n in batch))
            await eventually(lambda b=batch: all(  # type: ignore[misc]
                relay.registry.get(namespace, n) is None for n in b), f"round {round_} removed")
        # Many more resync passes after the last deletion, and the table stays empty.
        passes = runtime.fleet.full_passes

        def twenty_more_passes_and_empty() -> bool:
            assert len(relay.registry) == 0, [r.key for r in relay.registry]
            return runtime.fleet.full_passes >= passes + 20

        await eventually(twenty_more_passes_and_empty, "20 more resync passes")
    assert resurrected == []
    assert len(removed_at) == len(names)


async def test_event_of_a_transition_is_posted_once_across_restarts(
        kube: KubeClient, namespace: str, relay: RelayServer, vnc: XvncServer) -> None:
    config = settings(relay, namespace)
    async with operator(config):
        await create(kube, target(namespace, "desk", vnc.port))
        await eventually(is_phase(kube, namespace, "desk", "Ready"), "Ready")
    # As if the operator had been killed right after writing the transition: start twice
    # more; each start posts the Event of a recent transition again, which is a no-op.
    for _ in range(2):
        async with operator(config):
            await eventually(lambda: len(relay.registry) == 1, "route registered")
    events = [e for e in await events_of(kube, namespace, "desk") if e["reason"] == "Ready"]
    assert len(events) == 1 and events[0]["count"] == 1, events


async def test_relay_restarted_empty_gets_its_routes_back_within_seconds(
        kube: KubeClient, namespace: str, vnc: XvncServer) -> None:
    first = RelayServer(RelaySettings(listen=Address("127.0.0.1", 0),
                                      internal_listen=Address("127.0.0.1", 0), api_token=TOKEN))
    await first.start()
    port = int(first.internal_url.rsplit(":", 1)[1])
    config = settings(first, namespace, resync_interval=3600.0)  # only the poll can notice
    second: RelayServer | None = None
    try:
        async with operator(config):
            for name in ("a", "b", "c"):
                await create(kube, target(namespace, name, vnc.port))
            await eventually(lambda: len(first.registry) == 3, "three routes")
            await first.stop()
            second = RelayServer(RelaySettings(listen=Address("127.0.0.1", 0),
                                               internal_listen=Address("127.0.0.1", port),
                                               api_token=TOKEN))
            await second.start()
            await eventually(lambda: second is not None and len(second.registry) == 3,
                             "routes back on the restarted relay", timeout=15)
    finally:
        await first.stop()
        if second is not None:
            await second.stop()
