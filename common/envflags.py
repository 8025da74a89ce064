"""`VNCGATE_*` variables: every flag of both commands is also one (flags win)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import NoReturn

PREFIX = "VNCGATE_"
TRUE_WORDS = ("1", "true", "yes", "on")


def env(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """`VNCGATE_<name>`, or None when unset."""
    return (os.environ if environ is None else environ).get(PREFIX + name)


def split_list(value: str | None) -> list[str]:
    """A repeatable flag's variable: comma-separated, blanks dropped."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def env_list(name: str, environ: Mapping[str, str] | None = None) -> list[str]:
    return split_list(env(name, environ))


def truthy(value: str | None) -> bool:
    """A boolean flag's variable: 1, true, yes or on (any case) is true; anything else false."""
    return (value or "").strip().lower() in TRUE_WORDS


def env_flag(name: str, environ: Mapping[str, str] | None = None) -> bool:
    return truthy(env(name, environ))


class FlagParser(argparse.ArgumentParser):
    """argparse, with an error that is one line saying what to fix, not the whole usage block.

    The usage block of `vncgate-relay` is thirty lines long: printed before the one useful line,
    it hides it. `--help` still prints the usage in full.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n`{self.prog} --help` lists every flag.\n")
