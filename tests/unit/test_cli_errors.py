"""A command-line mistake is answered with the one line that says what to fix, not the usage block;
`vncgate-relay --help` names its subcommands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    # COLUMNS: argparse wraps help at the terminal's width, also between "vncgate-" and "relay".
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True,
                          timeout=60, check=False, env={**os.environ, "COLUMNS": "400"})


@pytest.mark.parametrize(("argv", "says"), [
    (["vncgate-relay", "--listen", "bogus"], "'bogus' is not HOST:PORT"),
    (["vncgate-relay", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["vncgate-relay", "link", "no-slash"], "write NAMESPACE/NAME"),
    (["vncgate-operator", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["kubectl-vnc", "frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_a_mistake_is_one_line_and_a_pointer_to_help(argv: list[str], says: str) -> None:
    result = run(*argv)
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert says in lines[0], result.stderr
    assert len(lines) == 2 and "--help` lists every flag" in lines[1], result.stderr
    assert "usage:" not in result.stderr


def test_help_names_the_subcommands() -> None:
    result = run("vncgate-relay", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for subcommand in ("vncgate-relay link NS/NAME", "vncgate-relay hash-password",
                       "vncgate-relay recordings list|export|delete|prune"):
        assert subcommand in text, text
