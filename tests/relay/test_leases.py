"""Exclusive consoles across two relay replicas, held as Leases in kmock's Kubernetes emulator."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import pytest

from harness.servers import GREETING, TcpServer
from harness.waiting import eventually
from tests.conftest import RelayFactory
from tests.relay.test_sessions import PROXY, closed_with, connect
from tests.support.kubeconfig import write_kubeconfig
from vncgate.common.model import Route
from vncgate.common.spec import SessionMode, SessionPolicy, Takeover
from vncgate.relay import closecodes
from vncgate.relay.session.consoles import KubeConsoles, lease_name
from vncgate.relay.web.server import RelayServer

NAMESPACE = "vncgate"
LEASES = "coordination.k8s.io/v1/leases"


@pytest.fixture
def cluster(kmock: kmock.KubernetesEmulator, tmp_path: Path) -> Path:
    every = {"get", "list", "watch", "create", "update", "patch", "delete"}
    kmock.resources[LEASES] = {"kind": "Lease", "namespaced": True, "verbs": every}
    return write_kubeconfig(tmp_path / "kubeconfig", str(kmock.url))


def lease(kmock: kmock.KubernetesEmulator, name: str) -> dict[str, Any] | None:
    try:
        obj = kmock.objects[LEASES, NAMESPACE, name]
    except KeyError:
        return None
    return None if obj.deleted else dict(obj.last.raw)  # type: ignore[attr-defined]


async def replicas(stack: AsyncExitStack, make_relay: RelayFactory, route: Route,
                   kubeconfig: Path) -> list[RelayServer]:
    servers = []
    for identity in ("relay-a", "relay-b"):
        servers.append(await stack.enter_async_context(make_relay(
            routes=[route], auth=PROXY, kubeconfig=kubeconfig, lease_namespace=NAMESPACE,
            identity=identity)))
    return servers


def crash(relay: RelayServer) -> KubeConsoles:
    """What a killed replica leaves: its Leases, with nothing renewing or releasing them."""
    consoles = relay.state.consoles
    assert isinstance(consoles, KubeConsoles)
    for task in consoles._tasks:
        task.cancel()
    consoles._mine.clear()
    return consoles


async def test_exclusive_holds_across_replicas_and_takeover_closes_the_other(
        make_relay: RelayFactory, sink_backend: TcpServer, cluster: Path,
        kmock: kmock.KubernetesEmulator) -> None:
    route = Route("lab", "desk", "127.0.0.1", sink_backend.port,
                  sessions=SessionPolicy(mode=SessionMode.EXCLUSIVE, takeover=Takeover.ALLOW))
    async with AsyncExitStack() as stack, aiohttp.ClientSession() as http:
        a, b = await replicas(stack, make_relay, route, cluster)
        first = await connect(http, a, "alice")
        assert await first.receive_bytes(timeout=5) == GREETING
        held = lease(kmock, "vnc-lab-desk")
        assert held is not None
        assert held["spec"]["holderIdentity"] == "relay-a"
        assert held["metadata"]["annotations"]["vncgate.io/user"] == "alice"
        # Replica B sees A's hold.
        code, reason = await closed_with(await connect(http, b, "bob"))
        assert code == closecodes.CONFLICT
        assert reason.startswith("in use by alice since") and "take it over" in reason
        # A takeover on B closes A's session, which learns of it from the Lease.
        taker = await connect(http, b, "bob", takeover=True)
        assert await taker.receive_bytes(timeout=5) == GREETING
        code, reason = await closed_with(first, timeout=10)
        assert (code, reason) == (closecodes.CONFLICT, "taken over by bob")
        held = lease(kmock, "vnc-lab-desk")
        assert held is not None and held["spec"]["holderIdentity"] == "relay-b"
        assert held["spec"]["leaseTransitions"] == 1
        # Session end releases the Lease: A may hold the console again.
        await taker.close()
        await eventually(lambda: lease(kmock, "vnc-lab-desk") is None, "the Lease released")
        again = await connect(http, a, "alice")
        assert await again.receive_bytes(timeout=5) == GREETING
        await again.close()


async def test_a_vanished_replicas_hold_expires(
        make_relay: RelayFactory, sink_backend: TcpServer, cluster: Path,
        kmock: kmock.KubernetesEmulator) -> None:
    route = Route("lab", "desk", "127.0.0.1", sink_backend.port,
                  sessions=SessionPolicy(mode=SessionMode.EXCLUSIVE))
    async with AsyncExitStack() as stack, aiohttp.ClientSession() as http:
        a, b = await replicas(stack, make_relay, route, cluster)
        first = await connect(http, a, "alice")
        assert await first.receive_bytes(timeout=5) == GREETING
        # Replica A dies without cleaning up: its renewals stop, its Leases stay behind.
        crash(a)
        replica = kmock.objects[LEASES, NAMESPACE, "vncgate-relay-relay-a"]
        expired = {"renewTime": "2020-01-01T00:00:00.000000Z", "leaseDurationSeconds": 30}
        replica.patch({"spec": expired})  # what 30 s without renewal looks like
        assert lease(kmock, "vnc-lab-desk") is not None  # still there, but free now
        b_consoles = b.state.consoles
        assert isinstance(b_consoles, KubeConsoles)
        b_consoles._alive_cache.clear()
        second = await connect(http, b, "bob")
        assert await second.receive_bytes(timeout=5) == GREETING
        held = lease(kmock, "vnc-lab-desk")
        assert held is not None and held["spec"]["holderIdentity"] == "relay-b"
        await second.close()
        await first.close()


async def test_a_replica_restarted_in_its_pod_does_not_keep_its_predecessors_hold(
        make_relay: RelayFactory, sink_backend: TcpServer, cluster: Path,
        kmock: kmock.KubernetesEmulator) -> None:
    """Same identity (the pod's name), a new process: the old process's hold is free at once,
    on the new process and on the other replica, instead of looking alive forever."""
    route = Route("lab", "desk", "127.0.0.1", sink_backend.port,
                  sessions=SessionPolicy(mode=SessionMode.EXCLUSIVE))
    async with AsyncExitStack() as stack, aiohttp.ClientSession() as http:
        a, b = await replicas(stack, make_relay, route, cluster)
        first = await connect(http, a, "alice")
        assert await first.receive_bytes(timeout=5) == GREETING
        consoles = crash(a)
        # The container restarts in the same pod: same identity, its own process, its own
        # renewals of the replica's liveness Lease.
        restarted = await stack.enter_async_context(make_relay(
            routes=[route], auth=PROXY, kubeconfig=cluster, lease_namespace=NAMESPACE,
            identity="relay-a"))
        old = lease(kmock, "vnc-lab-desk")
        assert old is not None and old["spec"]["holderIdentity"] == "relay-a"
        b_consoles = b.state.consoles
        assert isinstance(b_consoles, KubeConsoles)
        await eventually(lambda: restarted_renewed(kmock, consoles.incarnation),
                         "the restarted replica renewed its liveness Lease")
        b_consoles._alive_cache.clear()
        second = await connect(http, b, "bob")
        assert await second.receive_bytes(timeout=5) == GREETING
        held = lease(kmock, "vnc-lab-desk")
        assert held is not None and held["spec"]["holderIdentity"] == "relay-b"
        await second.close()
        await eventually(lambda: lease(kmock, "vnc-lab-desk") is None, "the Lease released")
        third = await connect(http, restarted, "carol")
        assert await third.receive_bytes(timeout=5) == GREETING
        await third.close()
        await first.close()


def restarted_renewed(kmock: kmock.KubernetesEmulator, old_incarnation: str) -> bool:
    replica = lease(kmock, "vncgate-relay-relay-a")
    if replica is None:
        return False
    notes = replica["metadata"].get("annotations") or {}
    return bool(notes.get("vncgate.io/incarnation")) and \
        notes.get("vncgate.io/incarnation") != old_incarnation


def test_lease_names_stay_within_the_limit() -> None:
    assert lease_name(Route("lab", "desk", "h", 1)) == "vnc-lab-desk"
    long = lease_name(Route("n" * 63, "x" * 253, "h", 1))
    assert len(long) == 253 and long.startswith("vnc-nnn")


async def test_a_hold_that_cannot_be_checked_refuses_with_4503_not_4409(
        make_relay: RelayFactory, sink_backend: TcpServer, cluster: Path,
        kmock: kmock.KubernetesEmulator) -> None:
    """The API server fails the console's Lease: the viewer is refused (fail closed: two
    holders must never be let in), with 4503, after which the viewer asks again, not with
    4409 ("in use"), after which it stops."""
    route = Route("lab", "desk", "127.0.0.1", sink_backend.port,
                  sessions=SessionPolicy(mode=SessionMode.EXCLUSIVE))

    def failing() -> None:
        raise RuntimeError("etcd is away")  # the API server's 500

    async with AsyncExitStack() as stack, aiohttp.ClientSession() as http:
        relay = await stack.enter_async_context(make_relay(
            routes=[route], auth=PROXY, kubeconfig=cluster, lease_namespace=NAMESPACE,
            identity="relay-a"))
        kmock[f"get /apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/"
              f"{lease_name(route)}"] << failing
        code, reason = await closed_with(await connect(http, relay, "alice"))
    assert code == closecodes.UNAVAILABLE, (code, reason)
    assert reason == "could not check who holds this console; try again in a moment"
