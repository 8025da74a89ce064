"""VncTarget status: phase and conditions from what the operator observed, patched only on change.

Conditions have the Kubernetes shape (type, status, reason, message, lastTransitionTime,
observedGeneration). `lastTransitionTime` moves only when a condition's status flips, so a status
that did not change produces no patch: writes grow with changes, never with time.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vncgate.operator.probe import ProbeResult
from vncgate.operator.resolve import TargetInvalid

PENDING, READY, UNREACHABLE, INVALID = "Pending", "Ready", "Unreachable", "Invalid"
REGISTERED, REACHABLE, READY_CONDITION = "Registered", "Reachable", "Ready"
# Only for targets with spec.tls: whether the relay checks the server's certificate.
TLS_VERIFIED = "TLSVerified"
# Only for endpoint.kubevirt targets, once a relay reported a session's attempt: whether
# KubeVirt gave the relay the VM's console or kept it for another client (preserveSession).
CONSOLE_AVAILABLE = "ConsoleAvailable"
CONDITION_TYPES = (REGISTERED, REACHABLE, READY_CONDITION, TLS_VERIFIED, CONSOLE_AVAILABLE)


@dataclass(frozen=True, slots=True)
class Registration:
    """Where a route stands on the relays, as the operator last saw it."""

    ok: bool
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Observation:
    """What one reconciliation saw. None means "not looked at this time": keep what status says."""

    endpoint: str
    invalid: TargetInvalid | None = None
    registration: Registration | None = None
    probe: ProbeResult | None = None
    sessions: int | None = None
    viewers: str | None = None
    # spec.tls: None without it; else whether the server's certificate is verified (False:
    # insecureSkipVerify, a warning condition that leaves the phase as it is).
    tls_verified: bool | None = None
    # endpoint.kubevirt: (ok, reason, message) of ConsoleAvailable, a condition that leaves the
    # phase as it is (the VM runs; its console is busy); None: no such condition.
    console: tuple[bool | None, str, str] | None = None


def tls_condition(verified: bool) -> tuple[bool, str, str]:
    if verified:
        return (True, "CertificateVerified",
                "the relay checks the server's certificate (spec.tls: CA and server name) at "
                "every session")
    return (False, "InsecureSkipVerify",
            "spec.tls.insecureSkipVerify is set: the relay encrypts but does not check the "
            "server's identity, so anyone who can intercept the connection can pose as the "
            "server and read the credential; give spec.tls a CA (caSecret or caConfigMap) "
            "instead")


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(type_: str, ok: bool | None, reason: str, message: str,
               previous: Mapping[str, Any] | None, generation: int | None,
               now: str) -> dict[str, Any]:
    status = "Unknown" if ok is None else "True" if ok else "False"
    changed = previous is None or previous.get("status") != status
    condition: dict[str, Any] = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now if changed or not previous
        else previous.get("lastTransitionTime", now),
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def _previous(status: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    found: dict[str, Mapping[str, Any]] = {}
    for item in status.get("conditions") or ():
        if isinstance(item, Mapping) and isinstance(item.get("type"), str):
            found[item["type"]] = item
    return found


def _kept(previous: Mapping[str, Any] | None) -> tuple[bool | None, str, str]:
    """A condition that was not observed this time: what status already said, or Unknown."""
    if previous is None:
        return None, "NotChecked", "not checked yet"
    value = {"True": True, "False": False}.get(str(previous.get("status")))
    return value, str(previous.get("reason") or "NotChecked"), str(previous.get("message") or "")


def kept_condition(current: Mapping[str, Any] | None,
                   type_: str) -> tuple[bool | None, str, str] | None:
    """A condition as status has it (for one that was not observed this time), or None."""
    previous = _previous(current or {}).get(type_)
    return None if previous is None else _kept(previous)


def build_status(current: Mapping[str, Any] | None, obs: Observation, *,
                 generation: int | None, url: str | None, now: str) -> dict[str, Any]:
    """The whole desired status. Fields the observation did not cover keep their current value."""
    current = current or {}
    previous = _previous(current)
    status: dict[str, Any] = {"endpoint": obs.endpoint, "url": url}
    if generation is not None:
        status["observedGeneration"] = generation

    registered: tuple[bool | None, str, str]
    if obs.invalid is not None:
        reason, message = obs.invalid.reason, obs.invalid.message
        registered = (False, reason, f"not registered: {message}")
        reachable: tuple[bool | None, str, str] = (None, "NotChecked",
                                                   "not probed while the spec is invalid")
        status["serverVersion"] = None
    else:
        registered = ((obs.registration.ok, obs.registration.reason, obs.registration.message)
                      if obs.registration is not None else _kept(previous.get(REGISTERED)))
        if obs.probe is not None:
            reachable = (obs.probe.ok, obs.probe.reason, obs.probe.message)
            status["serverVersion"] = obs.probe.server_version
        else:
            reachable = _kept(previous.get(REACHABLE))
            status["serverVersion"] = current.get("serverVersion")
    status["activeSessions"] = (obs.sessions if obs.sessions is not None
                                else current.get("activeSessions", 0))
    status["viewers"] = (obs.viewers if obs.viewers is not None
                         else current.get("viewers", ""))

    if obs.invalid is not None:
        phase, ready = INVALID, (False, obs.invalid.reason, obs.invalid.message)
    elif reachable[0] is False:
        # Including a server that refuses this address (probe reason Blacklisted or
        # ServerRefused): its greeting proves a server is there, but viewers coming from the
        # same address are refused as well, so it is never Ready. The route stays registered.
        phase, ready = UNREACHABLE, (False, reachable[1], reachable[2])
    elif registered[0] is not True:
        not_registered = registered[1] if registered[0] is False else "NotRegistered"
        phase, ready = PENDING, (False, not_registered, registered[2])
    elif reachable[0] is None:
        phase, ready = PENDING, (False, "NotProbed", "waiting for the first probe")
    else:
        phase, ready = READY, (True, "Ready", "registered with the relays and the VNC server "
                                              "answers")
    status["phase"] = phase
    status["conditions"] = [
        _condition(REGISTERED, *registered, previous.get(REGISTERED), generation, now),
        _condition(REACHABLE, *reachable, previous.get(REACHABLE), generation, now),
        _condition(READY_CONDITION, *ready, previous.get(READY_CONDITION), generation, now),
    ]
    if obs.invalid is None and obs.tls_verified is not None:
        status["conditions"].append(_condition(TLS_VERIFIED, *tls_condition(obs.tls_verified),
                                               previous.get(TLS_VERIFIED), generation, now))
    if obs.invalid is None and obs.console is not None:
        status["conditions"].append(_condition(CONSOLE_AVAILABLE, *obs.console,
                                               previous.get(CONSOLE_AVAILABLE), generation, now))
    return status


def status_changes(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch from `current` to `desired`: changed fields only, None removes a field.

    Conditions are patched as a whole list, since a merge patch replaces lists; build_status
    keeps each `lastTransitionTime` until that condition's status flips, so equal is equal.
    """
    current = current or {}
    changes: dict[str, Any] = {}
    for key, value in desired.items():
        old = current.get(key)
        if key == "conditions":
            if _plain(old) != _plain(value):
                changes[key] = value
        elif value is None:
            if old is not None:
                changes[key] = None
        elif _plain(old) != value:
            changes[key] = value
    return changes


def _plain(value: Any) -> Any:
    """A JSON-like copy (kopf hands out read-only mapping views, which never equal dicts)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_plain(v) for v in value]
    return value


def phase_of(status: Mapping[str, Any] | None) -> str | None:
    value = (status or {}).get("phase")
    return value if isinstance(value, str) else None


def ready_message(status: Mapping[str, Any]) -> str:
    for condition in status.get("conditions") or ():
        if condition.get("type") == READY_CONDITION:
            return str(condition.get("message") or "")
    return ""


def now_precise() -> str:
    """RFC 3339 with microseconds: the time of a phase transition, part of its Event's name."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class Transition:
    """A phase change as status records it (`status.phaseTransition`) and its Event tells it."""

    old: str
    new: str
    at: str
    reason: str
    message: str

    @property
    def warning(self) -> bool:
        return not (self.new == READY or (self.new == PENDING and self.old == NEW))


NEW = "New"


def record_transition(current: Mapping[str, Any] | None, desired: dict[str, Any],
                      at: str) -> Transition | None:
    """If the phase changes, write the transition into `desired` and return it."""
    old, new = phase_of(current) or NEW, str(desired["phase"])
    if old == new:
        return None
    desired["phaseTransition"] = {"from": old, "time": at}
    return transition_of(desired)


def transition_of(status: Mapping[str, Any] | None) -> Transition | None:
    """The last transition that `status` records, with the Event's reason and message."""
    status = status or {}
    recorded = status.get("phaseTransition")
    phase = phase_of(status)
    if not isinstance(recorded, Mapping) or phase is None:
        return None
    reason = next((str(c.get("reason")) for c in status.get("conditions") or ()
                   if c.get("type") == READY_CONDITION), phase)
    old = str(recorded.get("from") or NEW)
    return Transition(old=old, new=phase, at=str(recorded.get("time") or ""), reason=reason,
                      message=f"{old} -> {phase}: {ready_message(status)}")


def replay_due(status: Mapping[str, Any] | None, window: float) -> Transition | None:
    """The transition whose Event is posted again at start: one recorded within `window`
    seconds (a crash may have come between writing status and posting its Event; posting it
    again is a no-op, as an Event is named after its transition)."""
    recorded = transition_of(status)
    if recorded is None:
        return None
    try:
        at = datetime.datetime.fromisoformat(recorded.at.replace("Z", "+00:00"))
    except ValueError:
        return None
    age = (datetime.datetime.now(datetime.UTC) - at).total_seconds()
    return recorded if age < window else None
