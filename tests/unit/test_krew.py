"""The krew manifest template (packaging/krew/vnc.yaml) as krew-release-bot renders it; the
manifest scripts/release fills, and the plugin installed from it, are tested in
tests/cluster/test_release.py."""

from __future__ import annotations

import re
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
        assert (ROOT / "LICENSE").exists()
