"""The CRD as the real API server takes it: accepted, Established, documented, and every
schema bound and CEL rule enforced by the API server itself (not by the operator)."""

from __future__ import annotations

from typing import Any

import pytest

from harness.cluster import ControlPlane

ONE_ENDPOINT = "set exactly one of endpoint.service, endpoint.address or endpoint.kubevirt"


def target(namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "vncgate.io/v1alpha1", "kind": "VncTarget",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def test_crd_is_established_with_printer_columns(crd: ControlPlane) -> None:
    stored = crd.get("crd", "vnctargets.vncgate.io")
    conditions = {c["type"]: c["status"] for c in stored["status"]["conditions"]}
    assert conditions["Established"] == "True" and conditions["NamesAccepted"] == "True"
    resources = crd.kubectl("api-resources", "--api-group=vncgate.io").stdout
    assert "vnctargets" in resources and "vnc" in resources.split()


def test_explain_documents_the_fields(crd: ControlPlane) -> None:
    spec = crd.explain("vnctargets.spec")
    for field in ("endpoint", "displayName", "viewOnly", "access", "sessions"):
        assert field in spec
    endpoint = crd.explain("vnctargets.spec.endpoint")
    assert "Set exactly one of service" in endpoint


def test_a_valid_target_is_stored_and_listed_with_columns(control_plane: ControlPlane,
                                                          namespace: str) -> None:
    control_plane.apply(target(namespace, "desk-1", {
        "endpoint": {"service": {"name": "desk-1", "port": "vnc"}}, "displayName": "Desk 1",
        "sessions": {"mode": "exclusive", "takeover": "owner-only", "idleTimeout": "15m"}}))
    control_plane.apply(target(namespace, "desk-2", {
        "endpoint": {"service": {"name": "desk-2", "port": 5900}}, "thumbnail": {"enabled": True}}))
    stored = control_plane.kubectl("get", "vnc", "desk-2", "-n", namespace, "-o",
                                   "jsonpath={.spec.thumbnail.enabled}").stdout
    assert stored == "true"
    table = control_plane.kubectl("get", "vnc", "-n", namespace).stdout
    header = table.splitlines()[0].split()
    assert header[:2] == ["NAME", "ENDPOINT"] and "PHASE" in header and "URL" in header
    assert "desk-1" in table


INVALID = [
    ({"endpoint": {"service": {"name": "a", "port": 5900}}, "thumbnail": {"enabled": "yes"}},
     "spec.thumbnail.enabled"),
    ({"endpoint": {}}, ONE_ENDPOINT),
    ({"endpoint": {"service": {"name": "a", "port": 5900},
                   "address": {"host": "10.0.0.1", "port": 5900}}},
     ONE_ENDPOINT),
    ({"endpoint": {"kubevirt": {"name": "vm-1"}, "address": {"host": "10.0.0.1", "port": 5900}}},
     ONE_ENDPOINT),
    ({"endpoint": {"kubevirt": {"name": "VM_1"}}}, "spec.endpoint.kubevirt.name: Invalid value"),
    ({"endpoint": {"kubevirt": {}}}, "spec.endpoint.kubevirt.name: Required value"),
    # KubeVirt keeps one VNC connection per VM: several viewers cannot share it.
    ({"endpoint": {"kubevirt": {"name": "vm-1"}}, "sessions": {"mode": "shared"}},
     "sessions.mode shared is not offered for endpoint.kubevirt"),
    ({"endpoint": {"service": {"name": "a", "port": 0}}},
     "a port number 1-65535 or a port name of at most 15 characters"),
    ({"endpoint": {"service": {"name": "a", "port": 70000}}},
     "a port number 1-65535 or a port name of at most 15 characters"),
    ({"endpoint": {"service": {"name": "a", "port": "a-very-long-port-name"}}},
     "a port number 1-65535 or a port name of at most 15 characters"),
    ({"endpoint": {"service": {"name": "Not_A_Name", "port": 5900}}},
     "spec.endpoint.service.name: Invalid value"),
    ({"endpoint": {"address": {"host": "10.0.0.1", "port": 65536}}},
     "spec.endpoint.address.port: Invalid value: 65536"),
    ({"endpoint": {"address": {"host": "bad host!", "port": 5900}}},
     "spec.endpoint.address.host: Invalid value"),
    ({"endpoint": {"address": {"host": "10.0.0.1"}}},
     "spec.endpoint.address.port: Required value"),
    ({"displayName": "x"}, "spec.endpoint: Required value"),
    ({"endpoint": {"address": {"host": "10.0.0.1", "port": 5900}},
      "sessions": {"mode": "solo"}}, 'spec.sessions.mode: Unsupported value: "solo"'),
    ({"endpoint": {"address": {"host": "10.0.0.1", "port": 5900}},
      "sessions": {"maxViewers": 0}}, "spec.sessions.maxViewers: Invalid value: 0"),
    ({"endpoint": {"address": {"host": "10.0.0.1", "port": 5900}},
      "sessions": {"takeover": "always"}}, "spec.sessions.takeover: Unsupported value"),
    ({"endpoint": {"address": {"host": "10.0.0.1", "port": 5900}},
      "sessions": {"idleTimeout": "15 minutes"}}, "spec.sessions.idleTimeout: Invalid value"),
    ({"endpoint": {"address": {"host": "10.0.0.1", "port": 5900}},
      "displayName": "x" * 300}, "spec.displayName: Too long"),
    ({"endpoint": {"address": {"host": "10.0.0.1", "port": 5900}},
      "access": {"users": [""]}}, "spec.access.users[0]: Invalid value"),
    ({"endpoint": {"address": {"host": "10.0.0.1", "port": 5900}},
      "credentials": {"secretName": "a", "passwordEnv": "B"}},
     "set exactly one of secretName, passwordFile, passwordEnv"),
    ({"endpoint": {"address": {"host": "10.0.0.1", "port": 5900}},
      "credentials": {"password": "hunter2"}}, 'unknown field "spec.credentials.password"'),
    ({"endpoint": {"address": {"host": "10.0.0.1", "port": 5900}},
      "tls": {"caSecret": {"name": "ca"}, "insecureSkipVerify": True}},
     "insecureSkipVerify contradicts a CA"),
    ({"endpoint": {"address": {"host": "10.0.0.1", "port": 5900}},
      "recording": {"required": True}}, "recording.required needs recording.enabled true"),
]


@pytest.mark.parametrize(("spec", "message"), INVALID,
                         ids=[message[:40] for _, message in INVALID])
def test_the_api_server_rejects_what_the_schema_forbids(
        control_plane: ControlPlane, namespace: str, spec: dict[str, Any], message: str) -> None:
    result = control_plane.apply(target(namespace, "bad", spec), check=False)
    assert result.returncode != 0, f"accepted: {spec}"
    assert message in result.stderr, result.stderr
    listing = control_plane.kubectl("get", "vnc", "-n", namespace, "-o", "name").stdout
    assert "bad" not in listing


def test_a_kubevirt_target_is_stored(control_plane: ControlPlane, namespace: str) -> None:
    for name, sessions in (("vm-1", None), ("vm-2", {"mode": "exclusive",
                                                      "takeover": "allow"})):
        spec: dict[str, Any] = {"endpoint": {"kubevirt": {"name": name}}}
        if sessions is not None:
            spec["sessions"] = sessions
        control_plane.apply(target(namespace, name, spec))
    stored = control_plane.get("vnc", "vm-2", "-n", namespace)
    assert stored["spec"]["endpoint"] == {"kubevirt": {"name": "vm-2"}}


def test_unknown_fields_are_refused_not_silently_dropped(control_plane: ControlPlane,
                                                         namespace: str) -> None:
    body = target(namespace, "typo", {"endpoint": {"address": {"host": "10.0.0.1", "port": 1}},
                                      "viewonly": True})
    result = control_plane.apply(body, check=False)
    # kubectl's default field validation is Strict: a misspelt field is an error, not a no-op.
    assert result.returncode != 0 and 'unknown field "spec.viewonly"' in result.stderr


def test_status_is_a_subresource(control_plane: ControlPlane, namespace: str) -> None:
    control_plane.apply(target(namespace, "desk", {
        "endpoint": {"address": {"host": "10.0.0.1", "port": 5900}}}))
    # A write to the main resource cannot set status; only the status subresource can.
    control_plane.kubectl("patch", "vnc", "desk", "-n", namespace, "--type=merge",
                          "-p", '{"status": {"phase": "Ready"}}')
    stored = control_plane.get("vnc", "desk", "-n", namespace)
    assert (stored.get("status") or {}).get("phase") != "Ready"
    control_plane.kubectl("patch", "vnc", "desk", "-n", namespace, "--subresource=status",
                          "--type=merge", "-p", '{"status": {"phase": "Ready"}}')
    assert control_plane.get("vnc", "desk", "-n", namespace)["status"]["phase"] == "Ready"
