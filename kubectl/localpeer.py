"""Who is on the other end of a loopback TCP connection: the uid that owns the peer's socket.

`kubectl vnc proxy` hands a console, with the user's own identity, to whatever connects to its
local port. Any process on the machine can connect to 127.0.0.1, so the proxy accepts only
connections whose other end is a socket of the same user. Linux lists every TCP socket of the
network namespace, with the uid that created it, in /proc/net/tcp and /proc/net/tcp6 (readable
by everyone); the peer's socket is the entry whose local address is the connection's remote one
and whose remote address is ours.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

PROC_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
ESTABLISHED = "01"


def can_check() -> bool:
    """Whether this system lists sockets with their owners (Linux)."""
    return all(table.is_file() for table in PROC_TABLES)


def _address(field: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """`0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): each 32-bit word is in the
    kernel's byte order, little-endian here."""
    hex_ip, _, hex_port = field.partition(":")
    raw = bytes.fromhex(hex_ip)
    packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(packed)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, int(hex_port, 16)


def _normal(host: str, port: int) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    ip = ipaddress.ip_address(host.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, port


def peer_uid(ours: tuple[str, int], peer: tuple[str, int]) -> int | None:
    """The uid owning the socket at `peer` connected to `ours`; None if no socket of this
    network namespace is (a peer on another machine, or one gone already)."""
    want_local, want_remote = _normal(*peer[:2]), _normal(*ours[:2])
    for table in PROC_TABLES:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 8 or fields[3] != ESTABLISHED:
                continue
            try:
                if _address(fields[1]) == want_local and _address(fields[2]) == want_remote:
                    return int(fields[7])
            except ValueError:
                continue
    return None
