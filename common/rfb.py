"""The RFB greeting: the server's 12-byte ProtocolVersion, read by the relay and the probe.

In RFB the server speaks first with `RFB xxx.yyy\\n` (RFC 6143, 7.1.1). Reading it before
forwarding a single byte keeps the relay from being a tunnel into non-VNC services; the operator's
probe reads it to tell a VNC server from anything else listening on the port.
"""

from __future__ import annotations

import re

GREETING_LENGTH = 12
_GREETING = re.compile(rb"^RFB (\d{3})\.(\d{3})\n$")


def parse_version(data: bytes) -> tuple[int, int] | None:
    """`b"RFB 003.008\\n"` -> `(3, 8)`; anything else -> None."""
    match = _GREETING.match(data) if len(data) == GREETING_LENGTH else None
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def parse_greeting(data: bytes) -> str | None:
    """`b"RFB 003.008\\n"` -> `"RFB 003.008"`; anything else -> None."""
    if parse_version(data) is None:
        return None
    return data[:-1].decode("ascii")
