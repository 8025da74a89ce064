"""The one piece of the RFB protocol the relay reads: the server's 12-byte ProtocolVersion.

In RFB the server speaks first with `RFB xxx.yyy\\n` (RFC 6143, 7.1.1). Reading it before
forwarding a single byte keeps the relay from being a tunnel into non-VNC services.
"""

from __future__ import annotations

import re

GREETING_LENGTH = 12
_GREETING = re.compile(rb"^RFB \d{3}\.\d{3}\n$")


def parse_greeting(data: bytes) -> str | None:
    """`b"RFB 003.008\\n"` -> `"RFB 003.008"`; anything else -> None."""
    if len(data) != GREETING_LENGTH or not _GREETING.match(data):
        return None
    return data[:-1].decode("ascii")
