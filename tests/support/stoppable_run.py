"""Tests that a child pytest runs, for tests/unit/test_stopped_runs.py (not collected by itself:
the name does not start with test_).

`test_hold_real_processes` starts what a real test starts (a TigerVNC server, a relay process
in front of it and, with VNCGATE_SCENARIO_PLAIN=1, a process started without the test
support's helpers), writes the file VNCGATE_SCENARIO_READY names, then waits to be stopped from
outside. `test_leave_a_process_running` starts a process and does not stop it.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from harness.xvnc import XvncServer
from tests.support.processes import ConsoleScript


@pytest.mark.timeout(0)  # the parent test stops it
def test_hold_real_processes(tmp_path: Path) -> None:
    with XvncServer(log_path=tmp_path / "xvnc.log") as xvnc, ConsoleScript(
            "vncgate-relay", ["--listen", "127.0.0.1:0", "--internal-listen", "127.0.0.1:0",
                              "--target", f"lab/desk=127.0.0.1:{xvnc.port}"], tmp_path) as relay:
        relay.wait_for_log("relay listening")
        if os.environ.get("VNCGATE_SCENARIO_PLAIN") == "1":
            subprocess.Popen(["sleep", "600"])  # what a careless test does
        Path(os.environ["VNCGATE_SCENARIO_READY"]).write_text("ready")
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            time.sleep(1)  # not a timing guess: it waits for the parent's signal


def test_leave_a_process_running() -> None:
    subprocess.Popen(["sleep", "600"])  # never stopped: the run's end must say so
