"""What this relay has seen of each target's VNC server, for the console list.

The relay never probes on its own: a connection that does not log in counts as a failed login
on TigerVNC and many BMCs (five lock the address out, see the operator's probe), and the list
page must not lock out the consoles it lists. So the status is what the relay's own sessions
(and the thumbnails of consoles that opted in to them) found when they connected: the server
answered (Ready), could not be reached (Unreachable, with why), or refused the relay (Refused:
blacklisted, credential refused). A target nobody opened through this replica since it started
is Unknown; one with open sessions is Ready.

One entry per route, dropped when the route goes or changes its endpoint: O(routes) memory.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from vncgate.relay import closecodes

READY, UNREACHABLE, REFUSED, INVALID, UNKNOWN = (
    "Ready", "Unreachable", "Refused", "Invalid", "Unknown")
PHASES = (READY, UNREACHABLE, REFUSED, INVALID, UNKNOWN)

# RealVNC's "... blacklisted", TigerVNC's "Too many security failures", BMCs' "locked" / "blocked".
_BLOCKED = re.compile(r"too many|blacklist|black-list|blocked|lock(ed)? ?out|locked", re.I)
# The words of the relay's own refusals (relay/session/bridge.py), to a reason a list can show.
_KINDS = (
    ("refused the connection", "ConnectionRefused"),
    ("did not answer", "Timeout"),
    ("did not resolve", "NameNotResolved"),
    ("cannot be resolved", "NameNotResolved"),
    ("not a VNC server", "NotVNC"),
    ("closed the connection before greeting", "ClosedBeforeGreeting"),
    ("cannot reach", "NetworkError"),
)


@dataclass(frozen=True, slots=True)
class Seen:
    """The last outcome of connecting to one target: a phase, a reason word (CamelCase, as in
    Kubernetes conditions), the message the viewer was given, and when (Unix time)."""

    phase: str
    reason: str
    message: str
    at: float


def classify(code: int, message: str) -> tuple[str, str] | None:
    """The (phase, reason) a failed connection says about the target; None when it says
    nothing about the target (the relay's own limits, shutdown, the viewer leaving)."""
    if code == closecodes.CREDENTIAL_REFUSED:
        return REFUSED, "CredentialRefused"
    if _BLOCKED.search(message):
        return REFUSED, "Blacklisted"
    if code == closecodes.UPSTREAM_TIMEOUT:
        return UNREACHABLE, "Timeout"
    if code == closecodes.FORBIDDEN:  # the address it resolves to may not be reached
        return INVALID, "AddressDenied"
    if code == closecodes.BAD_UPSTREAM:
        for words, reason in _KINDS:
            if words in message:
                return UNREACHABLE, reason
        return UNREACHABLE, "ServerError"
    return None


class TargetHealth:
    """The last connection outcome per target key."""

    def __init__(self) -> None:
        self._seen: dict[str, Seen] = {}

    def connected(self, key: str, server_version: str) -> None:
        self._seen[key] = Seen(READY, "Connected", server_version, time.time())

    def failed(self, key: str, code: int, message: str) -> None:
        verdict = classify(code, message)
        if verdict is not None:
            self._seen[key] = Seen(verdict[0], verdict[1], message, time.time())

    def forget(self, key: str) -> None:
        self._seen.pop(key, None)

    def get(self, key: str) -> Seen | None:
        return self._seen.get(key)

    def __len__(self) -> int:
        return len(self._seen)
