"""A real Kubernetes API server for the session, a namespace per test.

Outside CI the tests skip when the control-plane binaries are missing (the skip message says how
to get them); in CI (`CI=true`) a missing binary fails the run instead, so the real-cluster tests
can never silently stop running.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.cluster import (
    ROOT,
    ControlPlane,
    ControlPlaneUnavailable,
    assets_dir,
)
from tests.support.kubevirt import (
    BACKEND_PORT,
    KubeVirtBackend,
    NetworkNamespace,
    install_api_service,
    remove_api_service,
    serving_certificate,
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
        yield plane
    finally:
        plane.close()


@pytest.fixture
def crd(control_plane: ControlPlane) -> ControlPlane:
    """The VncTarget CRD installed and served (the uninstall test deletes it; this puts it back)."""
    plane = control_plane
    if plane.kubectl("get", "crd", "vnctargets.vncgate.io", check=False).returncode != 0:
        plane.kubectl("apply", "--server-side", "-f", str(CRDS))
    plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                  "crd/vnctargets.vncgate.io")
    # The OpenAPI document (kubectl explain, client-side field validation) follows a few
    # seconds after Established.
    plane.explain("vnctargets")
    return plane


@pytest.fixture
def namespace(crd: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted (without waiting) afterwards."""
    name = f"t{next(_namespaces)}-{request.node.name.lower()[:40]}".replace("_", "-").rstrip("-")
    name = "".join(c for c in name if c.isalnum() or c == "-")[:63].rstrip("-")
    crd.kubectl("create", "namespace", name)
    yield name
    crd.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


HELM = ROOT / ".tools" / "helm" / "helm"
# The chart's admission webhook is a Service in front of the operator pod, and no pod runs here:
# with it installed, the API server would refuse every VncTarget write ("failed calling
# webhook"). Tests that install the chart leave it out; test_admission wires the webhook to an
# operator process by URL instead.
NO_POD_WEBHOOK = ("--set", "webhook.enabled=false")
CHART = ROOT / "charts" / "vncgate"
# The fixtures apply crds/ themselves (the CRD is cluster-wide and shared by every test); a
# release that rendered it too would find it there, not its own, and refuse to install.
CRD_APPLIED = ("--set", "crds.enabled=false")


def helm(plane: ControlPlane, home: Path, *args: str) -> str:
    result = subprocess.run(
        [str(HELM), *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "KUBECONFIG": str(plane.admin_kubeconfig), "HOME": str(home)})
    if result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


@dataclass(frozen=True)
class Release:
    """The chart installed for real (release `vncgate`): its RBAC, ServiceAccounts, Secrets."""

    plane: ControlPlane
    namespace: str
    home: Path

    @property
    def operator_account(self) -> str:
        return "vncgate-operator"

    @property
    def relay_account(self) -> str:
        return "vncgate-relay"


@pytest.fixture(scope="module")
def release(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory,
            request: pytest.FixtureRequest) -> Iterator[Release]:
    """`helm install` of the chart into a namespace of this test module; uninstalled after."""
    if not HELM.exists():
        pytest.fail(f"helm is not at {HELM}: run scripts/setup")
    plane = control_plane
    if plane.kubectl("get", "crd", "vnctargets.vncgate.io", check=False).returncode != 0:
        plane.kubectl("apply", "--server-side", "-f", str(CRDS))
    plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                  "crd/vnctargets.vncgate.io")
    namespace = "vncgate-" + request.module.__name__.rsplit(".", 1)[-1].removeprefix(
        "test_").replace("_", "-")
    home = tmp_path_factory.mktemp("helm-home")
    helm(plane, home, "install", "vncgate", str(CHART), "--namespace", namespace,
         "--create-namespace", "--set", "ingress.host=vnc.example.com", *NO_POD_WEBHOOK,
         *CRD_APPLIED)
    try:
        yield Release(plane, namespace, home)
    finally:
        helm(plane, home, "uninstall", "vncgate", "--namespace", namespace)
        plane.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.fixture(scope="session")
def kubevirt_api(control_plane: ControlPlane) -> Iterator[KubeVirtBackend]:
    """KubeVirt's console API as an aggregated API of the real API server. Once per session:
    removed and installed again seconds later (its namespace still terminating), the API
    server answered 503 for it."""
    plane = control_plane
    with NetworkNamespace() as netns:
        sock = netns.listen(BACKEND_PORT)
        with KubeVirtBackend(sock, serving_certificate(plane),
                             plane.certs.front_proxy_ca_crt) as backend:
            try:
                install_api_service(plane, netns, plane.certs.ca_crt)
                yield backend
            finally:
                remove_api_service(plane)
