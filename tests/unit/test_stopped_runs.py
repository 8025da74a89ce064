"""A test run leaves no process behind, however it ends (harness.reaper).

Each test runs pytest in a child process on tests/support/stoppable_run.py, whose test starts
real processes (Xvnc, a relay), stops the child as CI or a developer would (SIGTERM from a time-out,
Ctrl-C's SIGINT, SIGKILL) and then looks for any process still carrying the child run's mark.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness import reaper
from harness.waiting import wait_until
from tests.conftest import ROOT

SCENARIO = "tests/support/stoppable_run.py"


class ChildRun:
    def __init__(self, tmp_path: Path, test: str, *, plain: bool) -> None:
        self.ready = tmp_path / "ready"
        self.log_path = tmp_path / "child-pytest.log"
        env = {**os.environ, "VNCGATE_SCENARIO_READY": str(self.ready),
               "VNCGATE_SCENARIO_PLAIN": "1" if plain else "0"}
        with self.log_path.open("wb") as log:
            self.proc = reaper.popen(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                 str(tmp_path / "base"), f"{SCENARIO}::{test}"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def started(self) -> list[reaper.Survivor]:
        """The processes of the child run (not the child pytest itself)."""
        return reaper.marked(prefix=f"{self.proc.pid}-")

    def wait_exit(self) -> int:
        return wait_until(lambda: self.proc.poll() is not None and (self.proc.returncode,),
                          "the child pytest exiting", timeout=90, context=self.log)[0]

    def wait_ready(self) -> None:
        wait_until(lambda: self.ready.exists() or self.proc.poll() is not None,
                   "the child's test holding its processes", timeout=120, context=self.log)
        assert self.proc.poll() is None, f"the child pytest ended early:\n{self.log()}"


@pytest.fixture
def child_runs() -> list[ChildRun]:
    runs: list[ChildRun] = []
    yield runs  # type: ignore[misc]
    for run in runs:  # whatever the test's outcome, nothing of the children stays
        reaper.end(run.proc)
        reaper.end_marked(run.started())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_run_leaves_nothing_running(signum: signal.Signals, tmp_path: Path,
                                              child_runs: list[ChildRun]) -> None:
    run = ChildRun(tmp_path, "test_hold_real_processes", plain=True)
    child_runs.append(run)
    run.wait_ready()
    commands = " | ".join(s.command for s in run.started())
    assert "Xvnc" in commands and "vncgate-relay" in commands and "sleep 600" in commands, (
        commands)
    run.proc.send_signal(signum)  # to pytest alone, as a CI runner's time-out does
    assert run.wait_exit() == pytest.ExitCode.INTERRUPTED, run.log()
    assert not run.started(), f"left running: {run.started()}\n{run.log()}"
    # Xvnc and the relay ended with their fixtures' teardowns; the process the test started
    # on its own was found by the run's end, ended and named.
    log = run.log()
    assert "processes left running" in log and "sleep 600" in log, log
    assert "Xvnc" not in log.split("processes left running", 1)[1], log


def test_a_killed_run_takes_its_processes_down(tmp_path: Path,
                                               child_runs: list[ChildRun]) -> None:
    # SIGKILL gives pytest no chance to clean up: the kernel's parent-death signal does it.
    run = ChildRun(tmp_path, "test_hold_real_processes", plain=False)
    child_runs.append(run)
    run.wait_ready()
    assert len(run.started()) >= 2, run.started()
    run.proc.send_signal(signal.SIGKILL)
    run.wait_exit()
    wait_until(lambda: not run.started(), "every process of the killed run ending", timeout=20,
               context=run.started)


def test_the_end_of_the_run_names_a_process_left_running(tmp_path: Path,
                                                          child_runs: list[ChildRun]) -> None:
    run = ChildRun(tmp_path, "test_leave_a_process_running", plain=False)
    child_runs.append(run)
    # The test itself passed; the run fails because of what it left behind.
    assert run.wait_exit() == pytest.ExitCode.TESTS_FAILED, run.log()
    log = run.log()
    assert "1 passed" in log, log
    assert "1 process(es) started by the tests outlived them" in log and "sleep 600" in log, log
    assert not run.started()
