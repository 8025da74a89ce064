"""The krew manifest (packaging/krew/vnc.yaml) and the launcher it installs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
KREW = ROOT / "packaging" / "krew"


def rendered(tag: str = "v0.1.0") -> dict[str, object]:
    """The manifest as krew-release-bot renders it for a release."""
    text = (KREW / "vnc.yaml").read_text()
    text = re.sub(r'\{\{ addURIAndSha "([^"]+)" \.TagName \}\}',
                  lambda m: f"uri: {m.group(1)}\n      sha256: {'0123456789abcdef' * 4}", text)
    text = text.replace("{{ .TagName }}", tag)
    assert "{{" not in text, "a template expression krew-release-bot does not fill"
    manifest = yaml.safe_load(text)
    assert isinstance(manifest, dict)
    return manifest


def test_manifest_has_what_krew_requires() -> None:
    manifest = rendered()
    assert manifest["apiVersion"] == "krew.googlecontainertools.github.com/v1alpha2"
    assert manifest["kind"] == "Plugin"
    assert manifest["metadata"] == {"name": "vnc"}  # `kubectl vnc`
    spec = manifest["spec"]
    assert isinstance(spec, dict)
    assert spec["version"] == "v0.1.0"
    for field in ("homepage", "shortDescription", "description"):
        assert spec[field], field
    assert len(spec["shortDescription"]) <= 60
    for platform in spec["platforms"]:
        assert platform["bin"] == "kubectl-vnc"
        assert platform["uri"].endswith("/v0.1.0/kubectl-vnc.tar.gz")
        assert re.fullmatch(r"[0-9a-f]{64}", platform["sha256"])
        sources = {item["from"] for item in platform["files"]}
        assert sources == {"kubectl-vnc", "LICENSE"}
        assert (KREW / "kubectl-vnc").exists() and (ROOT / "LICENSE").exists()


def test_the_launcher_runs_the_installed_plugin_or_says_what_to_install(tmp_path: Path) -> None:
    launcher = KREW / "kubectl-vnc"
    assert os.access(launcher, os.X_OK)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "VNCGATE_PYTHON": sys.executable}
    result = subprocess.run([str(launcher), "--help"], env=env, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "usage: kubectl vnc" in result.stdout
    # No Python with vncgate on this PATH (an empty folder): the launcher says what to do.
    empty = tmp_path / "bin"
    empty.mkdir()
    result = subprocess.run(["/bin/sh", str(launcher), "list"],
                            env={"PATH": str(empty), "HOME": str(tmp_path)},
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert "pip install vncgate" in result.stderr
