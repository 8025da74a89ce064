"""Every VncTarget's phase as one cluster-wide watch sees it, for the benchmarks that wait on it
(bench/operator_real.py, bench/scale.py).

`async with TargetWatch(kube) as seen:` keeps, until the block ends, `seen.phase` (each
target's current phase, by "namespace/name"; a deleted one leaves it) and `seen.ready_at` (the
monotonic time each was first seen Ready: create → Ready latencies). The watch's first events
list every target; a watch that ends or fails is opened again (0.2 s later), and each lasts
at most 600 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from vncgate.common.kube import KubeClient, KubeError

WATCH = "/apis/vncgate.io/v1alpha1/vnctargets"


class TargetWatch:
    """The phase of every VncTarget, and when each was first Ready, from one watch."""

    def __init__(self, kube: KubeClient) -> None:
        self.kube = kube
        self.phase: dict[str, str] = {}
        self.ready_at: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    def _seen(self, event: dict[str, Any]) -> None:
        obj = event.get("object") or {}
        meta = obj.get("metadata") or {}
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        phase = str((obj.get("status") or {}).get("phase", ""))
        if phase == "Ready":
            self.ready_at.setdefault(key, time.monotonic())
        if event.get("type") == "DELETED":
            self.phase.pop(key, None)
        elif event.get("type") in ("ADDED", "MODIFIED"):
            self.phase[key] = phase

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(KubeError, OSError, TimeoutError):
                async for event in self.kube.watch(WATCH, timeout_seconds=600):
                    self._seen(event)
            await asyncio.sleep(0.2)

    def ready(self) -> int:
        """How many targets are Ready now."""
        return sum(1 for phase in self.phase.values() if phase == "Ready")

    async def wait(self, keys: list[str], within: float) -> None:
        """Until each of `keys` has been Ready; RuntimeError after `within` seconds."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if all(k in self.ready_at for k in keys):
                return
            await asyncio.sleep(0.1)
        missing = [k for k in keys if k not in self.ready_at]
        raise RuntimeError(f"{len(missing)} targets not Ready within {within:g}s, "
                           f"e.g. {missing[:3]}")

    async def __aenter__(self) -> TargetWatch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
