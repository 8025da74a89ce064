"""The chart's pod settings, installed for real: the API server accepts the Deployments,
Services and NetworkPolicies that ci/pod-settings-values.yaml renders (the custom resources of
the monitoring and Gateway API values need CRDs this API server does not have)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.cluster import ControlPlane
from tests.cluster.conftest import CHART, CRD_APPLIED, HELM, helm

VALUES = CHART / "ci" / "pod-settings-values.yaml"


def test_pod_settings_are_accepted(control_plane: ControlPlane, crd: ControlPlane,
                                   tmp_path: Path) -> None:
    if not HELM.exists():
        pytest.fail(f"helm is not at {HELM}: run scripts/setup")
    namespace = "vncgate-pod-settings"
    helm(control_plane, tmp_path, "install", "vncgate", str(CHART), "--namespace", namespace,
         "--create-namespace", "--values", str(VALUES),
         "--set", "operator.metrics.enabled=true", *CRD_APPLIED)
    try:
        for component in ("relay", "operator"):
            deployment = control_plane.get("deployment", f"vncgate-{component}", "-n", namespace)
            template = deployment["spec"]["template"]
            assert template["metadata"]["labels"]["cost-center"] == "lab"
            pod = template["spec"]
            assert pod["priorityClassName"] == "system-cluster-critical"
            assert pod["tolerations"][0]["key"] == "dedicated"
            assert pod["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"][
                "app.kubernetes.io/component"] == component
            assert any(v["name"] == "extra-ca" for v in pod["volumes"])
        policy = control_plane.get("networkpolicy", "vncgate-operator", "-n", namespace)
        assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == \
            "operator"
        control_plane.get("service", "vncgate-operator-metrics", "-n", namespace)
    finally:
        helm(control_plane, tmp_path, "uninstall", "vncgate", "--namespace", namespace)
        control_plane.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_conventions_are_accepted(control_plane: ControlPlane, crd: ControlPlane,
                                  tmp_path: Path) -> None:
    """ci/conventions-values.yaml for real: the relay's egress policy, several Ingress hosts
    and TLS entries, an extra object through tpl, the mirrored image."""
    if not HELM.exists():
        pytest.fail(f"helm is not at {HELM}: run scripts/setup")
    namespace = "vncgate-conventions"
    helm(control_plane, tmp_path, "install", "lab", str(CHART), "--namespace", namespace,
         "--create-namespace", "--values", str(CHART / "ci" / "conventions-values.yaml"),
         *CRD_APPLIED)
    try:
        policy = control_plane.get("networkpolicy", "lab-vncgate-relay", "-n", namespace)
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
        assert policy["spec"]["egress"][0]["ports"] == [
            {"port": 5900, "endPort": 5999, "protocol": "TCP"}]
        ingress = control_plane.get("ingress", "lab-vncgate", "-n", namespace)
        assert [r["host"] for r in ingress["spec"]["rules"]] == ["vnc.example.com",
                                                                 "vnc.lab.example.com"]
        assert len(ingress["spec"]["tls"]) == 2
        assert control_plane.get("configmap", "lab-site", "-n", namespace)["data"] == {
            "site": "lab"}
        relay = control_plane.get("deployment", "lab-vncgate-relay", "-n", namespace)
        assert relay["spec"]["template"]["spec"]["containers"][0]["image"].startswith(
            "mirror.example.com/vncgate/vncgate:")
        control_plane.get("clusterrole", "lab-vncgate-viewer")
    finally:
        helm(control_plane, tmp_path, "uninstall", "lab", "--namespace", namespace)
        control_plane.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
