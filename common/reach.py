"""The network-reach policy: which namespaces may point an address endpoint at which networks.

Set by the cluster admin (the chart's `addressPolicy.grants`, rendered into a file that the
operator and the relay both read), never by tenants. Each grant names namespaces (names or
globs), and what VncTargets there may name in `spec.endpoint.address`:

    grants:
      - namespaces: [lab-a, "lab-*"]
        cidrs: [10.20.0.0/16]          # addresses written as IPs, and where names must resolve
        hosts: ["*.bmc.lab.example"]   # host names that may be written (globs)
        ports: [5900, "5900-5999"]     # empty or absent: any port

An address written as an IP is granted if it lies in a granted CIDR. A host name is granted if it
matches a granted pattern, and the addresses it resolves to must lie in the same grant's CIDRs:
the admission webhook judges the name as written, the relay judges what it resolves to when it
dials (a name can be rebound). A grant with host names and no CIDRs is refused when the file is
read: write `0.0.0.0/0` and `::/0` to trust DNS for those names on purpose.

Service and KubeVirt endpoints need no grant: the API server already scopes them to the
namespace.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vncgate.common.networks import IPAddress, Network, NetworkError, parse_cidr


class ReachError(ValueError):
    """The grants file is not valid; the message names the entry and what to fix."""


class ReachDenied(ValueError):
    """No grant lets this namespace reach this address; the message says what to ask for."""


def _ip(host: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(host.strip("[]").partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _in(address: IPAddress, networks: Iterable[Network]) -> bool:
    return any(address.version == n.version and address in n for n in networks)


@dataclass(frozen=True, slots=True)
class Grant:
    namespaces: tuple[str, ...]
    cidrs: tuple[Network, ...] = ()
    hosts: tuple[str, ...] = ()
    # Inclusive (first, last) ranges; empty: every port.
    ports: tuple[tuple[int, int], ...] = ()

    def covers_namespace(self, namespace: str) -> bool:
        return any(fnmatch.fnmatchcase(namespace, pattern) for pattern in self.namespaces)

    def covers_port(self, port: int) -> bool:
        return not self.ports or any(first <= port <= last for first, last in self.ports)

    def covers_host(self, host: str) -> bool:
        address = _ip(host)
        if address is not None:
            return _in(address, self.cidrs)
        name = host.rstrip(".").lower()
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.hosts)

    def describe(self) -> str:
        what = [str(n) for n in self.cidrs] + list(self.hosts)
        ports = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in self.ports) or "any"
        return f"{' '.join(what) or 'nothing'} (ports {ports})"


@dataclass(frozen=True, slots=True)
class ReachPolicy:
    """`enforced` False: no grants file was given, every address the address policy allows is
    reachable from every namespace (the behaviour before grants existed)."""

    grants: tuple[Grant, ...] = ()
    enforced: bool = False

    def _matching(self, namespace: str, host: str, port: int) -> list[Grant]:
        return [g for g in self.grants if g.covers_namespace(namespace) and g.covers_port(port)
                and g.covers_host(host)]

    def _refusal(self, namespace: str, what: str) -> ReachDenied:
        mine = [g.describe() for g in self.grants if g.covers_namespace(namespace)]
        granted = "; ".join(mine) if mine else "nothing"
        return ReachDenied(
            f"{what} is outside what namespace {namespace} is granted ({granted}); the "
            "cluster admin grants networks per namespace in the chart's addressPolicy.grants")

    def check(self, namespace: str, host: str, port: int) -> None:
        """Raise `ReachDenied` unless a grant lets `namespace` name `host:port` (as written)."""
        if not self.enforced or self._matching(namespace, host, port):
            return
        raise self._refusal(namespace, f"{host}:{port}")

    def check_resolved(self, namespace: str, host: str, port: int,
                       addresses: Iterable[str]) -> None:
        """At dial time: every address `host` resolved to lies in the CIDRs of a grant that
        lets this namespace name `host:port`."""
        if not self.enforced:
            return
        grants = self._matching(namespace, host, port)
        if not grants:
            raise self._refusal(namespace, f"{host}:{port}")
        for text in addresses:
            address = _ip(text)
            if address is None or not any(_in(address, g.cidrs) for g in grants):
                # Short first: this becomes a WebSocket close reason (123 bytes).
                raise ReachDenied(f"{host} now resolves to {text}, outside the network grant "
                                  f"of namespace {namespace}")


def _ports(value: object, where: str) -> tuple[tuple[int, int], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ReachError(f"{where}.ports must be a list such as [5900, \"5900-5999\"]")
    ranges: list[tuple[int, int]] = []
    for item in value:
        text = str(item).strip()
        first, _, last = text.partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ReachError(f"{where}.ports: {item!r} is not a port or a range such as 5900-5999")
        low, high = int(first), int(last or first)
        if not 1 <= low <= high <= 65535:
            raise ReachError(f"{where}.ports: {item!r} is not within 1-65535, low to high")
        ranges.append((low, high))
    return tuple(ranges)


def _strings(value: object, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ReachError(f"{where} must be a list of non-empty strings")
    return tuple(v.strip() for v in value)


def parse_grants(document: object) -> ReachPolicy:
    """The policy from the parsed file: `{grants: [...]}` (an empty list grants nothing)."""
    if not isinstance(document, Mapping) or set(document) - {"grants"}:
        raise ReachError("the address grants file must be a mapping with one key, grants")
    items: Any = document.get("grants") or []
    if not isinstance(items, list):
        raise ReachError("grants must be a list")
    grants: list[Grant] = []
    for index, item in enumerate(items):
        where = f"grants[{index}]"
        if not isinstance(item, Mapping):
            raise ReachError(f"{where} must be a mapping")
        unknown = set(item) - {"namespaces", "cidrs", "hosts", "ports"}
        if unknown:
            raise ReachError(f"{where}: unknown keys {sorted(unknown)}; use namespaces, cidrs, "
                             "hosts, ports")
        namespaces = _strings(item.get("namespaces"), f"{where}.namespaces")
        if not namespaces:
            raise ReachError(f"{where}.namespaces is empty: name the namespaces it grants to")
        try:
            cidrs = tuple(parse_cidr(c, f"{where}.cidrs")
                          for c in _strings(item.get("cidrs"), f"{where}.cidrs"))
        except NetworkError as exc:
            raise ReachError(str(exc)) from None
        hosts = tuple(h.rstrip(".").lower() for h in _strings(item.get("hosts"),
                                                             f"{where}.hosts"))
        if hosts and not cidrs:
            raise ReachError(
                f"{where} grants host names but no cidrs for them to resolve into; add the "
                "networks they live in (0.0.0.0/0 and ::/0 trust DNS for them)")
        grants.append(Grant(namespaces, cidrs, hosts, _ports(item.get("ports"),
                                                             where)))
    return ReachPolicy(tuple(grants), enforced=True)


def load_grants(path: str | Path) -> ReachPolicy:
    """Read the grants file (YAML or JSON); a missing or invalid file raises with its path."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        document = yaml.safe_load(text) if text.strip() else {}
    except (OSError, yaml.YAMLError) as exc:
        raise ReachError(f"address grants file {path}: {exc}") from None
    try:
        return parse_grants(document if document is not None else {})
    except ValueError as exc:
        raise ReachError(f"address grants file {path}: {exc}") from None
