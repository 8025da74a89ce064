from __future__ import annotations

from typing import Any

import pytest

from vncgate.common.model import route_from_json
from vncgate.common.networks import parse_cidr
from vncgate.common.reach import parse_grants
from vncgate.common.spec import ServiceRef
from vncgate.operator.policy import AddressPolicy
from vncgate.operator.resolve import (
    ServiceInfo,
    TargetInvalid,
    evaluate,
    parse_target_spec,
    resolve_route,
    service_info,
)

DEFAULT = AddressPolicy()


def svc(ports: list[dict[str, Any]], **spec: Any) -> ServiceInfo:
    return service_info({"metadata": {"namespace": "lab", "name": "desk"},
                         "spec": {"ports": ports, **spec}})


def resolve(spec: dict[str, Any], service: ServiceInfo | None = None,
            policy: AddressPolicy = DEFAULT) -> Any:
    return resolve_route("lab", "desk-1", parse_target_spec(spec), service, policy,
                         "cluster.local")


def test_address_route() -> None:
    route = resolve({"endpoint": {"address": {"host": "10.20.0.15", "port": 5900}},
                     "displayName": "BMC", "viewOnly": True})
    assert (route.key, route.host, route.port, route.display_name, route.view_only) == (
        "lab/desk-1", "10.20.0.15", 5900, "BMC", True)


@pytest.mark.parametrize(("port", "expected"), [(5900, 5900), ("vnc", 5900), (6080, 6080)])
def test_service_port_by_number_or_name(port: int | str, expected: int) -> None:
    service = svc([{"name": "vnc", "port": 5900, "targetPort": 5901},
                   {"name": "novnc", "port": 6080}])
    route = resolve({"endpoint": {"service": {"name": "desk", "port": port}}}, service)
    assert (route.host, route.port) == ("desk.lab.svc.cluster.local", expected)


def test_missing_service_says_what_to_fix() -> None:
    with pytest.raises(TargetInvalid) as exc:
        resolve({"endpoint": {"service": {"name": "desk", "port": "vnc"}}}, None)
    assert exc.value.reason == "ServiceNotFound"
    assert "Service lab/desk does not exist" in exc.value.message
    assert "spec.endpoint.service.name" in exc.value.message


def test_missing_port_lists_the_ports() -> None:
    service = svc([{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}])
    with pytest.raises(TargetInvalid) as exc:
        resolve({"endpoint": {"service": {"name": "desk", "port": "vnc"}}}, service)
    assert exc.value.reason == "ServicePortNotFound"
    assert "no TCP a port named 'vnc'" in exc.value.message
    assert "http=80" in exc.value.message and "dns" not in exc.value.message


def test_udp_port_does_not_count() -> None:
    service = svc([{"name": "vnc", "port": 5900, "protocol": "UDP"}])
    with pytest.raises(TargetInvalid, match="no TCP port 5900"):
        resolve({"endpoint": {"service": {"name": "desk", "port": 5900}}}, service)


def test_headless_service_dials_the_target_port() -> None:
    service = svc([{"name": "vnc", "port": 5900, "targetPort": 5901}], clusterIP="None")
    assert resolve({"endpoint": {"service": {"name": "desk", "port": "vnc"}}}, service).port == 5901
    named = svc([{"name": "vnc", "port": 5900, "targetPort": "rfb"}], clusterIP="None")
    with pytest.raises(TargetInvalid) as exc:
        resolve({"endpoint": {"service": {"name": "desk", "port": "vnc"}}}, named)
    assert exc.value.reason == "UnsupportedService"


def test_external_name_service_is_held_to_the_address_policy() -> None:
    service = svc([{"name": "vnc", "port": 5900}], type="ExternalName",
                  externalName="metadata.google.internal")
    with pytest.raises(TargetInvalid) as exc:
        resolve({"endpoint": {"service": {"name": "desk", "port": 5900}}}, service)
    assert exc.value.reason == "AddressDenied"
    assert "ExternalName" in exc.value.message


def test_denied_address() -> None:
    with pytest.raises(TargetInvalid) as exc:
        resolve({"endpoint": {"address": {"host": "127.0.0.1", "port": 5901}}})
    assert exc.value.reason == "AddressDenied"
    assert exc.value.message.startswith("spec.endpoint.address.host: 127.0.0.1 is in 127.0.0.0/8")
    allowed = AddressPolicy(allow_cidrs=(parse_cidr("127.0.0.1"),))
    assert resolve({"endpoint": {"address": {"host": "127.0.0.1", "port": 5901}}},
                   policy=allowed).port == 5901


def test_bad_spec_is_invalid_spec() -> None:
    with pytest.raises(TargetInvalid) as exc:
        parse_target_spec({"endpoint": {"service": {"name": "a", "port": 1},
                                        "address": {"host": "h", "port": 1}}})
    assert exc.value.reason == "InvalidSpec"
    assert "exactly one" in exc.value.message
    assert isinstance(parse_target_spec({"endpoint": {"service": {"name": "a", "port": "vnc"}}}
                                        ).endpoint, ServiceRef)


def test_evaluate_reports_endpoint_text() -> None:
    lookup = {("lab", "desk"): svc([{"name": "vnc", "port": 5900}])}
    endpoint, _route = evaluate("lab", "t", {"endpoint": {"service": {"name": "desk",
                                                                       "port": "vnc"}}},
                               lambda ns, n: lookup.get((ns, n)), DEFAULT, "cluster.local")
    assert endpoint == "desk.lab.svc.cluster.local:5900"
    endpoint, invalid = evaluate("lab", "t", {"endpoint": {"service": {"name": "gone",
                                                                         "port": "vnc"}}},
                                 lambda ns, n: None, DEFAULT, "cluster.local")
    assert endpoint == "service/gone:vnc" and isinstance(invalid, TargetInvalid)
    endpoint, invalid = evaluate("lab", "t", {"endpoint": {}}, lambda ns, n: None, DEFAULT,
                                 "cluster.local")
    assert endpoint == "" and isinstance(invalid, TargetInvalid)


def test_service_info_tolerates_odd_bodies() -> None:
    info = service_info({"metadata": {"name": "x", "namespace": "y"},
                         "spec": {"ports": [{"name": "a"}, "junk", {"port": 1}]}})
    assert [p.port for p in info.ports] == [1]
    assert info.type == "ClusterIP" and not info.headless


GRANTS = parse_grants({"grants": [{"namespaces": ["lab"], "cidrs": ["10.20.0.0/16"],
                                   "hosts": ["*.bmc.lab.example"], "ports": [5900]}]})


def test_network_grants_hold_addresses_and_external_names_not_services() -> None:
    def route(spec: dict[str, Any], service: ServiceInfo | None = None) -> Any:
        return resolve_route("lab", "desk-1", parse_target_spec(spec), service, DEFAULT,
                             "cluster.local", GRANTS)

    granted = route({"endpoint": {"address": {"host": "10.20.0.15", "port": 5900}}})
    assert not granted.service
    with pytest.raises(TargetInvalid) as exc:
        route({"endpoint": {"address": {"host": "10.30.0.15", "port": 5900}}})
    assert exc.value.reason == "AddressNotGranted"
    assert "10.30.0.15:5900 is outside what namespace lab is granted" in exc.value.message
    # A Service's own name needs no grant, and the relay is told so.
    plain = route({"endpoint": {"service": {"name": "desk", "port": 5900}}},
                  svc([{"name": "vnc", "port": 5900}]))
    assert plain.service and plain.host == "desk.lab.svc.cluster.local"
    assert route_from_json(plain.to_json()).service
    # An ExternalName is an alias for an address: granted by its name, dialled by it.
    alias = route({"endpoint": {"service": {"name": "desk", "port": 5900}}},
                  svc([{"name": "vnc", "port": 5900}], type="ExternalName",
                      externalName="bmc1.bmc.lab.example"))
    assert (alias.host, alias.service) == ("bmc1.bmc.lab.example", False)
    with pytest.raises(TargetInvalid) as exc:
        route({"endpoint": {"service": {"name": "desk", "port": 5900}}},
              svc([{"name": "vnc", "port": 5900}], type="ExternalName",
                  externalName="db.corp.example"))
    assert exc.value.reason == "AddressNotGranted" and "ExternalName" in exc.value.message
