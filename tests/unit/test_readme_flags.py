"""The README's flag table of `vncgate-relay` and the flags the relay takes are the same set."""

from __future__ import annotations

import re
from pathlib import Path

from vncgate.relay.settings import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"
FLAG = re.compile(r"`(--[a-z][a-z0-9-]*)")


def table_flags() -> set[str]:
    text = README.read_text()
    section = text[text.index("### Command line"):]
    section = section[:section.index("\n#")]
    rows = [line for line in section.splitlines() if line.startswith("| `--")]
    return {flag for row in rows for flag in FLAG.findall(row.split(" | ")[0])}


def parser_flags() -> set[str]:
    # `--no-X` is the negation of a boolean `--X` that the table already names; help and version
    # are argparse's own.
    options = {option for action in build_parser()._actions for option in action.option_strings}
    return {option for option in options if option.startswith("--")
            and not option.startswith("--no-") and option not in ("--help", "--version")}


def test_the_readme_names_every_flag() -> None:
    missing = sorted(parser_flags() - table_flags())
    assert not missing, f"README's command-line table lacks {missing}"


def test_the_readme_names_no_flag_that_is_gone() -> None:
    gone = sorted(table_flags() - parser_flags())
    assert not gone, f"README's command-line table names flags the relay does not take: {gone}"
