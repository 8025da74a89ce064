"""Trusted proxies and client addresses: CIDR lists, and one spelling of an address."""

from __future__ import annotations

import ipaddress

from vncgate.common.networks import IPAddress, Network, NetworkError, parse_cidrs
from vncgate.relay.access.identity import AuthConfigError


def parse_networks(values: tuple[str, ...] | list[str], flag: str) -> tuple[Network, ...]:
    """CIDRs (vncgate.common.networks: IPv4-mapped ranges are the IPv4 range, as addresses
    are folded before they are checked, `address_in`)."""
    try:
        return parse_cidrs(values, flag)
    except NetworkError as exc:
        raise AuthConfigError(str(exc)) from None


# Never dialled, whatever --deny-cidr says: "this host" (0.0.0.0 and :: reach the loopback
# on Linux). IPv4-mapped and -compatible IPv6 forms are folded to IPv4 before any check.
UNSPECIFIED_NETWORKS: tuple[Network, ...] = (ipaddress.ip_network("0.0.0.0/8"),
                                             ipaddress.ip_network("::/128"))


def canonical_ip(address: str) -> IPAddress | None:
    """The one spelling of an address that range checks use, or None if it is not one.

    `::ffff:127.0.0.1` (IPv4-mapped) and `::127.0.0.1` (IPv4-compatible, deprecated but still
    routed by some stacks) are 127.0.0.1; a zone (`fe80::1%eth0`) is dropped; `::` and `::1`
    stay IPv6.
    """
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]").partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        packed = ip.packed
        if packed[:12] == bytes(12) and int.from_bytes(packed[12:], "big") > 1:
            return ipaddress.IPv4Address(packed[12:])
    return ip


def address_in(address: str | None, networks: tuple[Network, ...]) -> bool:
    """Whether an address lies in any of the networks, in every spelling of the address."""
    if not address:
        return False
    ip = canonical_ip(address)
    if ip is None:
        return False
    if any(ip.version == n.version and ip in n for n in networks):
        return True
    raw = ipaddress.ip_address(address.strip().strip("[]").partition("%")[0])
    return raw != ip and any(raw.version == n.version and raw in n for n in networks)
