"""Ending background tasks: cancel them, then wait until each has unwound."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


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
