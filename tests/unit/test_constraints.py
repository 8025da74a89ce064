"""constraints.txt pins what the image and CI install; the environment running the tests is that
one (scripts/setup installs with `-c constraints.txt`)."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def pins() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not name==version"
            found[canonicalize_name(name)] = version.strip()
    return found


def test_the_installed_aiohttp_is_the_pinned_one() -> None:
    """relay/internals.py reaches into aiohttp's private parts; tests/relay/test_internals.py
    checks them against the installed version, which must be the one the image gets."""
    assert metadata.version("aiohttp") == pins()["aiohttp"], (
        "the installed aiohttp is not the one constraints.txt pins: run scripts/setup")


def test_every_pinned_package_is_installed_at_its_pin() -> None:
    wrong = {name: (version, metadata.version(name)) for name, version in pins().items()
             if metadata.version(name) != version}
    assert not wrong, f"(pinned, installed): {wrong}; run scripts/setup"


def test_every_run_time_dependency_is_pinned() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {canonicalize_name(Requirement(spec).name) for spec in project["dependencies"]}
    missing = sorted(names - pins().keys())
    assert not missing, (f"pyproject.toml depends on {missing} without a pin in constraints.txt: "
                         "add name==version (the version scripts/setup installed)")
