"""Give back the memory of the start-up burst.

At start kopf holds every VncTarget's event at once: it lists them all, and each object's worker
waits, holding its body, until every object is indexed. With 5,000 targets that burst lifts the
RSS by about 90 MiB, and most of it stays mapped after it is freed: cyclic garbage waits for a
full collection (the thresholds are raised, cli.GC_THRESHOLDS), and glibc keeps freed heap pages.
Once the start is over, one full collection and `malloc_trim(0)` return them to the system
(docs/PERFORMANCE.md has the figures at 5,000 targets).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import os
from collections.abc import Awaitable

logger = logging.getLogger("vncgate.operator.memory")

# kopf ends a per-object worker 5 s after its last event (settings.queueing.idle_timeout); the
# burst's workers are gone some seconds after the first full resync.
SETTLE_SECONDS = 10.0
RELEASED = "start-up burst released"


def _malloc_trim() -> bool:
    """glibc's malloc_trim(0); False where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def release() -> tuple[int, bool]:
    """One full collection, then hand freed heap pages back; (objects collected, trimmed)."""
    collected = gc.collect()
    return collected, _malloc_trim()


async def release_after(started: Awaitable[object], settle: float = SETTLE_SECONDS) -> None:
    """Once `started` is done and `settle` seconds more have passed, `release()` once."""
    await started
    await asyncio.sleep(settle)
    before = _rss_mib()
    collected, trimmed = release()
    # The benchmark (bench/operator_real.py) waits for this line before it reads the RSS.
    logger.info("%s: RSS %.0f -> %.0f MiB (%d objects collected%s)", RELEASED, before,
                _rss_mib(), collected, "" if trimmed else "; no malloc_trim here")
