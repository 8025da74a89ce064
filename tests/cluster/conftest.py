"""A real Kubernetes API server for the session, a namespace per test.

Outside CI the tests skip when the control-plane binaries are missing (the skip message says how
to get them); in CI (`CI=true`) a missing binary fails the run instead, so the real-cluster tests
can never silently stop running.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import (
    ROOT,
    ControlPlane,
    ControlPlaneUnavailable,
    assets_dir,
    wait_until,
)

CRDS = ROOT / "crds"
_namespaces = itertools.count(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/cluster/" in str(item.path).replace(os.sep, "/"):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    try:
        assets_dir()
    except ControlPlaneUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI runs the real-cluster tests: {exc}")
        pytest.skip(str(exc))
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane")).start()
    try:
        plane.kubectl("apply", "--server-side", "-f", str(CRDS))
        plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                      "crd/vnctargets.vncgate.io")
        # The OpenAPI document (kubectl explain, client-side field validation) follows a few
        # seconds after Established.
        wait_until(lambda: plane.kubectl("explain", "vnctargets", check=False).returncode == 0,
                   "the VncTarget schema in the API server's OpenAPI document")
        yield plane
    finally:
        plane.close()


@pytest.fixture
def namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted (without waiting) afterwards."""
    name = f"t{next(_namespaces)}-{request.node.name.lower()[:40]}".replace("_", "-").rstrip("-")
    name = "".join(c for c in name if c.isalnum() or c == "-")[:63].rstrip("-")
    control_plane.kubectl("create", "namespace", name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
