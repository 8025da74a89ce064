"""`scripts/release VERSION` as a release manager runs it, with a test version, and each artifact
installed in a clean place as an adopter installs it: the wheel into a fresh venv (the relay
serves the noVNC client from it), the plugin's distribution alone (none of the server's
packages), the plugin's zipapp started directly and from its krew archive in krew's layout
through the real kubectl's plugin lookup against the real API server, the packaged chart with
`helm install` into the real API server, and the image's OCI archive run with buildah.

The image needs root, buildah and debootstrap (as tests/image): where this machine lacks them the
release is built with --no-image and the image's tests skip, saying why; in CI (`CI=true`) the
image is always built. That adds about a minute to CI once the Debian bases are cached
(scripts/build-image keeps them), a few minutes the first time. The digest pinning of the chart
packaging is also checked alone, with a made-up digest, so it runs everywhere.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import aiohttp
import pytest
import yaml

from harness.cluster import ControlPlane, free_port
from harness.waiting import eventually
from tests.cluster.conftest import CRD_APPLIED, HELM, NO_POD_WEBHOOK
from tests.conftest import ROOT
from tests.image.conftest import IN_CI, SBIN_PATH, cannot_build_reason
from tests.support.processes import ConsoleScript

# The first test waits for the release build (the image's Debian bases, if not yet cached, take
# a few minutes on a loaded machine).
pytestmark = pytest.mark.timeout(1800)

VERSION = "0.0.0-dev.0"
PYVERSION = "0.0.0.dev0"
RELEASE_SCRIPT = ROOT / "scripts" / "release"
NOVNC_CORE = ROOT / "node_modules" / "@novnc" / "novnc" / "core"
DIGEST = "sha256:" + "ab" * 32
SERVER_PACKAGES = ("kopf", "kubernetes", "cryptography", "jinja2", "prometheus_client")


IMAGE_SKIPPED = None if IN_CI else cannot_build_reason()


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("release") / VERSION
    command = [str(RELEASE_SCRIPT), VERSION, "--out", str(out),
               *(["--no-image"] if IMAGE_SKIPPED else [])]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1500, check=False,
                            cwd=ROOT)
    assert result.returncode == 0, f"scripts/release failed:\n{result.stdout}{result.stderr}"
    return out


def image_archive(dist: Path) -> Path:
    if IMAGE_SKIPPED:
        pytest.skip(f"the release was built without the image: {IMAGE_SKIPPED}")
    return dist / f"vncgate-image-{VERSION}.oci.tar"


def archive_digest(archive: Path) -> str:
    """The manifest digest in the OCI archive's index.json (the image as a registry serves it)."""
    with tarfile.open(archive) as tar:
        index = tar.extractfile("index.json")
        assert index is not None
        (manifest,) = json.load(index)["manifests"]
    assert manifest["annotations"]["org.opencontainers.image.ref.name"] == \
        f"ghcr.io/vncgate/vncgate:{VERSION}"
    digest: str = manifest["digest"]
    return digest


def released_image(dist: Path) -> str:
    """The image reference the packaged chart should pull."""
    if IMAGE_SKIPPED:
        return f"ghcr.io/vncgate/vncgate:{VERSION}"
    return f"ghcr.io/vncgate/vncgate@{archive_digest(image_archive(dist))}"


def release_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("release", ROOT / "scripts" / "release.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fresh_venv(folder: Path) -> Path:
    """A new virtual environment with pip, nothing of this project in it; its bin folder."""
    venv.EnvBuilder(with_pip=True, clear=True).create(folder)
    return folder / "bin"


def pip_install(bin_dir: Path, *what: str | Path) -> None:
    result = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet",
                             "--disable-pip-version-check", *map(str, what)],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"pip install {what} failed:\n{result.stdout}{result.stderr}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_artifact_is_listed_with_its_checksum(dist: Path) -> None:
    names = {path.name for path in dist.iterdir()}
    assert names == {
        f"vncgate-{PYVERSION}-py3-none-any.whl", f"vncgate-{PYVERSION}.tar.gz",
        f"vncgate_kubectl-{PYVERSION}-py3-none-any.whl", f"vncgate_kubectl-{PYVERSION}.tar.gz",
        "kubectl-vnc.pyz", "kubectl-vnc.tar.gz", "vnc.yaml", f"vncgate-{VERSION}.tgz",
        "index.yaml", f"vncgate-{VERSION}.cdx.json", "SHA256SUMS",
        *([] if IMAGE_SKIPPED else [f"vncgate-image-{VERSION}.oci.tar"])}
    listed = {name: digest for digest, name in
              (line.split("  ") for line in (dist / "SHA256SUMS").read_text().splitlines())}
    assert set(listed) == names - {"SHA256SUMS"}
    check = subprocess.run(["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=dist,
                           capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_work_tree_keeps_its_version(dist: Path) -> None:
    assert f'__version__ = "{PYVERSION}"' not in (ROOT / "common/__init__.py").read_text()
    assert f'version = "{PYVERSION}"' not in (ROOT / "pyproject.toml").read_text()


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, separator, pinned = line.split("#")[0].strip().partition("==")
        if separator:
            pins[name.strip().lower().replace("_", "-")] = pinned.strip()
    return pins


def test_the_sbom_lists_the_images_python_packages(dist: Path) -> None:
    """Every Python package the image installs, at the version constraints.txt pins (the
    Dockerfile installs the wheel with it); vncgate itself is the root component."""
    sbom = json.loads((dist / f"vncgate-{VERSION}.cdx.json").read_text())
    assert sbom["bomFormat"] == "CycloneDX"
    assert sbom["metadata"]["component"]["name"] == "vncgate"
    assert sbom["metadata"]["component"]["version"] == PYVERSION
    components = {component["name"].lower().replace("_", "-"): component
                  for component in sbom["components"]}
    assert "vncgate" not in components
    for package in ("aiohttp", "kopf", "kubernetes", "cryptography", "jinja2", "pyyaml"):
        assert package in components, package
    pins = constraint_pins()
    for name, component in components.items():
        assert component["purl"] == f"pkg:pypi/{name}@{component['version']}"
        if name in pins:
            assert component["version"] == pins[name], name


@pytest.fixture
def wheel_venv(dist: Path, tmp_path: Path) -> Path:
    """The wheel installed into a new venv, as `pip install vncgate-VERSION-py3-none-any.whl`."""
    bin_dir = fresh_venv(tmp_path / "venv")
    pip_install(bin_dir, dist / f"vncgate-{PYVERSION}-py3-none-any.whl")
    where = subprocess.run(
        [str(bin_dir / "python"), "-c", "import importlib.metadata as m, vncgate.relay; "
         "print(m.version('vncgate'), vncgate.relay.__file__)"],
        capture_output=True, text=True, timeout=60, check=True, cwd=tmp_path)
    version, location = where.stdout.split()
    assert version == PYVERSION
    assert location.startswith(str(tmp_path / "venv")), "the installed copy, not the work tree"
    return bin_dir


async def test_the_wheel_installs_alone_and_serves_the_viewer(
        wheel_venv: Path, tmp_path: Path) -> None:
    port, internal = free_port(), free_port()
    relay = ConsoleScript("vncgate-relay", ["--listen", f"127.0.0.1:{port}", "--internal-listen",
                                            f"127.0.0.1:{internal}", "--target",
                                            f"lab/desk=127.0.0.1:{free_port()}"], tmp_path,
                          bin_dir=wheel_venv)
    with relay:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            async def serving() -> bool:
                try:
                    async with http.get(f"{base}/healthz") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await eventually(serving, "the relay from the wheel answering /healthz", timeout=60)
            async with http.get(f"{base}/static/novnc/core/rfb.js") as response:
                assert response.status == 200
                assert await response.read() == (NOVNC_CORE / "rfb.js").read_bytes()
            async with http.get(f"{base}/t/lab/desk/") as response:
                assert response.status == 200
                assert "static/novnc/viewer.js" in await response.text()


def test_the_plugin_distribution_installs_without_the_server(
        dist: Path, tmp_path: Path) -> None:
    bin_dir = fresh_venv(tmp_path / "venv")
    pip_install(bin_dir, dist / f"vncgate_kubectl-{PYVERSION}-py3-none-any.whl")
    result = subprocess.run([str(bin_dir / "kubectl-vnc"), "--version"], capture_output=True,
                            text=True, timeout=60, check=False)
    assert (result.returncode, result.stdout.strip()) == (0, f"kubectl-vnc {PYVERSION}")
    present = subprocess.run(
        [str(bin_dir / "python"), "-c", "import importlib.util as u, sys; print(' '.join("
         "name for name in sys.argv[1:] if u.find_spec(name)))", *SERVER_PACKAGES],
        capture_output=True, text=True, timeout=60, check=True)
    assert present.stdout.split() == [], "the plugin pulled in packages of the server"


def test_the_zipapp_holds_pure_python_only(dist: Path, tmp_path: Path) -> None:
    """Pure Python only (one file for Linux and macOS) and none of the server's packages."""
    with zipfile.ZipFile(dist / "kubectl-vnc.pyz") as archive:
        names = archive.namelist()
    assert any(name.endswith("vncgate/kubectl/cli.py") for name in names)
    assert any(name.endswith("kubernetes_asyncio/config/kube_config.py") for name in names)
    compiled = [name for name in names if name.endswith((".so", ".pyd", ".dylib"))]
    assert compiled == []
    for package in SERVER_PACKAGES:
        assert not any(f"site-packages/{package}/" in name for name in names), package
    # Started directly (its `#!/usr/bin/env python3` line) with the system's Python alone, and
    # with this project's Python, where another vncgate (the work tree's) is installed: the
    # archive's own version either way.
    direct = subprocess.run([str(dist / "kubectl-vnc.pyz"), "--version"], capture_output=True,
                            text=True, timeout=120, check=False,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert (direct.returncode, direct.stdout.strip()) == (0, f"kubectl-vnc {PYVERSION}"), \
        direct.stderr
    beside = subprocess.run([sys.executable, str(dist / "kubectl-vnc.pyz"), "--version"],
                            capture_output=True, text=True, timeout=120, check=False,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert (beside.returncode, beside.stdout.strip()) == (0, f"kubectl-vnc {PYVERSION}"), \
        beside.stderr


@pytest.fixture
def krew_home(dist: Path, tmp_path: Path) -> Path:
    """The plugin as `kubectl krew install --manifest=vnc.yaml --archive=kubectl-vnc.tar.gz`
    lays it out: the archive unpacked into store/vnc/<version>/, the manifest's files there,
    a receipt, and bin/kubectl-vnc a symlink to the manifest's `bin`."""
    manifest = yaml.safe_load((dist / "vnc.yaml").read_text())
    (platform,) = manifest["spec"]["platforms"]
    archive = dist / Path(platform["uri"]).name
    assert platform["sha256"] == sha256(archive), "the manifest's sha256 is the archive's"
    assert manifest["spec"]["version"] == f"v{VERSION}"
    assert f"/v{VERSION}/" in platform["uri"]
    krew = tmp_path / ".krew"
    unpacked = tmp_path / "unpacked"
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["LICENSE", "kubectl-vnc"]
        tar.extractall(unpacked, filter="data")
    store = krew / "store" / "vnc" / manifest["spec"]["version"]
    store.mkdir(parents=True)
    for item in platform["files"]:
        (unpacked / item["from"]).rename(store / Path(item["from"]).name)
    (krew / "receipts").mkdir()
    (krew / "receipts" / "vnc.yaml").write_text((dist / "vnc.yaml").read_text())
    (krew / "bin").mkdir()
    (krew / "bin" / "kubectl-vnc").symlink_to(store / platform["bin"])
    return krew


def test_kubectl_runs_the_plugin_from_its_krew_archive(
        krew_home: Path, crd: ControlPlane, namespace: str, tmp_path: Path) -> None:
    plane = crd
    plane.apply({"apiVersion": "vncgate.io/v1alpha1", "kind": "VncTarget",
                 "metadata": {"name": "desk-from-release", "namespace": namespace},
                 "spec": {"endpoint": {"address": {"host": "127.0.0.1", "port": 5999}}}})
    # Only the system's python3 and krew's bin folder: nothing of this project's venv.
    env = {"PATH": f"{krew_home / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path),
           "KUBECONFIG": str(plane.admin_kubeconfig)}
    kubectl = str(plane.bin / "kubectl")

    def plugin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([kubectl, "vnc", *args], env=env, capture_output=True, text=True,
                              timeout=120, check=False)

    usage = plugin("--help")
    assert usage.returncode == 0, usage.stderr
    assert usage.stdout.startswith("usage: kubectl vnc ")
    assert all(f"    {command} " in usage.stdout for command in
               ("list", "open", "link", "proxy", "sessions", "kill"))
    version = plugin("--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"kubectl-vnc {PYVERSION}"), \
        version.stderr
    listing = plugin("list", "-n", namespace)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines()[0].split() == ["NAME", "PHASE", "VIEWERS", "URL"]
    assert listing.stdout.splitlines()[1].split()[0] == "desk-from-release"


def helm(plane: ControlPlane, home: Path, *args: str | Path) -> str:
    result = subprocess.run([str(HELM), *map(str, args)], capture_output=True, text=True,
                            timeout=180, check=False,
                            env={**os.environ, "KUBECONFIG": str(plane.admin_kubeconfig),
                                 "HOME": str(home)})
    assert result.returncode == 0, f"helm {args} failed:\n{result.stdout}{result.stderr}"
    return result.stdout


def test_the_packaged_chart_and_its_index(dist: Path) -> None:
    index = yaml.safe_load((dist / "index.yaml").read_text())
    (entry,) = index["entries"]["vncgate"]
    assert (entry["version"], entry["appVersion"]) == (VERSION, VERSION)
    assert entry["digest"] == sha256(dist / f"vncgate-{VERSION}.tgz")
    assert entry["urls"] == [f"https://github.com/vncgate/vncgate/releases/download/v{VERSION}/"
                             f"vncgate-{VERSION}.tgz"]


@pytest.fixture
def chart_release(dist: Path, control_plane: ControlPlane,
                  tmp_path: Path) -> Iterator[tuple[ControlPlane, str, Path]]:
    plane, namespace, home = control_plane, "release-chart", tmp_path / "helm-home"
    home.mkdir()
    # Without the admission webhook, whose Service has no pod here (see NO_POD_WEBHOOK):
    # installed, it would refuse the VncTarget writes of the tests that follow.
    helm(plane, home, "install", "vncgate", dist / f"vncgate-{VERSION}.tgz", "--namespace",
         namespace, "--create-namespace", "--set", "ingress.host=vnc.example.com",
         *NO_POD_WEBHOOK, *CRD_APPLIED)
    try:
        yield plane, namespace, home
    finally:
        helm(plane, home, "uninstall", "vncgate", "--namespace", namespace)
        plane.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_the_packaged_chart_installs_into_the_api_server(
        dist: Path, chart_release: tuple[ControlPlane, str, Path]) -> None:
    plane, namespace, home = chart_release
    (listed,) = json.loads(helm(plane, home, "list", "--namespace", namespace, "-o", "json"))
    assert (listed["chart"], listed["app_version"], listed["status"]) == (
        f"vncgate-{VERSION}", VERSION, "deployed")
    deployments = plane.get("deployments", "-n", namespace)["items"]
    assert deployments, "the chart made no Deployment"
    images = {container["image"] for deployment in deployments
              for container in deployment["spec"]["template"]["spec"]["containers"]}
    assert images == {released_image(dist)}


def test_the_image_archive_is_the_release_and_pinned_in_the_chart(
        dist: Path, tmp_path: Path) -> None:
    """The OCI archive holds this version's relay and operator, and the packaged chart pulls
    exactly that manifest by digest."""
    archive = image_archive(dist)
    digest = archive_digest(archive)
    with tarfile.open(dist / f"vncgate-{VERSION}.tgz") as tar:
        values = tar.extractfile("vncgate/values.yaml")
        assert values is not None
        assert yaml.safe_load(values)["image"]["digest"] == digest
    env = {**os.environ, "PATH": SBIN_PATH}

    def buildah(*args: str) -> str:
        result = subprocess.run(["buildah", *args], capture_output=True, text=True,
                                timeout=600, check=False, env=env)
        assert result.returncode == 0, f"buildah {args} failed:\n{result.stderr}"
        return result.stdout.strip()

    image_id = buildah("pull", "--quiet", f"oci-archive:{archive}")
    container = f"vncgate-release-test-{os.getpid()}"
    try:
        buildah("from", "--pull-never", "--name", container, image_id)
        for command in ("vncgate-relay", "vncgate-operator"):
            assert buildah("run", "--isolation", "chroot", container, "--", command,
                           "--version") == f"{command} {PYVERSION}"
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True, timeout=120,
                       check=False, env=env)
        subprocess.run(["buildah", "rmi", image_id], capture_output=True, timeout=120,
                       check=False, env=env)


def test_a_release_with_an_image_pins_its_digest_in_the_chart(tmp_path: Path) -> None:
    """The chart packaging of scripts/release with an image's digest (no image built here):
    the packaged values pull the image by that digest."""
    release = release_module()
    out = tmp_path / "out"
    out.mkdir()
    release.build_chart(ROOT, tmp_path, out, VERSION, DIGEST)
    packaged = out / f"vncgate-{VERSION}.tgz"
    with tarfile.open(packaged) as tar:
        values = tar.extractfile("vncgate/values.yaml")
        assert values is not None
        assert yaml.safe_load(values)["image"]["digest"] == DIGEST
    rendered = subprocess.run([str(HELM), "template", "vncgate", str(packaged), "--set",
                               "ingress.host=vnc.example.com"], capture_output=True, text=True,
                              timeout=120, check=True, env={**os.environ, "HOME": str(tmp_path)})
    images = {document["spec"]["template"]["spec"]["containers"][0]["image"]
              for document in yaml.safe_load_all(rendered.stdout)
              if document and document.get("kind") == "Deployment"}
    assert images == {f"ghcr.io/vncgate/vncgate@{DIGEST}"}
