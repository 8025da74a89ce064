"""The failed sign-in limit per client address and per account."""

from __future__ import annotations

import time
from collections import OrderedDict, deque


class FailureLimiter:
    """At most `limit` failures per client in `window` seconds; bounded in memory."""

    def __init__(self, limit: int = 5, window: float = 60.0, max_clients: int = 10_000) -> None:
        self.limit = limit
        self.window = window
        self.max_clients = max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, client: str, now: float) -> deque[float]:
        failures = self._failures.get(client)
        if failures is None:
            return deque()
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            del self._failures[client]
        return failures

    def retry_after(self, client: str, now: float | None = None) -> float:
        """Seconds until this client may try again; 0 if it may try now."""
        now = now if now is not None else time.monotonic()
        failures = self._recent(client, now)
        if len(failures) < self.limit:
            return 0.0
        return max(0.0, failures[0] + self.window - now)

    def ages(self, client: str, now: float | None = None) -> list[float]:
        """How long ago (seconds) each of this client's failures in the window was, newest
        first: comparable between processes, whose monotonic clocks are not."""
        now = now if now is not None else time.monotonic()
        return sorted(now - moment for moment in self._recent(client, now))

    def failed(self, client: str, now: float | None = None) -> None:
        now = now if now is not None else time.monotonic()
        failures = self._failures.setdefault(client, deque())
        self._failures.move_to_end(client)
        failures.append(now)
        while len(failures) > self.limit:
            failures.popleft()
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)


def retry_after_ages(ages: list[float], limit: int, window: float) -> float:
    """Seconds until one more try is allowed, given the ages of a client's failures counted
    together (on every replica): 0 while fewer than `limit` are in the window."""
    recent = sorted(age for age in ages if age < window)
    if len(recent) < limit:
        return 0.0
    return max(0.0, window - recent[limit - 1])
