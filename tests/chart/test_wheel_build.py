"""`pip install .` or `python -m build` without the noVNC client in place stops with a message,
instead of building a wheel whose viewer cannot load."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_wheel_without_the_viewer_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("relay", "operator", "common", "kubectl", "packaging/build_backend"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns(
            "core", "vendor", "__pycache__"))
    assert not (source / "relay/static/novnc/core").exists()
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path / "dist"),
         str(source)], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode != 0
    assert "the noVNC client is not in place" in result.stdout + result.stderr
    assert "scripts/setup" in result.stdout + result.stderr
    assert not list((tmp_path / "dist").glob("*.whl"))
