"""docs/ARCHITECTURE.md's module maps name every module of the packages, and nothing else."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("relay", "operator/vncgate_operator", "common", "kubectl")
NAMED = re.compile(r"`((?:relay|operator/vncgate_operator|common|kubectl)/[\w/]+\.py)`")


def modules() -> set[str]:
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            relative = path.relative_to(ROOT)
            if "static" in relative.parts or path.name in ("__init__.py", "__main__.py"):
                continue
            found.add(relative.as_posix())
    return found


def named() -> set[str]:
    return set(NAMED.findall((ROOT / "docs" / "ARCHITECTURE.md").read_text()))


def test_every_module_is_in_the_map() -> None:
    missing = sorted(modules() - named())
    assert not missing, f"docs/ARCHITECTURE.md names no job for {missing}: add a row to its map"


def test_the_map_names_no_module_that_is_gone() -> None:
    gone = sorted(name for name in named() if not (ROOT / name).is_file())
    assert not gone, f"docs/ARCHITECTURE.md names modules that do not exist: {gone}"
