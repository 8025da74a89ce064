"""One scheduler for every target's probes and status refreshes: no timer or task per target.

A heap of (due time, key) and one loop that runs what is due, at most `concurrency` at once.
Per target it keeps a due time and whether a probe is due with it; nothing else. A key that is
scheduled again while it runs runs once more after it finishes (never twice at once), so one
target's status is written by one evaluation at a time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import logging
import random
from collections.abc import Awaitable, Callable

from vncgate.operator.probe import next_probe_delay

logger = logging.getLogger("vncgate.operator.scheduler")

# evaluate(key, probe): look at one target now; `probe` says whether to probe its server.
Evaluate = Callable[[str, bool], Awaitable[None]]


class Scheduler:
    def __init__(self, evaluate: Evaluate, interval: float, concurrency: int,
                 exists: Callable[[str], bool] = lambda _key: True,
                 rng: random.Random | None = None) -> None:
        self._evaluate = evaluate
        self._exists = exists
        self.interval = interval
        self._slots = asyncio.Semaphore(concurrency)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        # key -> (due, probe). A heap entry whose due time is not this one is stale.
        self._due: dict[str, tuple[float, bool]] = {}
        self._running: set[str] = set()
        # key -> (delay, probe): scheduled while it was running; applied when it ends.
        self._again: dict[str, tuple[float, bool]] = {}
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        # Evaluations finished per key (also failed ones): how often a target was looked at.
        self.evaluations: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, key: str) -> bool:
        return key in self._due or key in self._running

    def schedule(self, key: str, delay: float, probe: bool = True) -> None:
        """Look at `key` within `delay` seconds (an earlier schedule stands)."""
        if key in self._running:
            # It is being looked at now: the next turn is scheduled when this one ends.
            before = self._again.get(key)
            self._again[key] = ((min(before[0], delay), before[1] or probe) if before
                                else (delay, probe))
            return
        loop = asyncio.get_running_loop()
        at = loop.time() + max(delay, 0.0)
        current = self._due.get(key)
        if current is not None and current[0] <= at:
            if probe and not current[1]:
                self._due[key] = (current[0], True)
            return
        self._due[key] = (at, probe or (current is not None and current[1]))
        heapq.heappush(self._heap, (at, next(self._seq), key))
        if self._heap[0][2] == key:
            self._wake.set()

    def schedule_first(self, key: str) -> None:
        """A target seen at start: its first look anywhere in the interval, so that an
        operator restart does not probe every target in the same second."""
        self.schedule(key, next_probe_delay(self.interval, True, self._rng))

    def notice(self, key: str, changed: bool) -> None:
        """A watch event of `key`: look now if it `changed` (new, or its spec changed since
        status was written); else keep its turn, or give it a first one in the interval."""
        if changed:
            self.schedule(key, 0.0)
        elif key not in self:
            self.schedule_first(key)

    def refresh_all(self, within: float = 1.0) -> None:
        """Look at every target's status soon, without probing (the relays changed). A target
        being looked at now (or waiting for a slot) is looked at once more after that: what it
        is writing was decided before the change."""
        for key in sorted(self._due.keys() | self._running):
            self.schedule(key, self._rng.uniform(0.0, within), probe=False)

    def quiet(self, within: float) -> bool:
        """Nothing runs now and nothing is due within `within` seconds."""
        if self._running or self._again:
            return False
        horizon = asyncio.get_running_loop().time() + within
        return all(at > horizon for at, _ in self._due.values())

    def forget(self, key: str) -> None:
        self._due.pop(key, None)
        self._again.pop(key, None)
        self.evaluations.pop(key, None)

    async def _run_one(self, key: str, probe: bool) -> None:
        try:
            async with self._slots:
                await self._evaluate(key, probe)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("%s: evaluation failed; trying again in %gs", key, self.interval)
        finally:
            self._running.discard(key)
            if self._exists(key):
                self.evaluations[key] += 1
        again = self._again.pop(key, None)
        if again is not None:
            self.schedule(key, *again)
        elif key not in self._due and self._exists(key):
            self.schedule(key, next_probe_delay(self.interval, False, self._rng))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while self._heap:
                    at, _, key = self._heap[0]
                    due = self._due.get(key)
                    if due is None or due[0] != at:
                        heapq.heappop(self._heap)  # stale
                        continue
                    if at > loop.time():
                        break
                    heapq.heappop(self._heap)
                    del self._due[key]
                    if key in self._running:
                        self.schedule(key, 0.0, due[1])
                        continue
                    self._running.add(key)
                    task = asyncio.create_task(self._run_one(key, due[1]))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                self._wake.clear()
                timeout = max(self._heap[0][0] - loop.time(), 0.0) if self._heap else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=timeout)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
