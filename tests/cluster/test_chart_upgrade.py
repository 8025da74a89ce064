"""`helm upgrade` from an earlier chart updates the VncTarget CRD, on the real API server.

The earlier chart is the repository's chart as of just before the last commit that changed the
spec of crds/vnctargets.vncgate.io.yaml, so its CRD is the previous one. Charts up to 0.2
carried the CRD in their crds/ folder, which Helm installs once without making it part of the
release; the first upgrade to a chart that renders it from a template takes it over
(`--take-ownership`, as docs/KUBERNETES.md says). From then on every upgrade updates it, and
uninstall leaves it.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.cluster import ControlPlane
from harness.waiting import wait_until
from tests.cluster.conftest import CHART, CRDS, HELM, NO_POD_WEBHOOK, helm

ROOT = CHART.parents[1]
CRD_FILE = "crds/vnctargets.vncgate.io.yaml"
CRD_NAME = "vnctargets.vncgate.io"
RELEASE = "upgrade"
NAMESPACE = "vncgate-upgrade"
TEAM = "vncgate-upgrade-lab"


def git(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, timeout=60,
                          check=False)


def previous_chart(into: Path) -> tuple[Path, str]:
    """The chart as of the parent of the last commit that changed the CRD's spec (not only its
    comments), and that parent."""
    log = git("log", "--format=%H", "--", CRD_FILE)
    if log.returncode != 0 or not log.stdout.strip():
        why = f"no git history of {CRD_FILE} here (not a git checkout?)"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    for commit in log.stdout.decode().split():
        before = git("show", f"{commit}^:{CRD_FILE}")
        if before.returncode != 0:
            break  # the commit that made the file: no earlier CRD
        after = git("show", f"{commit}:{CRD_FILE}")
        if yaml.safe_load(before.stdout)["spec"] != yaml.safe_load(after.stdout)["spec"]:
            archive = git("archive", "--format=tar", f"{commit}^", "charts/vncgate")
            assert archive.returncode == 0, archive.stderr.decode()
            with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
                tar.extractall(into, filter="data")
            return into / "charts" / "vncgate", f"{commit}^"
    pytest.fail(f"no commit changed the spec of {CRD_FILE}")


def stored_schema(plane: ControlPlane) -> Any:
    return plane.get("crd", CRD_NAME)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def schema_of(text: str) -> Any:
    return yaml.safe_load(text)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def delete_crd(plane: ControlPlane) -> None:
    plane.kubectl("delete", "crd", CRD_NAME, "--ignore-not-found", "--timeout=60s")
    wait_until(lambda: plane.kubectl("get", "crd", CRD_NAME, check=False).returncode != 0,
               f"crd/{CRD_NAME} deleted")


def test_helm_upgrade_from_the_previous_chart_updates_the_crd(control_plane: ControlPlane,
                                                              tmp_path: Path) -> None:
    if not HELM.exists():
        pytest.fail(f"helm is not at {HELM}: run scripts/setup")
    plane = control_plane
    old_chart, previous = previous_chart(tmp_path / "previous")
    old_crd = git("show", f"{previous}:{CRD_FILE}")
    assert old_crd.returncode == 0, old_crd.stderr.decode()
    old_schema = schema_of(old_crd.stdout.decode())
    new_schema = schema_of((ROOT / CRD_FILE).read_text())
    old_values = yaml.safe_load((old_chart / "values.yaml").read_text())
    old_sets = ["--set", "ingress.host=vnc.example.com"]
    if "webhook" in old_values:
        old_sets += list(NO_POD_WEBHOOK)
    from_crds_folder = (old_chart / "crds").is_dir()

    # A cluster where the previous chart was installed: its CRD, and a VncTarget stored in it.
    delete_crd(plane)
    home = tmp_path / "home"
    home.mkdir()
    helm(plane, home, "install", RELEASE, str(old_chart), "--namespace", NAMESPACE,
         "--create-namespace", *old_sets)
    try:
        plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{CRD_NAME}")
        assert stored_schema(plane) == old_schema
        plane.kubectl("create", "namespace", TEAM)
        plane.apply({"apiVersion": "vncgate.io/v1alpha1", "kind": "VncTarget",
                     "metadata": {"name": "bmc-1", "namespace": TEAM},
                     "spec": {"endpoint": {"address": {"host": "10.20.0.15", "port": 5900}}}})

        helm(plane, home, "upgrade", RELEASE, str(CHART), "--namespace", NAMESPACE,
             "--reset-then-reuse-values", *NO_POD_WEBHOOK,
             *(["--take-ownership"] if from_crds_folder else []))
        wait_until(lambda: stored_schema(plane) == new_schema,
                   "the API server serving the CRD of crds/")
        crd = plane.get("crd", CRD_NAME)
        assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == RELEASE
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{CRD_NAME}")
        assert plane.get("vnctarget", "bmc-1", "-n", TEAM)["spec"]["endpoint"]["address"][
            "host"] == "10.20.0.15", "the stored VncTarget survives the upgrade"
        # The release's ClusterRoles carry its name (a second release would not collide).
        roles = {r["metadata"]["name"] for r in plane.get(
            "clusterroles", "-l", f"app.kubernetes.io/instance={RELEASE}")["items"]}
        assert {f"{RELEASE}-vncgate-viewer", f"{RELEASE}-vncgate-editor",
                f"{RELEASE}-vncgate-admin"} <= roles

        # An upgrade of the chart as it is now keeps it (nothing to take over any more).
        helm(plane, home, "upgrade", RELEASE, str(CHART), "--namespace", NAMESPACE,
             "--reset-then-reuse-values", "--set", "relay.replicas=2")
        assert stored_schema(plane) == new_schema

        # Uninstall leaves the CRD and every VncTarget (crds.keep).
        helm(plane, home, "uninstall", RELEASE, "--namespace", NAMESPACE)
        plane.get("crd", CRD_NAME)
        plane.get("vnctarget", "bmc-1", "-n", TEAM)
    finally:
        subprocess.run([str(HELM), "uninstall", RELEASE, "--namespace", NAMESPACE],
                       capture_output=True, timeout=120, check=False,
                       env={**os.environ, "KUBECONFIG": str(plane.admin_kubeconfig),
                            "HOME": str(home)})
        plane.kubectl("delete", "namespace", NAMESPACE, TEAM, "--wait=false", check=False)
        # Leave the CRD as the other tests' fixtures apply it: crds/, outside any release.
        delete_crd(plane)
        plane.kubectl("apply", "--server-side", "-f", str(CRDS))
