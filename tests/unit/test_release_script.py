"""scripts/release refuses what it cannot build before building anything, and says what to do:
a version that is not SemVer or has no PEP 440 form, and an image this machine cannot build.
(The release itself, each artifact installed, is tests/cluster/test_release.py.)"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "release.py"


def release_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("release_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    prefix = [] if user is None else ["setpriv", f"--reuid={user}", f"--regid={user}",
                                      "--clear-groups"]
    return subprocess.run([*prefix, sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=120, check=False, cwd=ROOT)


@pytest.mark.parametrize(("version", "says"), [
    ("1.2", "is not a SemVer version"),
    ("v1.2.0", "is not a SemVer version"),
    ("1.2.0-nightly.3", "has no PEP 440 form"),
])
def test_a_version_it_cannot_use_is_refused_first(version: str, says: str,
                                                  tmp_path: Path) -> None:
    result = run(version, "--no-image", "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert says in result.stderr
    assert not (tmp_path / "out").exists(), "it began building"


def test_the_pep440_form_of_a_prerelease() -> None:
    release = release_module()
    assert release.python_version("1.2.0-rc.1") == "1.2.0rc1"
    assert release.python_version("0.0.0-dev.1") == "0.0.0.dev1"
    assert release.python_version("1.2.0") == "1.2.0"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run the script as another user")
def test_without_root_it_says_to_use_root_or_no_image(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run("1.2.0", "--out", str(out), user=65534)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "building the image needs root" in result.stderr
    assert "--no-image" in result.stderr
    assert not out.exists(), "it began building"


def test_without_buildah_it_names_the_tools_and_the_ways_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("not root: the root check comes first (the test above)")
    release = release_module()
    monkeypatch.setattr(release, "IMAGE_TOOLS", ("buildah", "no-such-tool-vncgate"))
    with pytest.raises(release.ReleaseError) as refused:
        release.image_prerequisites(install_tools=False)
    message = str(refused.value)
    assert "no-such-tool-vncgate" in message
    assert "--install-tools" in message and "--no-image" in message
    release.image_prerequisites(install_tools=True)  # scripts/build-image installs them
