"""`--version` on both commands prints the installed distribution's version and exits 0."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("command", ["vncgate-relay", "vncgate-operator"])
def test_version_flag(command: str) -> None:
    result = subprocess.run([str(BIN / command), "--version"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{command} {version('vncgate')}"
