"""Waiting for a condition, with a deadline and a message: never a fixed sleep.

`eventually` (async, for tests in the event loop) and `wait_until` (sync, for tests that drive
processes) poll `check` until it returns something truthy and return that. When `timeout`
passes first they raise `NotInTime` (a TimeoutError, so a caller can add what it knows, e.g. a
log) saying what did not happen, the last value seen and, if given, `context()`.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class NotInTime(TimeoutError):
    """A condition that a test waited for did not come true before its deadline."""


def _failure(what: str, timeout: float, last: Any,
             context: Callable[[], Any] | None) -> NotInTime:
    message = f"{what}: not within {timeout:g}s (last seen: {last!r})"
    if context is not None:
        message += f"; {context()!r}"
    return NotInTime(message)


async def eventually(check: Callable[[], T | Awaitable[T]], what: str, timeout: float = 30.0,
                     *, interval: float = 0.05, context: Callable[[], Any] | None = None) -> T:
    """Await until `check()` (a value or an awaitable) is truthy; return it."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise _failure(what, timeout, result, context)
        await asyncio.sleep(interval)


def wait_until(check: Callable[[], T], what: str, timeout: float = 60.0, *,
               interval: float = 0.2, context: Callable[[], Any] | None = None) -> T:
    """Block until `check()` is truthy; return it."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise _failure(what, timeout, result, context)
        time.sleep(interval)
