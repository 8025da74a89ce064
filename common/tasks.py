"""Background tasks: ending them (cancel, then wait until each has unwound), and sharing one
task's answer among the callers that want it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel each task (None: none there), then wait for every one to finish its clean-up.
    Their cancellation is swallowed; an error a task ended with before it was cancelled is
    raised (the caller sees what its loop hid)."""
    live = [task for task in tasks if task is not None]
    for task in live:
        task.cancel()
    for task in live:
        with contextlib.suppress(asyncio.CancelledError):
            await task


class SharedAnswers(Generic[K, V]):
    """At most one task per key for an answer that several callers may want at once (an API
    server's review of the same question): who asks while the key's task runs waits for that
    task; who stops waiting (its deadline, its cancellation) leaves the task running, so that
    its answer still lands where the task puts it (a cache) for the next caller."""

    def __init__(self) -> None:
        self._tasks: dict[K, asyncio.Task[V]] = {}

    async def wait(self, key: K, start: Callable[[], Coroutine[Any, Any, V]],
                   within: float) -> V:
        """`key`'s answer, from its task under way or a new one of `start()`; TimeoutError
        after `within` seconds, the task going on."""
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.ensure_future(start())
            self._tasks[key] = task
            task.add_done_callback(functools.partial(self._forget, key))
        return await asyncio.wait_for(asyncio.shield(task), within)

    def _forget(self, key: K, done: asyncio.Task[V]) -> None:
        if self._tasks.get(key) is done:
            del self._tasks[key]
        if not done.cancelled():
            done.exception()  # retrieved: a caller who stopped waiting is not told again

    async def close(self) -> None:
        """Cancel the tasks under way and wait for them; what they ended with is dropped."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
