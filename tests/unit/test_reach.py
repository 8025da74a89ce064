"""The network-reach grants file: what it grants, and what it refuses to load."""

from __future__ import annotations

from pathlib import Path

import pytest

from vncgate.common.reach import ReachDenied, ReachError, ReachPolicy, load_grants, parse_grants

GRANTS = {"grants": [{"namespaces": ["lab", "team-*"], "cidrs": ["10.20.0.0/16"],
                      "hosts": ["*.bmc.lab.example"], "ports": [5900, "623-624"]}]}


def test_a_grant_covers_its_namespaces_networks_names_and_ports() -> None:
    policy = parse_grants(GRANTS)
    policy.check("lab", "10.20.0.15", 5900)
    policy.check("team-a", "bmc1.bmc.lab.example", 624)
    policy.check("lab", "::ffff:10.20.0.15", 623)  # an IPv4-mapped spelling is the IPv4 address
    for namespace, host, port in (("other", "10.20.0.15", 5900), ("lab", "10.21.0.1", 5900),
                                  ("lab", "10.20.0.15", 22), ("lab", "evil.example", 5900)):
        with pytest.raises(ReachDenied, match=f"namespace {namespace} is granted"):
            policy.check(namespace, host, port)


def test_a_name_must_resolve_into_its_grant() -> None:
    policy = parse_grants(GRANTS)
    policy.check_resolved("lab", "bmc1.bmc.lab.example", 5900, ["10.20.3.4"])
    with pytest.raises(ReachDenied, match=r"now resolves to 169\.254\.169\.254"):
        policy.check_resolved("lab", "bmc1.bmc.lab.example", 5900, ["10.20.3.4",
                                                                    "169.254.169.254"])


def test_no_file_enforces_nothing_and_an_empty_file_grants_nothing(tmp_path: Path) -> None:
    ReachPolicy().check("any", "192.0.2.1", 1)
    empty = tmp_path / "grants.yaml"
    empty.write_text("grants: []\n")
    with pytest.raises(ReachDenied, match=r"granted \(nothing\)"):
        load_grants(empty).check("lab", "10.20.0.15", 5900)


@pytest.mark.parametrize(("document", "says"), [
    ({"grants": [{"namespaces": ["lab"], "hosts": ["*.example"]}]}, "no cidrs"),
    ({"grants": [{"cidrs": ["10.0.0.0/8"]}]}, "namespaces is empty"),
    ({"grants": [{"namespaces": ["lab"], "cidrs": ["10.0.0.0/33"]}]}, "not a CIDR"),
    ({"grants": [{"namespaces": ["lab"], "cidrs": ["10.0.0.0/8"], "ports": ["90-80"]}]},
     "low to high"),
    ({"grants": [{"namespaces": ["lab"], "network": "10.0.0.0/8"}]}, "unknown keys"),
    ({"rules": []}, "one key, grants"),
])
def test_a_bad_file_says_what_to_fix(document: object, says: str) -> None:
    with pytest.raises(ReachError, match=says):
        parse_grants(document)
