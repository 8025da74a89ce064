"""The VncTarget spec parser both planes share."""

from __future__ import annotations

import json
from typing import Any

import pytest

from vncgate.common.addresses import Address
from vncgate.common.spec import (
    Interactive,
    ServiceRef,
    SessionMode,
    SpecError,
    Takeover,
    VncTargetSpec,
    check_host,
    parse_sessions,
    parse_spec,
)


def test_address_spec() -> None:
    spec = parse_spec({"endpoint": {"address": {"host": "BMC1.Lab.example.", "port": 5901}},
                       "displayName": "BMC", "viewOnly": True})
    assert spec == VncTargetSpec(Address("bmc1.lab.example", 5901), "BMC", True)


def test_service_spec_with_port_name_and_number() -> None:
    assert parse_spec({"endpoint": {"service": {"name": "desk", "port": "vnc"}}}).endpoint == \
        ServiceRef("desk", "vnc")
    assert parse_spec({"endpoint": {"service": {"name": "desk", "port": 5900}}}).endpoint == \
        ServiceRef("desk", 5900)


@pytest.mark.parametrize(("spec", "field", "words"), [
    ({}, "spec.endpoint", "must be a mapping"),
    ({"endpoint": {}}, "spec.endpoint", "exactly one"),
    ({"endpoint": {"service": {"name": "a", "port": 1}, "address": {"host": "h", "port": 1}}},
     "spec.endpoint", "exactly one"),
    ({"endpoint": {"address": {"host": "h", "port": 0}}}, "spec.endpoint.address.port", "1-65535"),
    ({"endpoint": {"address": {"host": "h", "port": True}}}, "spec.endpoint.address.port", ""),
    ({"endpoint": {"address": {"host": "h_x", "port": 1}}}, "spec.endpoint.address.host",
     "neither"),
    ({"endpoint": {"address": {"host": "h", "port": 1, "tls": True}}},
     "spec.endpoint.address.tls", "unknown field"),
    ({"endpoint": {"service": {"name": "Desk", "port": 1}}}, "spec.endpoint.service.name", ""),
    ({"endpoint": {"service": {"name": "d", "port": "VNC!"}}}, "spec.endpoint.service.port",
     "port name"),
    ({"endpoint": {"service": {"name": "d", "port": 1}}, "displayName": 5}, "spec.displayName",
     "string"),
    ({"endpoint": {"service": {"name": "d", "port": 1}}, "viewOnly": "true"}, "spec.viewOnly",
     "true or false"),
    ({"endpoint": {"service": {"name": "d", "port": 1}}, "recording": {"on": True}},
     "spec.recording.on", "unknown field"),
    ({"endpoint": {"service": {"name": "d", "port": 1}}, "recording": {"enabled": "yes"}},
     "spec.recording.enabled", "true or false"),
    ({"endpoint": {"service": {"name": "d", "port": 1}}, "replay": {}}, "spec.replay",
     "unknown field"),
])
def test_bad_specs_name_the_field(spec: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(SpecError) as raised:
        parse_spec(spec)
    assert raised.value.field == field
    assert words in raised.value.message


@pytest.mark.parametrize(("given", "normal"), [
    ("10.20.0.15", "10.20.0.15"), ("[::1]", "::1"), ("FE80::1", "fe80::1"),
    ("desk-1.lab.svc.cluster.local", "desk-1.lab.svc.cluster.local"),
])
def test_hosts_are_normalised(given: str, normal: str) -> None:
    assert check_host(given, "host") == normal


def test_session_choices_are_enums_whose_wire_form_is_the_manifests_word() -> None:
    policy = parse_sessions({"mode": "exclusive", "takeover": "owner-only",
                             "interactive": "first"})
    assert policy.mode is SessionMode.EXCLUSIVE and policy.exclusive
    assert policy.takeover is Takeover.OWNER_ONLY
    assert policy.interactive is Interactive.FIRST
    wire = json.dumps(policy.to_json())
    assert json.loads(wire) == {"mode": "exclusive", "takeover": "owner-only",
                                "interactive": "first"}
    with pytest.raises(SpecError, match=r"spec.sessions.takeover: 'maybe'; write one of "
                                        r"deny, allow, owner-only"):
        parse_sessions({"takeover": "maybe"})
