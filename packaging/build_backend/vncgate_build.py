"""The build backend: setuptools', refusing a wheel whose viewer would be missing.

The noVNC core is not in the repository: `scripts/setup` (or the Dockerfile's first stage) places
it from npm into relay/static/novnc/. A wheel built before that would install a relay whose viewer
fails in the browser, with nothing said at build time; this backend stops the build instead.
Editable installs are not checked: `scripts/setup` makes the editable install before it places
noVNC, and an editable install serves the files from the tree as they are at run time.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (the rest of the backend interface, unchanged)

# What the viewer page loads: noVNC's RFB client and the libraries it imports.
VIEWER_ASSETS = ("relay/static/novnc/core/rfb.js", "relay/static/novnc/vendor/pako")


class ViewerAssetsMissing(RuntimeError):
    pass


def check_viewer_assets(root: Path) -> None:
    missing = [path for path in VIEWER_ASSETS if not (root / path).exists()]
    if missing:
        raise ViewerAssetsMissing(
            f"the noVNC client is not in place ({', '.join(missing)} missing): a wheel built now "
            "would serve a viewer that cannot load. Run `npm ci` and `scripts/setup` first "
            "(they copy node_modules/@novnc/novnc/{core,vendor} into relay/static/novnc/).")


def build_wheel(wheel_directory: str, config_settings: dict[str, object] | None = None,
                metadata_directory: str | None = None) -> str:
    check_viewer_assets(Path.cwd())
    return str(_setuptools.build_wheel(wheel_directory, config_settings, metadata_directory))


def build_sdist(sdist_directory: str, config_settings: dict[str, object] | None = None) -> str:
    check_viewer_assets(Path.cwd())
    return str(_setuptools.build_sdist(sdist_directory, config_settings))
