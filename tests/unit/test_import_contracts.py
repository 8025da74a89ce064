"""Import contracts that must hold even for imports made for annotations only.

pyproject.toml's import-linter setup leaves `if TYPE_CHECKING:` imports out (they are not
dependencies at run time). A circle drawn by annotations is still a circle for the reader, so the
contracts named here are checked again with those imports counted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
# Contracts checked with the annotation-only imports counted, by the start of their names.
STRICT = ("recordings know sessions only through",)


def test_no_circle_between_the_session_and_recording_rooms_even_in_annotations(
        tmp_path: Path) -> None:
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    contracts = [c for c in setup["contracts"] if c["name"].startswith(STRICT)]
    assert len(contracts) == len(STRICT), "a contract named in STRICT is gone from pyproject.toml"
    lines = ["[importlinter]", "root_packages =", "    vncgate",
             "exclude_type_checking_imports = False", ""]
    for number, contract in enumerate(contracts):
        lines += [f"[importlinter:contract:{number}]", f"name = {contract['name']}",
                  f"type = {contract['type']}"]
        for key in ("source_modules", "forbidden_modules"):
            lines += [f"{key} ="] + [f"    {module}" for module in contract[key]]
        lines.append("")
    config = tmp_path / "strict.ini"
    config.write_text("\n".join(lines))
    result = subprocess.run(
        [str(LINT_IMPORTS), "--config", str(config), "--no-cache"], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / ".tools" / "typecheck")},
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
