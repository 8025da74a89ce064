"""What an experienced Helm user expects of a chart: images from a mirror, tunable probes, extra
manifests, several Ingress hosts, an egress policy, Chart.yaml's links."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.conftest import CHART, Rendered, helm, render

RELAY = "vncgate-relay"
OPERATOR = "vncgate-operator"


def container(rendered: Rendered, deployment: str) -> dict[str, Any]:
    (found,) = rendered.one("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return found


def images(rendered: Rendered) -> set[str]:
    return {c["image"] for _, c in rendered.containers()}


@pytest.mark.parametrize(("sets", "image"), [
    ((), "ghcr.io/vncgate/vncgate:0.1.0"),
    (("global.imageRegistry=mirror.example.com",), "mirror.example.com/vncgate/vncgate:0.1.0"),
    (("image.registry=registry.example.com:5000",),
     "registry.example.com:5000/vncgate/vncgate:0.1.0"),
    # image.registry wins over the umbrella chart's mirror.
    (("global.imageRegistry=mirror.example.com", "image.registry=own.example.com"),
     "own.example.com/vncgate/vncgate:0.1.0"),
    # A repository without a registry part gets the registry in front of it.
    (("image.registry=mirror.example.com", "image.repository=team/vncgate"),
     "mirror.example.com/team/vncgate:0.1.0"),
    (("image.registry=mirror.example.com", "image.digest=sha256:" + "a" * 64),
     "mirror.example.com/vncgate/vncgate@sha256:" + "a" * 64),
])
def test_image_registry_replaces_the_repository_s(sets: tuple[str, ...], image: str) -> None:
    assert images(render(sets=sets)) == {image}


def test_probes_are_tunable_and_keep_their_handlers() -> None:
    rendered = render(sets=["relay.startupProbe.failureThreshold=90",
                            "relay.readinessProbe.periodSeconds=2",
                            "operator.livenessProbe.initialDelaySeconds=40"])
    relay = container(rendered, RELAY)
    assert relay["startupProbe"] == {"httpGet": {"path": "/healthz", "port": "http"},
                                     "periodSeconds": 2, "failureThreshold": 90}
    assert relay["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert relay["readinessProbe"]["periodSeconds"] == 2
    assert relay["livenessProbe"]["timeoutSeconds"] == 3, "the defaults stay"
    operator = container(rendered, OPERATOR)
    assert operator["livenessProbe"]["initialDelaySeconds"] == 40
    assert operator["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "liveness"}
    # Only timing: the handler is the chart's.
    result = helm("template", "vncgate", CHART, "--set", "relay.livenessProbe.exec.command={true}",
                  check=False)
    assert result.returncode != 0
    assert "at '/relay/livenessProbe': additional properties 'exec' not allowed" in result.stderr


def test_relay_metrics_have_a_port_of_their_own() -> None:
    rendered = render(sets=["relay.metrics.port=9100"])
    relay = container(rendered, RELAY)
    assert "--metrics-listen=0.0.0.0:9100" in relay["args"]
    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in relay["ports"]
    for port in ("8080", "8081"):
        result = helm("template", "vncgate", CHART, "--set", f"relay.metrics.port={port}",
                      check=False)
        assert result.returncode != 0
        assert "/relay/metrics/port" in result.stderr


def test_extra_objects_as_objects_and_strings_through_tpl() -> None:
    values = {"extraObjects": [
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "{{ .Release.Name }}-extra", "namespace": "{{ .Release.Namespace }}"},
         "data": {"a": "b"}},
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {{ .Release.Name }}-string\n"
        "stringData:\n  k: v\n"]}
    rendered = render_values(values)
    config_map = rendered.one("ConfigMap", "vncgate-extra")
    assert config_map["metadata"]["namespace"] == "vncgate-system"
    assert config_map["data"] == {"a": "b"}
    rendered.one("Secret", "vncgate-string")


def render_values(values: dict[str, Any]) -> Rendered:
    """`helm template` with these values (a values file: lists of objects, unlike --set)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "values.yaml"
        path.write_text(yaml.safe_dump(values))
        result = helm("template", "vncgate", CHART, "--namespace", "vncgate-system",
                      "--values", path)
    return Rendered(tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc))


def test_several_ingress_hosts_and_tls_entries() -> None:
    rendered = render_values({"ingress": {
        "host": "vnc.example.com", "extraHosts": ["vnc.lab.example.com", "consoles.example.org"],
        "tls": {"enabled": True, "secretName": "vnc-tls",
                "extra": [{"hosts": ["vnc.lab.example.com"], "secretName": "lab-tls"},
                          {"hosts": ["consoles.example.org"], "secretName": "org-tls"}]}}})
    spec = rendered.one("Ingress", "vncgate")["spec"]
    assert [r["host"] for r in spec["rules"]] == [
        "vnc.example.com", "vnc.lab.example.com", "consoles.example.org"]
    assert {r["http"]["paths"][0]["backend"]["service"]["name"] for r in spec["rules"]} == {RELAY}
    assert spec["tls"] == [{"hosts": ["vnc.example.com"], "secretName": "vnc-tls"},
                           {"hosts": ["vnc.lab.example.com"], "secretName": "lab-tls"},
                           {"hosts": ["consoles.example.org"], "secretName": "org-tls"}]
    args = container(rendered, RELAY)["args"]
    # The relay answers to every host (DNS rebinding check) and accepts WebSockets from each.
    for host in ("vnc.lab.example.com", "consoles.example.org"):
        assert f"--allowed-host={host}" in args
        assert f"--allowed-origin=https://{host}" in args
    assert "--public-url=https://vnc.example.com" in args, "the first host is the public URL"


def test_relay_egress_policy_only_to_vnc_api_server_dns_and_peers() -> None:
    vnc = [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    api = [{"ipBlock": {"cidr": "10.0.0.10/32"}}]
    rendered = render_values({"networkPolicy": {"relayEgress": {
        "enabled": True, "vncTo": vnc, "vncPorts": [{"port": 5900, "endPort": 5999}],
        "apiServerTo": api}}})
    policy = rendered.one("NetworkPolicy", RELAY)["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    relay_labels = rendered.one("Deployment", RELAY)["spec"]["selector"]["matchLabels"]
    assert policy["egress"] == [
        {"to": vnc, "ports": [{"port": 5900, "endPort": 5999}]},
        {"to": api, "ports": [{"port": 443}, {"port": 6443}]},
        {"to": [{"podSelector": {"matchLabels": relay_labels}}],
         "ports": [{"port": 8081, "protocol": "TCP"}]},
        {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}]
    # Every rule names its peers or its ports: none opens everything.
    for rule in policy["egress"]:
        assert rule.get("to") or rule.get("ports")


@pytest.mark.parametrize(("sets", "words"), [
    (("networkPolicy.relayEgress.enabled=true",), "needs networkPolicy.relayEgress.vncTo"),
    (("networkPolicy.relayEgress.enabled=true",
      "networkPolicy.relayEgress.vncTo[0].ipBlock.cidr=10.20.0.0/16"),
     "needs networkPolicy.relayEgress.apiServerTo"),
])
def test_relay_egress_policy_refuses_to_cut_the_relay_off(sets: tuple[str, ...],
                                                          words: str) -> None:
    result = helm("template", "vncgate", CHART, *[a for s in sets for a in ("--set", s)],
                  check=False)
    assert result.returncode != 0
    assert words in result.stderr


def test_chart_yaml_links_where_it_comes_from() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["home"].startswith("https://")
    assert chart["sources"] and all(s.startswith("https://") for s in chart["sources"])
    assert chart["maintainers"] and all(m.get("name") for m in chart["maintainers"])
