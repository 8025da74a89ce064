"""The scheduler alone: one evaluation per key at a time, earlier schedules win, no timers."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from harness.waiting import eventually
from vncgate.operator.kubeapi import event_name
from vncgate.operator.probe import proven_by_sessions
from vncgate.operator.scheduler import Scheduler
from vncgate.operator.status import (
    NEW,
    now_precise,
    record_transition,
    replay_due,
    transition_of,
)


async def _run_until(scheduler: Scheduler, done: asyncio.Event, timeout: float = 5.0) -> None:
    task = asyncio.create_task(scheduler.run())
    try:
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_due_keys_run_once_each_and_reschedule() -> None:
    seen: list[tuple[str, bool]] = []
    done = asyncio.Event()

    async def evaluate(key: str, probe: bool) -> None:
        seen.append((key, probe))
        if len(seen) == 3:
            done.set()

    scheduler = Scheduler(evaluate, interval=3600.0, concurrency=2, rng=random.Random(1))  # noqa: S311 - jitter
    scheduler.schedule("lab/a", 0.0)
    scheduler.schedule("lab/b", 0.0, probe=False)
    scheduler.schedule("lab/c", 0.01)
    scheduler.schedule("lab/c", 60.0)  # a later schedule does not delay an earlier one
    await _run_until(scheduler, done)
    assert sorted(seen) == [("lab/a", True), ("lab/b", False), ("lab/c", True)]
    # Each is due again, one interval (jittered) later: nothing runs before that.
    assert len(scheduler) == 3 and all(key in scheduler for key in ("lab/a", "lab/b", "lab/c"))


async def test_a_key_never_runs_twice_at_once() -> None:
    running, most, calls = 0, 0, 0
    done = asyncio.Event()
    scheduler: Scheduler

    async def evaluate(key: str, probe: bool) -> None:
        nonlocal running, most, calls
        running += 1
        most = max(most, running)
        calls += 1
        if calls == 1:
            for _ in range(5):  # scheduled again while it runs: one more run afterwards
                scheduler.schedule(key, 0.0)
            await asyncio.sleep(0.05)
        running -= 1
        if calls == 2:
            done.set()

    scheduler = Scheduler(evaluate, interval=3600.0, concurrency=8)
    scheduler.schedule("lab/a", 0.0)
    await _run_until(scheduler, done)  # stops the loop: nothing runs after this
    assert (most, calls) == (1, 2)


async def test_forgotten_and_deleted_keys_are_not_run_again() -> None:
    seen: list[str] = []
    done = asyncio.Event()
    exists = {"lab/a": True, "lab/b": True}

    async def evaluate(key: str, probe: bool) -> None:
        seen.append(key)
        exists[key] = False  # deleted while being looked at
        done.set()

    scheduler = Scheduler(evaluate, interval=0.01, concurrency=1, exists=lambda k: exists[k])
    scheduler.schedule("lab/a", 0.0)
    scheduler.schedule("lab/b", 0.0)
    scheduler.forget("lab/b")
    await _run_until(scheduler, done)
    # Nothing scheduled: neither would run again, however long the loop went on.
    assert seen == ["lab/a"] and len(scheduler) == 0


def test_a_phase_change_is_recorded_in_status_and_named_for_its_event() -> None:
    current = {"phase": "Pending", "conditions": []}
    desired = {"phase": "Ready", "conditions": [
        {"type": "Ready", "status": "True", "reason": "Ready", "message": "all good"}]}
    transition = record_transition(current, desired, "2026-01-01T00:00:00.000001Z")
    assert transition is not None and not transition.warning
    assert desired["phaseTransition"] == {"from": "Pending", "time": "2026-01-01T00:00:00.000001Z"}
    assert transition.message == "Pending -> Ready: all good"
    # What a restarted operator reads back from status is the same transition, so the same
    # Event name: posting it again is refused as a duplicate.
    assert transition_of(desired) == transition
    same = event_name("desk", "uid-1", transition.old, transition.new, transition.at)
    assert same == event_name("desk", "uid-1", "Pending", "Ready", "2026-01-01T00:00:00.000001Z")
    assert same != event_name("desk", "uid-1", "Pending", "Ready", "2026-01-01T00:00:01.000001Z")
    assert record_transition(desired, dict(desired), "later") is None  # no change, no Event
    new = record_transition(None, {"phase": "Pending", "conditions": []}, "t")
    assert new is not None and new.old == NEW and not new.warning
    down = record_transition(desired, {"phase": "Unreachable", "conditions": []}, "t")
    assert down is not None and down.warning


async def test_a_watch_event_looks_now_only_if_the_target_changed() -> None:
    async def evaluate(key: str, probe: bool) -> None:
        raise AssertionError("not run in this test")

    scheduler = Scheduler(evaluate, interval=3600.0, concurrency=1, rng=random.Random(1))  # noqa: S311 - jitter
    scheduler.notice("lab/seen", changed=False)  # listed at start: a turn within the interval
    scheduler.notice("lab/new", changed=True)
    loop_now = asyncio.get_running_loop().time()
    assert scheduler._due["lab/new"][0] <= loop_now
    first_turn = scheduler._due["lab/seen"][0]
    assert loop_now < first_turn <= loop_now + 3600.0
    scheduler.notice("lab/seen", changed=False)  # seen again: its turn stands
    assert scheduler._due["lab/seen"][0] == first_turn


def test_only_a_recent_transition_has_its_event_posted_again() -> None:
    status: dict[str, Any] = {"phase": "Ready", "conditions": [
        {"type": "Ready", "status": "True", "reason": "Ready", "message": "all good"}]}
    assert replay_due(status, 600.0) is None  # no transition recorded
    record_transition({"phase": "Pending"}, status, now_precise())
    recent = replay_due(status, 600.0)
    assert recent is not None and recent.message == "Pending -> Ready: all good"
    status["phaseTransition"]["time"] = "2026-01-01T00:00:00.000001Z"
    assert replay_due(status, 600.0) is None  # long ago: posted then, or lost with its age
    status["phaseTransition"]["time"] = "not a time"
    assert replay_due(status, 600.0) is None


def test_open_sessions_prove_the_server_without_a_probe() -> None:
    proof = proven_by_sessions(2, "RFB 003.008")
    assert proof.ok and proof.reason == "LiveSession" and proof.server_version == "RFB 003.008"
    assert proof.message == "2 sessions open through the relays"
    assert proven_by_sessions(1, None).message == "1 session open through the relays"


async def test_quiet_and_counted_looks() -> None:
    done = asyncio.Event()

    async def evaluate(key: str, probe: bool) -> None:
        done.set()

    scheduler = Scheduler(evaluate, interval=3600.0, concurrency=1, rng=random.Random(1))  # noqa: S311 - jitter
    assert scheduler.quiet(5.0)
    scheduler.schedule("lab/a", 0.0)
    assert not scheduler.quiet(5.0)  # due now
    await _run_until(scheduler, done)
    await eventually(lambda: scheduler.evaluations["lab/a"] == 1, "one look counted")
    assert scheduler.quiet(5.0)  # next look in about an hour
    scheduler.forget("lab/a")
    assert "lab/a" not in scheduler.evaluations


async def test_a_refresh_reaches_the_targets_being_looked_at() -> None:
    """The relays changed while a target was being looked at (its probe in flight) or was
    waiting for a slot: each is looked at once more afterwards, without a probe, rather than at
    its next turn an interval later (what it was writing was decided before the change)."""
    seen: list[tuple[str, bool]] = []
    release = asyncio.Event()
    done = asyncio.Event()

    async def evaluate(key: str, probe: bool) -> None:
        seen.append((key, probe))
        if len(seen) == 1:
            await release.wait()  # lab/a's probe is in flight; lab/b waits for the one slot
        if len(seen) == 4:
            done.set()

    scheduler = Scheduler(evaluate, interval=3600.0, concurrency=1, rng=random.Random(1))  # noqa: S311 - jitter
    scheduler.schedule("lab/a", 0.0)
    scheduler.schedule("lab/b", 0.0)
    task = asyncio.create_task(scheduler.run())
    try:
        await eventually(lambda: seen == [("lab/a", True)] and "lab/b" not in scheduler._due,
                         "lab/a being looked at, lab/b waiting for a slot")
        scheduler.refresh_all()  # the relays answered
        release.set()
        await asyncio.wait_for(done.wait(), 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert seen[:2] == [("lab/a", True), ("lab/b", True)]
    assert sorted(seen[2:]) == [("lab/a", False), ("lab/b", False)]
