"""The chart's session recording: a PersistentVolumeClaim mounted where --recording-dir points,
the retention flags, ReadWriteMany for several replicas, and the recordings viewer role."""

from __future__ import annotations

from typing import Any

import pytest

from tests.chart.conftest import CHART, helm, render

RECORDING_VALUES = CHART / "ci" / "recording-values.yaml"
RELAY = "vncgate-relay"
CLAIM = "vncgate-recordings"
DIR = "/var/lib/vncgate/recordings"


def relay_pod(values: Any) -> dict[str, Any]:
    pod: dict[str, Any] = values.one("Deployment", RELAY)["spec"]["template"]["spec"]
    return pod


def test_off_by_default_no_claim_no_flag() -> None:
    rendered = render()
    assert not rendered.of_kind("PersistentVolumeClaim")
    pod = relay_pod(rendered)
    assert not [a for a in pod["containers"][0]["args"] if a.startswith("--recording-")]
    assert "recordings" not in [v["name"] for v in pod["volumes"]]


def test_claim_mounted_where_the_relay_writes_with_retention() -> None:
    rendered = render([RECORDING_VALUES])
    claim = rendered.one("PersistentVolumeClaim", CLAIM)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["storageClassName"] == "shared-files"
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    pod = relay_pod(rendered)
    container = pod["containers"][0]
    args = container["args"]
    for flag in (f"--recording-dir={DIR}", "--recording-keyframe-interval=5s",
                 "--recording-max-age=30d", "--recording-max-total=40Gi"):
        assert flag in args
    assert "--record-sessions" not in args
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["recordings"]["mountPath"] == DIR
    assert not mounts["recordings"].get("readOnly")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["recordings"]["persistentVolumeClaim"]["claimName"] == CLAIM


def test_existing_claim_is_used_and_none_made() -> None:
    rendered = render([RECORDING_VALUES], ("relay.recording.persistence.existingClaim=mine",
                                           "relay.recording.recordAll=true"))
    assert not rendered.of_kind("PersistentVolumeClaim")
    pod = relay_pod(rendered)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["recordings"]["persistentVolumeClaim"]["claimName"] == "mine"
    assert "--record-sessions" in pod["containers"][0]["args"]


def test_several_replicas_on_a_read_write_once_claim_are_refused() -> None:
    result = helm("template", "vncgate", CHART, "-f", RECORDING_VALUES,
                  "--set", "relay.recording.persistence.accessModes={ReadWriteOnce}",
                  check=False)
    assert result.returncode != 0
    assert "set relay.recording.persistence.accessModes to [ReadWriteMany]" in result.stderr


@pytest.mark.parametrize(("key", "value"), [("relay.recording.maxAge", "thirty days"),
                                            ("relay.recording.maxTotal", "40GB"),
                                            ("relay.recording.persistence.accessModes",
                                             "{ReadWriteSometimes}")])
def test_schema_refuses_bad_recording_values(key: str, value: str) -> None:
    result = helm("template", "vncgate", CHART, "--set", f"{key}={value}", check=False)
    assert result.returncode != 0
    assert "recording" in result.stderr


def test_recordings_viewer_role_grants_only_get_on_the_subresource() -> None:
    role = render().one("ClusterRole", "vncgate-recordings-viewer")
    assert role["rules"] == [{"apiGroups": ["vncgate.io"], "resources": ["vnctargets/recordings"],
                              "verbs": ["get"]}]
