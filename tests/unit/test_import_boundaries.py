"""Code outside tests/ never imports the tests, and the product never imports the harness.

The benchmarks and the demo share the real parts they run (Xvnc, the control plane, stand-in
servers) with the tests through `harness/`; a production entry point or the installed package
that imported `tests` would break on any install without the tests, or run test code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("relay", "operator", "common", "kubectl")
NOT_TESTS = (*PRODUCT, "scripts", "bench", "harness")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def python_files(*folders: str) -> list[Path]:
    files = [path for folder in folders for path in (ROOT / folder).rglob("*.py")
             if "static" not in path.parts and "node_modules" not in path.parts]
    assert files, f"no Python files under {folders}"
    return sorted(files)


def importers(folders: tuple[str, ...], packages: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(ROOT)} imports {module}"
            for path in python_files(*folders) for module in sorted(imported_modules(path))
            if module.split(".")[0] in packages]


def test_nothing_outside_the_tests_imports_them() -> None:
    assert importers(NOT_TESTS, ("tests",)) == []


def test_the_product_imports_no_harness() -> None:
    assert importers(PRODUCT, ("harness", "bench", "scripts")) == []


@pytest.mark.parametrize("source", ["from tests.support.xvnc import XvncServer",
                                    "import tests.conftest",
                                    "def f():\n    from tests import conftest"])
def test_the_check_sees_every_form_of_import(source: str, tmp_path: Path) -> None:
    path = tmp_path / "module.py"
    path.write_text(source + "\n")
    assert any(module.split(".")[0] == "tests" for module in imported_modules(path))
