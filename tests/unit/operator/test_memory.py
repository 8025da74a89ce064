"""The operator hands back the memory of its start-up burst (every target's body held at once
while kopf indexes them), so its RSS after a restart stays near its steady state."""

from __future__ import annotations

import asyncio
import gc

from vncgate.operator import memory


def test_the_start_up_burst_is_released_once_the_first_resync_is_done() -> None:
    class Cycle:
        def __init__(self) -> None:
            self.me = self

    async def scenario() -> tuple[bool, int]:
        started = asyncio.Event()
        gc.disable()  # the only collection is release()'s
        try:
            for _ in range(1000):
                Cycle()
            task = asyncio.create_task(memory.release_after(started.wait(), settle=0.0))
            await asyncio.sleep(0.05)
            waited = not task.done()  # nothing happens before the first resync
            before = sum(1 for o in gc.get_objects() if isinstance(o, Cycle))
            started.set()
            await task
            return waited, before - sum(1 for o in gc.get_objects() if isinstance(o, Cycle))
        finally:
            gc.enable()

    waited, freed = asyncio.run(scenario())
    assert waited
    assert freed == 1000
    assert memory.release()[1]  # glibc here: the heap is trimmed
