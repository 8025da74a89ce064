"""Which `endpoint.address` hosts a VncTarget may name: the address policy.

Whoever can create a VncTarget can make the relay dial the host it names, from inside the
cluster network. By default the operator refuses the addresses that are never a VNC console and
always a way around the network's boundaries: loopback (the relay pod itself), link-local and
the cloud metadata services (instance credentials), and the unspecified address (which Linux
treats as loopback). `--allow-cidr` / `--allow-host` replace that default with an allow-list.

Names are matched as names: the policy cannot know what a DNS name will resolve to when the relay
dials it. Well-known names of the forbidden services are refused by name.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from vncgate.common.networks import IPAddress
from vncgate.common.networks import Network as IPNetwork

# Why each range: the relay must not become a way into itself or into the node's secrets.
DEFAULT_DENIED_NETWORKS: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in (
    "127.0.0.0/8",         # loopback: the relay pod's own ports (its registration API)
    "::1/128",             # loopback, IPv6
    "0.0.0.0/8",           # "this network": connecting to 0.0.0.0 reaches loopback on Linux
    "::/128",              # unspecified, IPv6
    "169.254.0.0/16",      # link-local, including the metadata service 169.254.169.254
    "fe80::/10",           # link-local, IPv6
    "fd00:ec2::254/128",   # AWS metadata service over IPv6
    "100.100.100.200/32",  # Alibaba Cloud metadata service
    "224.0.0.0/4",         # multicast: never a TCP peer
    "ff00::/8",            # multicast, IPv6
    "255.255.255.255/32",  # broadcast
))
DEFAULT_DENIED_HOSTS: tuple[str, ...] = (
    "localhost", "*.localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback",
    "metadata", "metadata.google.internal", "metadata.goog", "instance-data",
    "instance-data.ec2.internal", "metadata.azure.com",
)


class AddressDenied(ValueError):
    """The address policy refuses a host; the message says which rule and what to change."""


def _plain_ip(host: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    # ::ffff:127.0.0.1 is 127.0.0.1 on the wire; judge the IPv4 address it carries.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _match_host(host: str, patterns: Iterable[str]) -> str | None:
    for pattern in patterns:
        if fnmatch.fnmatchcase(host, pattern.lower()):
            return pattern
    return None


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """Empty allow-lists mean the default policy: anything but the denied ranges and names."""

    allow_cidrs: tuple[IPNetwork, ...] = ()
    allow_hosts: tuple[str, ...] = ()

    @property
    def is_default(self) -> bool:
        return not self.allow_cidrs and not self.allow_hosts

    def describe(self) -> str:
        if self.is_default:
            return "default policy (no loopback, link-local, metadata or unspecified addresses)"
        parts = [str(n) for n in self.allow_cidrs] + list(self.allow_hosts)
        return "allow-list " + ", ".join(parts)

    def check(self, host: str) -> None:
        """Raise `AddressDenied` unless the policy lets the relay dial `host`."""
        address = _plain_ip(host)
        name = host.rstrip(".").lower()
        if self.is_default:
            if address is not None:
                for network in DEFAULT_DENIED_NETWORKS:
                    if address.version == network.version and address in network:
                        raise AddressDenied(
                            f"{host} is in {network}, which the default address policy refuses "
                            "(loopback, link-local, cloud metadata and unspecified addresses are "
                            "never VNC consoles); use the console's own address, or have the "
                            "operator started with --allow-cidr for it")
                return
            pattern = _match_host(name, DEFAULT_DENIED_HOSTS)
            if pattern is not None:
                raise AddressDenied(
                    f"{host} names the local host or a cloud metadata service ({pattern}), "
                    "which the default address policy refuses; use the console's own address")
            return
        if address is not None:
            if any(address.version == n.version and address in n for n in self.allow_cidrs):
                return
            raise AddressDenied(
                f"{host} is outside the operator's allowed networks "
                f"({', '.join(str(n) for n in self.allow_cidrs) or 'none'}); ask the cluster "
                "admin to add it with --allow-cidr, or use an address in those networks")
        if _match_host(name, self.allow_hosts) is not None:
            return
        raise AddressDenied(
            f"{host} matches none of the operator's allowed host names "
            f"({', '.join(self.allow_hosts) or 'none'}); ask the cluster admin to add it with "
            "--allow-host, or use an address in the allowed networks")


def parse_host_pattern(value: str) -> str:
    """A host name or a glob over host names: `bmc1.lab.example`, `*.bmc.lab.example`."""
    pattern = value.strip().rstrip(".").lower()
    if not pattern or any(c.isspace() or c in "/:@" for c in pattern):
        raise ValueError(f"{value!r} is not a host name pattern such as *.bmc.lab.example")
    return pattern
