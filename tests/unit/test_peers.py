"""Which EndpointSlices name the relay's peers (each peer is sent the registration token).

The real API server's part (the chart's Service, the relay account's RBAC, the slices as
written) is tests/cluster/test_kubectl_vnc.py::test_peers_are_found_in_the_headless_services_slices.
"""

from __future__ import annotations

from typing import Any

import pytest

from vncgate.relay.session.peers import made_for_service, peer_urls_from_slice

SERVICE = "vncgate-relay-headless"


def owner(**changes: Any) -> dict[str, Any]:
    """The owner reference the EndpointSlice controller writes, with `changes`."""
    return {"apiVersion": "v1", "kind": "Service", "name": SERVICE,
            "uid": "6f1c9c1e-0000-4000-8000-000000000001", "controller": True,
            "blockOwnerDeletion": True, **changes}


def endpoint_slice(*owners: dict[str, Any]) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": f"{SERVICE}-x1",
                                "labels": {"kubernetes.io/service-name": SERVICE}}
    if owners:
        metadata["ownerReferences"] = list(owners)
    return {"metadata": metadata, "addressType": "IPv4",
            "ports": [{"name": "internal", "port": 8081}],
            "endpoints": [{"addresses": ["192.0.2.10"],
                           "targetRef": {"kind": "Pod", "name": "relay-0"}}]}


def test_a_slice_the_service_controls_names_peers() -> None:
    assert made_for_service(endpoint_slice(owner()), SERVICE)
    # Another, non-controlling owner beside the Service changes nothing.
    assert made_for_service(endpoint_slice(
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "u"}, owner()), SERVICE)


@pytest.mark.parametrize("owners", [
    (),  # only the service-name label, as anyone who may create EndpointSlices can write
    (owner(controller=False),),  # owned but not controlled: not the EndpointSlice controller's
    (owner(controller=None),),
    (owner(name="vncgate-relay"),),  # another Service of the namespace
    (owner(kind="Deployment", apiVersion="apps/v1"),),
    (owner(apiVersion="v2"),),
], ids=["label-only", "not-controller", "controller-missing", "other-service", "other-kind",
        "other-api"])
def test_a_slice_the_service_does_not_control_names_no_peer(owners: tuple[dict[str, Any], ...]
                                                            ) -> None:
    assert not made_for_service(endpoint_slice(*owners), SERVICE)


def test_metadata_missing_or_empty_is_no_peer() -> None:
    assert not made_for_service({}, SERVICE)
    assert not made_for_service({"metadata": None}, SERVICE)
    assert not made_for_service({"metadata": {"ownerReferences": None}}, SERVICE)


def test_only_pods_other_than_this_one_are_peers() -> None:
    body = endpoint_slice(owner())
    body["endpoints"] = [
        {"addresses": ["192.0.2.10"], "targetRef": {"kind": "Pod", "name": "relay-0"}},
        {"addresses": ["192.0.2.11"], "targetRef": {"kind": "Pod", "name": "relay-1"}},
        # Not a pod of the chart's Deployment: no targetRef, or another kind.
        {"addresses": ["192.0.2.66"]},
        {"addresses": ["192.0.2.67"], "targetRef": {"kind": "Node", "name": "relay-2"}},
        {"addresses": ["192.0.2.12"], "conditions": {"terminating": True},
         "targetRef": {"kind": "Pod", "name": "relay-3"}},
    ]
    assert peer_urls_from_slice(body, "relay-0") == ["http://192.0.2.11:8081"]
