"""The operator end to end: VncTargets in the emulated API, routes in real relays, real Xvnc."""

from __future__ import annotations

from typing import Any

from harness.waiting import eventually
from harness.xvnc import XvncServer
from tests.operator.conftest import (
    PUBLIC_URL,
    SERVICES,
    TARGETS,
    Cluster,
    conditions,
    operator_settings,
    rfb_greeting,
    running_operator,
    service,
    vnc_target,
)
from vncgate.operator.probe import ProbeResult, probe_rfb
from vncgate.operator.settings import OperatorSettings
from vncgate.relay.web.server import RelayServer


def settings_for(*relays: RelayServer, **overrides: Any) -> OperatorSettings:
    return operator_settings(relay_urls=tuple(r.internal_url for r in relays), **overrides)


async def test_address_target_is_served_updated_and_removed(
        k8s: Any, relay: RelayServer, xvnc: XvncServer) -> None:
    cluster = Cluster(k8s)
    async with running_operator(k8s, settings_for(relay)):
        body = vnc_target("lab", "desk-1", {"address": {"host": "127.0.0.1", "port": xvnc.port}},
                          displayName="Desk 1", thumbnail={"enabled": True})
        body["metadata"]["labels"] = {"rack": "r12"}
        await cluster.create(TARGETS, body)

        route = await eventually(lambda: relay.registry.get("lab", "desk-1"), "route registered")
        assert (route.host, route.port, route.display_name) == ("127.0.0.1", xvnc.port, "Desk 1")
        # The console list's: metadata.labels and spec.thumbnail go with the route.
        assert (route.labels, route.thumbnail) == ((("rack", "r12"),), True)
        status = await eventually(
            lambda: (s := cluster.status("lab", "desk-1")).get("phase") == "Ready" and s,
            "phase Ready", context=lambda: cluster.get(TARGETS, "lab", "desk-1"))
        assert status["url"] == f"{PUBLIC_URL}/t/lab/desk-1/"
        assert status["endpoint"] == f"127.0.0.1:{xvnc.port}"
        assert status["serverVersion"].startswith("RFB 003.")
        assert status["observedGeneration"] == 1
        assert status["activeSessions"] == 0
        found = conditions(status)
        assert {t: c["status"] for t, c in found.items()} == {
            "Registered": "True", "Reachable": "True", "Ready": "True"}
        assert all(c["reason"] and c["lastTransitionTime"] for c in found.values())
        greeting, code = await rfb_greeting(relay, "lab", "desk-1")
        assert greeting.startswith(b"RFB "), (greeting, code)
        ready_events = [e for e in cluster.events("lab") if e.get("reason") == "Ready"]
        assert ready_events, "a Ready event for the transition"

        await cluster.patch(TARGETS, "lab", "desk-1", {
            "metadata": {"generation": 2}, "spec": {"displayName": "Desk one", "viewOnly": True}})
        await eventually(lambda: (r := relay.registry.get("lab", "desk-1")) is not None
                         and r.display_name == "Desk one" and r.view_only, "route updated")
        await eventually(lambda: cluster.status("lab", "desk-1").get("observedGeneration") == 2,
                         "observedGeneration 2")

        await cluster.delete(TARGETS, "lab", "desk-1")
        await eventually(lambda: relay.registry.get("lab", "desk-1") is None, "route removed")
        await eventually(lambda: cluster.get(TARGETS, "lab", "desk-1") is None,
                         "object gone (finalizer released)")
        greeting, code = await rfb_greeting(relay, "lab", "desk-1")
        assert (greeting, code) == (b"", 4404)


async def test_denied_address_is_invalid_and_never_registered(
        k8s: Any, relay: RelayServer) -> None:
    cluster = Cluster(k8s)
    # The default policy: loopback and metadata addresses are refused.
    config = settings_for(relay, policy=OperatorSettings().policy)
    async with running_operator(k8s, config) as runtime:
        await cluster.create(TARGETS, vnc_target("lab", "meta", {
            "address": {"host": "169.254.169.254", "port": 5900}}))
        status = await eventually(
            lambda: (s := cluster.status("lab", "meta")).get("phase") == "Invalid" and s,
            "phase Invalid")
        ready = conditions(status)["Ready"]
        assert ready["status"] == "False"
        assert ready["reason"] == "AddressDenied"
        assert "169.254.0.0/16" in ready["message"] and "--allow-cidr" in ready["message"]
        assert "serverVersion" not in status
        await eventually(lambda: [e for e in cluster.events("lab")
                                  if e.get("reason") == "AddressDenied"], "a warning Event")
        assert relay.registry.get("lab", "meta") is None
        # Not retried in a loop: the object stops changing once it is Invalid.
        versions = cluster.versions(TARGETS, "lab", "meta")
        looks = runtime.scheduler.evaluations["lab/meta"]
        await eventually(lambda: runtime.scheduler.evaluations["lab/meta"] >= looks + 2,
                         "two more looks at lab/meta")
        assert cluster.versions(TARGETS, "lab", "meta") == versions
        assert relay.registry.get("lab", "meta") is None


def redirecting_prober(xvnc: XvncServer) -> Any:
    """Probe Service DNS names at the local Xvnc: no DNS query leaves the machine in tests."""
    async def probe(host: str, port: int, timeout: float) -> ProbeResult:
        if host.endswith(".svc.cluster.local"):
            return await probe_rfb("127.0.0.1", xvnc.port, timeout)
        return await probe_rfb(host, port, timeout)
    return probe


async def test_service_with_named_port_resolves(
        k8s: Any, relay: RelayServer, xvnc: XvncServer) -> None:
    cluster = Cluster(k8s)
    await cluster.create(SERVICES, service("lab", "desk-2", [
        {"name": "http", "port": 8080, "protocol": "TCP"},
        {"name": "vnc", "port": 5900, "targetPort": 5901, "protocol": "TCP"}]))
    async with running_operator(k8s, settings_for(relay), prober=redirecting_prober(xvnc)):
        await cluster.create(TARGETS, vnc_target("lab", "desk-2", {
            "service": {"name": "desk-2", "port": "vnc"}}))
        route = await eventually(lambda: relay.registry.get("lab", "desk-2"), "route registered")
        assert (route.host, route.port) == ("desk-2.lab.svc.cluster.local", 5900)
        status = await eventually(
            lambda: (s := cluster.status("lab", "desk-2")).get("phase") == "Ready" and s,
            "phase Ready")
        assert status["endpoint"] == "desk-2.lab.svc.cluster.local:5900"


async def test_missing_service_is_invalid_until_it_appears(
        k8s: Any, relay: RelayServer, xvnc: XvncServer) -> None:
    cluster = Cluster(k8s)
    async with running_operator(k8s, settings_for(relay, probe_interval=30.0),
                                prober=redirecting_prober(xvnc)):
        await cluster.create(TARGETS, vnc_target("lab", "later", {
            "service": {"name": "later", "port": "vnc"}}))
        status = await eventually(
            lambda: (s := cluster.status("lab", "later")).get("phase") == "Invalid" and s,
            "phase Invalid")
        ready = conditions(status)["Ready"]
        assert ready["reason"] == "ServiceNotFound"
        assert "Service lab/later does not exist" in ready["message"]
        assert status["endpoint"] == "service/later:vnc"
        assert relay.registry.get("lab", "later") is None

        # A Service without the named port: still Invalid, now saying which ports there are.
        await cluster.create(SERVICES, service("lab", "later", [{"name": "web", "port": 80}]))
        await eventually(lambda: conditions(cluster.status("lab", "later"))["Ready"]["reason"]
                         == "ServicePortNotFound", "ServicePortNotFound")
        assert "web=80" in conditions(cluster.status("lab", "later"))["Ready"]["message"]

        # The probe interval is 30 s: the Service's change, not the timer, brings it to Ready.
        await cluster.patch(SERVICES, "lab", "later", {"spec": {"ports": [
            {"name": "web", "port": 80}, {"name": "vnc", "port": 5900}]}})
        route = await eventually(lambda: relay.registry.get("lab", "later"), "route registered",
                                 timeout=5)
        assert route.port == 5900
        await eventually(lambda: cluster.status("lab", "later").get("phase") == "Ready",
                         "phase Ready", timeout=5)

        # The Service goes away: the route goes with it.
        await cluster.delete(SERVICES, "lab", "later")
        await eventually(lambda: relay.registry.get("lab", "later") is None, "route removed",
                         timeout=5)
        await eventually(lambda: cluster.status("lab", "later").get("phase") == "Invalid",
                         "phase Invalid again", timeout=5)


async def test_spec_the_schema_would_refuse_is_invalid(k8s: Any, relay: RelayServer) -> None:
    # The emulator does not apply the CRD schema; the operator's own parser still refuses.
    cluster = Cluster(k8s)
    async with running_operator(k8s, settings_for(relay)):
        await cluster.create(TARGETS, vnc_target("lab", "both", {
            "address": {"host": "10.0.0.1", "port": 5900},
            "service": {"name": "desk", "port": 5900}}))
        status = await eventually(
            lambda: (s := cluster.status("lab", "both")).get("phase") == "Invalid" and s,
            "phase Invalid")
        assert conditions(status)["Ready"]["reason"] == "InvalidSpec"
        assert "exactly one of service" in conditions(status)["Ready"]["message"]
        assert relay.registry.get("lab", "both") is None
