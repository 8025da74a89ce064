"""The shell commands of the docs, so that tests run exactly what a reader types."""

from __future__ import annotations

import re
from pathlib import Path


def shell_blocks(document: Path, heading: str) -> list[str]:
    """The ```sh blocks of the section `## heading` (up to the next `## ` heading)."""
    text = document.read_text()
    start = re.search(rf"^## {re.escape(heading)}\s*$", text, re.MULTILINE)
    if start is None:
        raise AssertionError(f"{document.name} has no section '## {heading}'")
    end = re.search(r"^## ", text[start.end():], re.MULTILINE)
    section = text[start.end(): start.end() + end.start() if end else len(text)]
    blocks = re.findall(r"^```sh\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    if not blocks:
        raise AssertionError(f"{document.name} '## {heading}' has no ```sh block")
    return blocks
