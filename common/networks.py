"""CIDRs as flags and variables give them (`--deny-cidr`, `--trusted-proxy`, `--allow-cidr`)."""

from __future__ import annotations

import ipaddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


class NetworkError(ValueError):
    """Not a CIDR; the message names the flag and gives an example."""


def parse_cidr(value: str, flag: str = "CIDR") -> Network:
    """`10.20.0.0/16`, or one address (`10.20.0.15` is /32). A range written in the IPv4-mapped
    form (`::ffff:10.0.0.0/104`) is the IPv4 range: addresses are folded to IPv4 before checks."""
    try:
        network: Network = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError as exc:
        raise NetworkError(f"{flag} {value!r} is not a CIDR such as 10.20.0.0/16: {exc}") from None
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        network = ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def parse_cidrs(values: tuple[str, ...] | list[str], flag: str) -> tuple[Network, ...]:
    return tuple(parse_cidr(value, flag) for value in values)
