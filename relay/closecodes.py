"""WebSocket close codes: an HTTP status with a 4 in front (4000-4999 are the application's)."""

from __future__ import annotations

NORMAL = 1000
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
UNSUPPORTED_DATA = 1003
NO_STATUS = 1005
ABNORMAL = 1006
MESSAGE_TOO_BIG = 1009
SERVICE_RESTART = 1012
UNAUTHENTICATED = 4401
FORBIDDEN = 4403
UNKNOWN_TARGET = 4404
IDLE_TIMEOUT = 4408
CONFLICT = 4409
# HTTP 424 Failed Dependency: the target's stored credential was refused or cannot be read.
# Final: a viewer that retried would only add failed logins (servers blacklist on those).
CREDENTIAL_REFUSED = 4424
TOO_MANY_REQUESTS = 4429
INTERNAL_ERROR = 4500
BAD_UPSTREAM = 4502
OVER_CAPACITY = 4503
# The same HTTP 503, for a check that could not be made (the API server did not answer a
# review): refused, and the viewer reconnects with back-off (4403 would be final).
UNAVAILABLE = 4503
UPSTREAM_TIMEOUT = 4504
# HTTP 507 Insufficient Storage: the console must be recorded (spec.recording.required) and its
# recording cannot go on. Final: the administrator must free or fix the disk first.
RECORDING_FAILED = 4507

# A close frame carries at most 125 bytes: 2 for the code, 123 for the reason.
MAX_REASON_BYTES = 123


def clip_reason(reason: str) -> str:
    """Shorten a reason to what fits into a close frame without cutting a UTF-8 character."""
    encoded = reason.encode()
    if len(encoded) <= MAX_REASON_BYTES:
        return reason
    return encoded[: MAX_REASON_BYTES - 3].decode(errors="ignore") + "..."
