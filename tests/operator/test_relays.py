"""The operator and the relay fleet: several replicas, a replica that restarts empty, discovery
through EndpointSlices, and an operator restart that must not redo its work."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

from harness.cluster import free_port
from harness.waiting import eventually
from harness.xvnc import XvncServer
from tests.operator.conftest import (
    SLICES,
    TARGETS,
    Cluster,
    conditions,
    operator_settings,
    rfb_greeting,
    running_operator,
    settled,
    start_relay,
    vnc_target,
)
from vncgate.operator.probe import ProbeResult, probe_rfb
from vncgate.relay.web.server import RelayServer


def address_target(name: str, xvnc: XvncServer, **spec: Any) -> dict[str, Any]:
    return vnc_target("lab", name, {"address": {"host": "127.0.0.1", "port": xvnc.port}}, **spec)


async def test_every_replica_serves_the_route(k8s: Any, xvnc: XvncServer) -> None:
    cluster = Cluster(k8s)
    async with start_relay() as one, start_relay() as two:
        config = operator_settings(relay_urls=(one.internal_url, two.internal_url))
        async with running_operator(k8s, config):
            await cluster.create(TARGETS, address_target("desk-1", xvnc))
            for relay in (one, two):
                await eventually(lambda r=relay: r.registry.get("lab", "desk-1"),
                                 f"route on {relay.internal_url}")
                greeting, code = await rfb_greeting(relay, "lab", "desk-1")
                assert greeting.startswith(b"RFB "), (relay.internal_url, greeting, code)
            status = await eventually(
                lambda: (s := cluster.status("lab", "desk-1")).get("phase") == "Ready" and s,
                "phase Ready")
            assert "(2 known)" in conditions(status)["Registered"]["message"]


async def test_restarted_empty_relay_gets_every_route_back(k8s: Any, xvnc: XvncServer) -> None:
    cluster = Cluster(k8s)
    relay = start_relay()
    await relay.start()
    port = urlsplit(relay.internal_url).port or 0
    try:
        async with running_operator(k8s, operator_settings(relay_urls=(relay.internal_url,))):
            for name in ("desk-1", "desk-2", "desk-3"):
                await cluster.create(TARGETS, address_target(name, xvnc))
            await eventually(lambda: len(relay.registry) == 3, "three routes")

            await relay.stop()  # the replica restarts on the same address, with nothing
            relay = start_relay(internal_port=port)
            await relay.start()
            assert len(relay.registry) == 0
            await eventually(lambda: len(relay.registry) == 3, "routes back after a resync",
                             timeout=5)
            assert relay.registry.synced
            greeting, _ = await rfb_greeting(relay, "lab", "desk-2")
            assert greeting.startswith(b"RFB ")
    finally:
        await relay.stop()


async def test_replicas_found_through_the_endpointslice(
        k8s: Any, xvnc: XvncServer) -> None:
    cluster = Cluster(k8s)
    async with start_relay() as one, start_relay() as two:
        ports = {r: urlsplit(r.internal_url).port for r in (one, two)}
        # The headless Service's slice names a port "internal"; both relays listen on 127.0.0.1
        # but on different ports, so each gets its own slice here.
        def endpoint_slice(name: str, port: int | None, service: str = "vncgate-relay",
                           terminating: bool = False) -> dict[str, Any]:
            return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"namespace": "vncgate", "name": name,
                                 "labels": {"kubernetes.io/service-name": service}},
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": 8080}, {"name": "internal", "port": port}],
                    "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {
                        "ready": False, "serving": False, "terminating": terminating}}]}

        await cluster.create(SLICES, endpoint_slice("relay-a", ports[one]))
        # Another Service's slice in the same namespace is not a relay.
        await cluster.create(SLICES, endpoint_slice("other", ports[two], service="other"))
        config = operator_settings(relay_service=("vncgate", "vncgate-relay"))
        async with running_operator(k8s, config):
            await cluster.create(TARGETS, address_target("desk-1", xvnc))
            await eventually(lambda: one.registry.get("lab", "desk-1"), "route on replica one")
            assert two.registry.get("lab", "desk-1") is None

            # A new replica appears (not ready yet): it is filled at once, not at a resync.
            await cluster.create(SLICES, endpoint_slice("relay-b", ports[two]))
            await eventually(lambda: two.registry.get("lab", "desk-1"), "route on replica two",
                             timeout=3)


async def test_a_relay_that_starts_after_the_operator_gets_its_table_and_targets_turn_ready(
        k8s: Any, xvnc: XvncServer) -> None:
    """The operator starts before the relay listens (a fresh install: every pod at once). The
    first table goes out once the relay answers, and the target turns Ready then, also when
    its probe was in flight at that moment: not at its next look, a probe interval later."""
    cluster = Cluster(k8s)
    port = free_port()
    events: list[str] = []
    probing, table_taken = asyncio.Event(), asyncio.Event()

    async def prober(host: str, port: int, timeout: float) -> ProbeResult:
        """The real probe; the first one is still in flight when the relay takes its table."""
        events.append("probe")
        if not table_taken.is_set():
            probing.set()
            await table_taken.wait()
        return await probe_rfb(host, port, timeout)

    # A probe interval of a minute: a target that waited for its next look would still be
    # Pending at the end of the wait below.
    config = operator_settings(relay_urls=(f"http://127.0.0.1:{port}",), probe_interval=60.0)
    async with running_operator(k8s, config, prober=prober):
        await cluster.create(TARGETS, address_target("desk-1", xvnc))
        await asyncio.wait_for(probing.wait(), 30)  # the relay has not answered yet
        assert cluster.status("lab", "desk-1").get("phase") in (None, "Pending")
        async with start_relay(internal_port=port) as relay:
            await eventually(lambda: relay.registry.get("lab", "desk-1"),
                             "the first table on the relay")
            events.append("table")
            table_taken.set()
            await eventually(lambda: cluster.status("lab", "desk-1").get("phase") == "Ready",
                             "desk-1 Ready", timeout=30)
            events.append("ready")
    assert events == ["probe", "table", "ready"], events  # Ready without a second probe


async def test_operator_restart_resumes_without_redoing_work(
        k8s: Any, relay: RelayServer, xvnc: XvncServer, monkeypatch: Any) -> None:
    cluster = Cluster(k8s)
    config = operator_settings(relay_urls=(relay.internal_url,), probe_interval=60.0)
    async with running_operator(k8s, config) as runtime:
        for name in ("desk-1", "desk-2"):
            await cluster.create(TARGETS, address_target(name, xvnc))
        for name in ("desk-1", "desk-2"):
            await eventually(lambda n=name: cluster.status("lab", n).get("phase") == "Ready",
                             f"{name} Ready")
        # Nothing left to do (the next look is a probe a minute away): what the second run
        # writes is then work it redid, not work this one had not finished.
        await eventually(lambda: settled(runtime), "the first run settled")
    # Taken with the operator stopped: no write of the first run can land after it.
    before = {n: cluster.versions(TARGETS, "lab", n) for n in ("desk-1", "desk-2")}
    revision = relay.registry.revision

    # Every write to the relay's table, also one that changes nothing (a re-sent route).
    writes: list[str] = []
    for method in ("put", "delete", "replace"):
        original = getattr(relay.registry, method)
        def counting(*args: Any, _original: Any = original, _name: str = method) -> Any:
            writes.append(_name)
            return _original(*args)
        monkeypatch.setattr(relay.registry, method, counting)
    changed: list[str] = []  # routes the relay held that were changed or removed
    relay.registry.add_listener(lambda old, _new: changed.append(old.key))

    async with running_operator(k8s, config) as runtime:
        # The listing's handlers have run, the relay had a full resync (which found its table
        # complete) and the re-evaluation that follows it is done: had the restart redone any
        # work, it would be done by now.
        await eventually(lambda: settled(runtime) and all(
            f"lab/{n}" in runtime.scheduler for n in ("desk-1", "desk-2")),
            "the second run resumed and settled")
        assert writes == [], f"resume must not re-send routes the relay holds: {writes}"
        # A change after the restart is still handled: the operator is live, not idle. (Its
        # own PUT or a full resync that runs first may carry it.)
        await cluster.create(TARGETS, address_target("desk-3", xvnc))
        await eventually(lambda: relay.registry.get("lab", "desk-3"), "new target registered")
    after = {n: cluster.versions(TARGETS, "lab", n) for n in ("desk-1", "desk-2")}
    assert after == before, "resume must not rewrite unchanged status"
    assert changed == [], f"routes the relay held were changed: {changed}"
    assert relay.registry.revision != revision  # desk-3 only
