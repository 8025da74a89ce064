"""Durations, one grammar for flags, variables and VncTarget specs: Kubernetes style.

A sequence of a number and a unit, `ms`, `s`, `m`, `h` or `d`: `90s`, `1.5s`, `500ms`, `15m`,
`1h30m`, `1d`. The CRD's pattern for `spec.sessions.idleTimeout`/`maxDuration` is `PATTERN`
(a test keeps them equal). A flag may also give a bare number of seconds (`30`); a spec may not
(the CRD would refuse it).
"""

from __future__ import annotations

import re

_PART = r"[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h|d)"
PATTERN = rf"^({_PART})+$"
_PART_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_WHOLE_RE = re.compile(PATTERN)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_BARE_RE = re.compile(r"^[0-9]+(?:\.[0-9]+)?$")


class DurationError(ValueError):
    """Not a duration; the message gives examples of what to write."""


def parse_duration(value: object, *, bare_seconds: bool = False) -> float:
    """Seconds (> 0) from `90s`, `1h30m`, `1d`, `500ms`; with `bare_seconds`, `30` too."""
    if bare_seconds and isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and bare_seconds and _BARE_RE.match(value.strip()):
        seconds = float(value.strip())
    elif isinstance(value, str) and _WHOLE_RE.match(value.strip()):
        seconds = sum(float(number) * _UNIT_SECONDS[unit]
                      for number, unit in _PART_RE.findall(value.strip()))
    else:
        raise DurationError(f"{value!r} is not a duration; write e.g. 90s, 15m, 1h30m or 1d")
    if seconds <= 0:
        raise DurationError(f"{value!r} must be longer than zero")
    return seconds


def format_duration(seconds: float) -> str:
    """`900.0` -> `900s`, `1.5` -> `1.5s`: a duration this module parses back to `seconds`."""
    return f"{int(seconds)}s" if float(seconds).is_integer() else f"{seconds:g}s"
