from __future__ import annotations

import ipaddress

import pytest

from vncgate.common.networks import parse_cidr
from vncgate.operator.policy import AddressDenied, AddressPolicy, parse_host_pattern

DEFAULT = AddressPolicy()


@pytest.mark.parametrize("host", [
    "127.0.0.1", "127.1.2.3", "::1", "[::1]", "::ffff:127.0.0.1", "0.0.0.0", "::",
    "169.254.169.254", "169.254.1.1", "fe80::1", "fd00:ec2::254", "100.100.100.200",
    "224.0.0.1", "localhost", "LOCALHOST.", "foo.localhost", "metadata.google.internal",
    "instance-data",
])
def test_default_policy_refuses_local_and_metadata(host: str) -> None:
    with pytest.raises(AddressDenied, match="default address policy"):
        DEFAULT.check(host)


@pytest.mark.parametrize("host", [
    "10.20.0.15", "192.168.1.10", "2001:db8::15", "bmc1.lab.example", "desk.example.com",
    "8.8.8.8",
])
def test_default_policy_allows_ordinary_hosts(host: str) -> None:
    DEFAULT.check(host)


def test_allow_lists_replace_the_default() -> None:
    policy = AddressPolicy(allow_cidrs=(parse_cidr("10.20.0.0/16"), parse_cidr("127.0.0.1")),
                           allow_hosts=(parse_host_pattern("*.bmc.lab.example"),))
    policy.check("10.20.0.15")
    policy.check("127.0.0.1")  # the admin allowed it explicitly
    policy.check("r3s15.bmc.lab.example")
    with pytest.raises(AddressDenied, match="outside the operator's allowed networks") as exc:
        policy.check("10.30.0.1")
    assert "--allow-cidr" in str(exc.value)
    with pytest.raises(AddressDenied, match="--allow-host"):
        policy.check("desk.example.com")
    with pytest.raises(AddressDenied):
        policy.check("127.0.0.2")


def test_cidr_only_policy_refuses_every_name() -> None:
    policy = AddressPolicy(allow_cidrs=(ipaddress.ip_network("10.0.0.0/8"),))
    with pytest.raises(AddressDenied, match="none"):
        policy.check("bmc1.lab.example")


def test_describe() -> None:
    assert "default" in DEFAULT.describe()
    assert "10.0.0.0/8" in AddressPolicy(allow_cidrs=(parse_cidr("10.0.0.0/8"),)).describe()


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "bmc", "", "10.0.0.300"])
def test_parse_cidr_errors(bad: str) -> None:
    with pytest.raises(ValueError, match="CIDR"):
        parse_cidr(bad)


@pytest.mark.parametrize("bad", ["", "http://x", "a b", "user@host"])
def test_parse_host_pattern_errors(bad: str) -> None:
    with pytest.raises(ValueError, match="host name pattern"):
        parse_host_pattern(bad)
