from __future__ import annotations

from typing import Any

from vncgate.operator.relayendpoints import relay_urls_from_slice, union_urls


def endpoint_slice(addresses: list[tuple[str, dict[str, Any]]], ports: list[dict[str, Any]],
                   address_type: str = "IPv4") -> dict[str, Any]:
    return {"addressType": address_type, "ports": ports,
            "endpoints": [{"addresses": [a], "conditions": c} for a, c in addresses]}


def test_ready_and_not_ready_replicas_on_the_internal_port() -> None:
    body = endpoint_slice(
        [("10.1.0.5", {"ready": True}), ("10.1.0.6", {"ready": False}),
         ("10.1.0.7", {"ready": False, "terminating": True})],
        [{"name": "http", "port": 8080}, {"name": "internal", "port": 9081}])
    assert relay_urls_from_slice(body, 8081) == ("http://10.1.0.5:9081", "http://10.1.0.6:9081")


def test_default_port_and_ipv6() -> None:
    body = endpoint_slice([("fd00::5", {})], [{"name": "http", "port": 8080}], "IPv6")
    assert relay_urls_from_slice(body, 8081) == ("http://[fd00::5]:8081",)


def test_fqdn_and_empty_slices() -> None:
    assert relay_urls_from_slice(endpoint_slice([("a.example", {})], [], "FQDN"), 8081) == ()
    assert relay_urls_from_slice({"addressType": "IPv4", "endpoints": None}, 8081) == ()


def test_union() -> None:
    assert union_urls([("a", "b"), ("b", "c"), ()]) == frozenset({"a", "b", "c"})
