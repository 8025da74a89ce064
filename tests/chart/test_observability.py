"""The chart's Gateway API route, ServiceMonitors, PrometheusRule and Grafana dashboard: their
shape (kubernetes-validate has no schemas for these custom resources), that they point at what
the chart renders, and that every metric they query is one the relay or the operator exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.chart.conftest import CHART, Rendered, helm, render
from vncgate.operator.metrics import OperatorMetrics
from vncgate.relay.metrics import RelayMetrics

CI = CHART / "ci"
MONITORING = CI / "monitoring-values.yaml"
GATEWAY = CI / "gateway-api-values.yaml"
POD_SETTINGS = CI / "pod-settings-values.yaml"

NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253}
METADATA = {"type": "object", "required": ["name", "namespace", "labels"],
            "properties": {"name": NAME, "namespace": NAME,
                           "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                           "annotations": {"type": "object",
                                           "additionalProperties": {"type": "string"}}}}
# The fields of gateway.networking.k8s.io/v1 HTTPRoute that the chart writes, as the Gateway API
# CRD (v1.x) defines them; unknown fields are refused as the API server would (strict).
HOSTNAME = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
GATEWAY_DURATION = {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"}
HTTPROUTE = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "gateway.networking.k8s.io/v1"}, "kind": {"const": "HTTPRoute"},
        "metadata": METADATA,
        "spec": {"type": "object", "additionalProperties": False, "required": ["parentRefs"],
                 "properties": {
            "parentRefs": {"type": "array", "minItems": 1, "maxItems": 32, "items": {
                "type": "object", "required": ["name"], "additionalProperties": False,
                "properties": {"name": NAME, "namespace": NAME, "sectionName": NAME,
                               "group": {"type": "string"}, "kind": {"type": "string"},
                               "port": {"type": "integer", "minimum": 1, "maximum": 65535}}}},
            "hostnames": {"type": "array", "maxItems": 16, "items": {
                "type": "string", "pattern": HOSTNAME}},
            "rules": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "properties": {
                    "matches": {"type": "array", "items": {
                        "type": "object", "additionalProperties": False, "properties": {
                            "path": {"type": "object", "additionalProperties": False,
                                     "required": ["type", "value"], "properties": {
                                         "type": {"enum": ["Exact", "PathPrefix",
                                                           "RegularExpression"]},
                                         "value": {"type": "string", "pattern": "^/"}}}}}},
                    "backendRefs": {"type": "array", "items": {
                        "type": "object", "required": ["name", "port"],
                        "additionalProperties": False,
                        "properties": {"name": NAME, "port": {"type": "integer", "minimum": 1,
                                                              "maximum": 65535}}}},
                    "timeouts": {"type": "object", "additionalProperties": False, "properties": {
                        "request": GATEWAY_DURATION, "backendRequest": GATEWAY_DURATION}}}}},
        }},
    },
}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
PROM_DURATION = {"type": "string", "pattern": r"^(([0-9]+)(y|w|d|h|m|s|ms))+$"}
SERVICEMONITOR = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": METADATA,
        "spec": {"type": "object", "additionalProperties": False,
                 "required": ["selector", "endpoints"], "properties": {
            "jobLabel": {"type": "string"},
            "selector": {"type": "object", "additionalProperties": False,
                         "required": ["matchLabels"],
                         "properties": {"matchLabels": {"type": "object"}}},
            "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                "matchNames": {"type": "array", "items": NAME}}},
            "endpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["port"],
                "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                               "scheme": {"enum": ["http", "https"]},
                               "interval": PROM_DURATION, "scrapeTimeout": PROM_DURATION}}}}},
    },
}
PROMETHEUSRULE = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
        "metadata": METADATA,
        "spec": {"type": "object", "additionalProperties": False, "required": ["groups"],
                 "properties": {"groups": {"type": "array", "minItems": 1, "items": {
                     "type": "object", "required": ["name", "rules"],
                     "additionalProperties": False,
                     "properties": {"name": {"type": "string", "minLength": 1}, "rules": {
                         "type": "array", "minItems": 1, "items": {
                             "type": "object", "required": ["expr"],
                             "additionalProperties": False,
                             "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                             "properties": {
                                 "alert": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9_]*$"},
                                 "record": {"type": "string"},
                                 "expr": {"type": "string", "minLength": 1},
                                 "for": PROM_DURATION,
                                 "labels": {"type": "object",
                                            "additionalProperties": {"type": "string"}},
                                 "annotations": STRING_MAP}}}}}}}},
    },
}


def exported_names() -> set[str]:
    """Every series name the relay and the operator export (with the process metrics)."""
    names = {"up"}
    for registry in (RelayMetrics.create().registry, OperatorMetrics.create().registry):
        for family in registry.collect():
            suffixes = {"counter": ("_total", "_created"),
                        "histogram": ("_bucket", "_count", "_sum", "_created"),
                        "summary": ("_count", "_sum", "_created")}.get(family.type, ("",))
            names.update(family.name + suffix for suffix in suffixes)
    return names


METRIC_RE = re.compile(r"\b((?:vncgate|process|python)_[a-z_]+|up)\b(?=\s*[{\[)]|\s*[=<>!]|\s*$)")


def queried_metrics(expr: str) -> set[str]:
    return set(METRIC_RE.findall(expr))


def job_labels(rendered: Rendered) -> dict[str, dict[str, Any]]:
    """The job label each ServiceMonitor gives its series (the Service's jobLabel value), with
    the Service it selects."""
    jobs = {}
    for monitor in rendered.of_kind("ServiceMonitor"):
        wanted = monitor["spec"]["selector"]["matchLabels"]
        (service,) = [s for s in rendered.of_kind("Service")
                      if wanted.items() <= s["metadata"]["labels"].items()]
        jobs[service["metadata"]["labels"][monitor["spec"]["jobLabel"]]] = service
    return jobs


def validate(manifest: dict[str, Any], schema: dict[str, Any]) -> None:
    try:
        jsonschema.validate(manifest, schema)
    except jsonschema.ValidationError as exc:
        pytest.fail(f"{manifest['kind']}/{manifest['metadata']['name']} at "
                    f"{'.'.join(map(str, exc.absolute_path))}: {exc.message}")


# --- Gateway API ----------------------------------------------------------------------------------

def test_httproute_routes_the_public_port_only() -> None:
    rendered = render([GATEWAY])
    (route,) = rendered.of_kind("HTTPRoute")
    validate(route, HTTPROUTE)
    assert not rendered.of_kind("Ingress"), "no ingress.host: the HTTPRoute alone"
    assert route["spec"]["hostnames"] == ["vnc.example.com"]
    assert route["spec"]["parentRefs"] == [
        {"name": "public", "namespace": "gateway-system", "sectionName": "https"}]
    (rule,) = route["spec"]["rules"]
    assert rule["timeouts"] == {"request": "0s"}
    (backend,) = rule["backendRefs"]
    service = rendered.one("Service", backend["name"])
    assert [p["port"] for p in service["spec"]["ports"]] == [backend["port"]] == [8080]
    assert service["spec"]["ports"][0]["targetPort"] == "http", "never the internal port"


def test_no_httproute_by_default() -> None:
    assert not render().of_kind("HTTPRoute")


def test_httproute_needs_a_gateway() -> None:
    result = helm("template", "vncgate", CHART, "--set", "httpRoute.enabled=true", check=False)
    assert result.returncode != 0
    assert "at '/httpRoute/parentRefs': minItems: got 0, want 1" in result.stderr


def test_httproute_hostnames_are_host_names() -> None:
    result = helm("template", "vncgate", CHART, "--set", "httpRoute.enabled=true",
                  "--set", "httpRoute.parentRefs[0].name=gw",
                  "--set", "httpRoute.hostnames[0]=https://vnc.example.com", check=False)
    assert result.returncode != 0
    assert "/httpRoute/hostnames/0" in result.stderr


# --- ServiceMonitors, NetworkPolicies ------------------------------------------------------------

def test_service_monitors_reach_what_they_scrape() -> None:
    rendered = render([MONITORING])
    monitors = {m["metadata"]["name"]: m for m in rendered.of_kind("ServiceMonitor")}
    assert set(monitors) == {"vncgate-relay", "vncgate-operator"}
    metrics_from = yaml.safe_load(MONITORING.read_text())["networkPolicy"]["metricsFrom"]
    for monitor in monitors.values():
        validate(monitor, SERVICEMONITOR)
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        wanted = monitor["spec"]["selector"]["matchLabels"]
        (service,) = [s for s in rendered.of_kind("Service")
                      if wanted.items() <= s["metadata"]["labels"].items()]
        (endpoint,) = monitor["spec"]["endpoints"]
        (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
        # The container port behind it, and the NetworkPolicy of those pods lets Prometheus in.
        deployment = next(d for d in rendered.of_kind("Deployment")
                          if service["spec"]["selector"].items()
                          <= d["spec"]["template"]["metadata"]["labels"].items())
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        (container_port,) = [p["containerPort"] for p in container["ports"]
                             if p["name"] == port["targetPort"]]
        policy = next(p for p in rendered.of_kind("NetworkPolicy")
                      if p["spec"]["podSelector"]["matchLabels"].items()
                      <= deployment["spec"]["template"]["metadata"]["labels"].items())
        admitted = [rule for rule in policy["spec"]["ingress"]
                    if container_port in [p["port"] for p in rule["ports"]]]
        assert admitted and all(peer in admitted[0]["from"] for peer in metrics_from), \
            f"{policy['metadata']['name']} drops the scrapes of port {container_port}"


def test_service_monitor_without_metrics_peers_is_refused() -> None:
    result = helm("template", "vncgate", CHART, "--set", "serviceMonitor.enabled=true",
                  check=False)
    assert result.returncode != 0
    assert "serviceMonitor.enabled with networkPolicy.enabled needs networkPolicy.metricsFrom" \
        in result.stderr
    # Without the chart's NetworkPolicies there is nothing to admit Prometheus through.
    helm("template", "vncgate", CHART, "--set", "serviceMonitor.enabled=true",
         "--set", "networkPolicy.enabled=false")


def test_operator_metrics_can_be_turned_off() -> None:
    rendered = render([MONITORING], sets=["operator.metrics.enabled=false"])
    assert [m["metadata"]["name"] for m in rendered.of_kind("ServiceMonitor")] == ["vncgate-relay"]
    (operator,) = rendered.one("Deployment", "vncgate-operator")["spec"]["template"]["spec"][
        "containers"]
    assert not [a for a in operator["args"] if a.startswith("--metrics-listen")]
    # Only the admission webhook's port stays open (the API server calls it), not metrics.
    assert rendered.one("NetworkPolicy", "vncgate-operator")["spec"]["ingress"] == [
        {"ports": [{"port": 8443, "protocol": "TCP"}]}]
    assert [s["metadata"]["name"] for s in rendered.of_kind("Service")
            if "operator" in s["metadata"]["name"]] == ["vncgate-operator-webhook"]
    alerts = [r.get("alert") for r in rendered.of_kind("PrometheusRule")[0]["spec"]["groups"][0][
        "rules"]]
    assert "VncgateOperatorDown" not in alerts


@pytest.mark.parametrize("port", ["8081", "8082", "80"])
def test_operator_metrics_port_is_checked(port: str) -> None:
    result = helm("template", "vncgate", CHART, "--set", f"operator.metrics.port={port}",
                  check=False)
    assert result.returncode != 0
    if port == "8082":  # the liveness port: the schema cannot compare two values, the template does
        assert "operator.metrics.port and operator.livenessPort are both 8082" in result.stderr
    else:
        assert "/operator/metrics/port" in result.stderr


# --- PrometheusRule, Grafana dashboard -----------------------------------------------------------

def test_alerts_query_exported_metrics_of_the_scraped_jobs() -> None:
    rendered = render([MONITORING])
    (rule,) = rendered.of_kind("PrometheusRule")
    validate(rule, PROMETHEUSRULE)
    jobs = job_labels(rendered)
    assert set(jobs) == {"relay-headless", "operator-metrics"}
    exported = exported_names()
    rules = rule["spec"]["groups"][0]["rules"]
    alerts = {r["alert"]: r for r in rules}
    assert {"VncgateRelayDown", "VncgateRelayWithoutRoutes", "VncgateSessionsFailing",
            "VncgateRelayInternalErrors", "VncgateRelaySessionLimit", "VncgateOperatorDown",
            "VncgateOperatorHandlersFailing", "VncgateNoSessions"} == set(alerts)
    for name, alert in alerts.items():
        metrics = queried_metrics(alert["expr"])
        assert metrics, f"{name}: no metric found in {alert['expr']!r}"
        assert metrics <= exported, f"{name} queries {metrics - exported}, which nothing exports"
        if name == "VncgateNoSessions":
            continue  # the values file's own rule
        assert alert["labels"]["team"] == "platform" and alert["labels"]["severity"]
        used_jobs = set(re.findall(r'job="([^"]+)"', alert["expr"]))
        assert used_jobs and used_jobs <= set(jobs), f"{name}: jobs {used_jobs}"
        assert set(re.findall(r'namespace="([^"]+)"', alert["expr"])) == {"vncgate-system"}
        assert alert["expr"].count("(") == alert["expr"].count(")"), name
        assert alert["expr"].count("{") == alert["expr"].count("}"), name


def test_dashboard_queries_exported_metrics() -> None:
    rendered = render([MONITORING])
    (config_map,) = [c for c in rendered.of_kind("ConfigMap")
                     if "grafana_dashboard" in c["metadata"].get("labels", {})]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Consoles"}
    shipped = (CHART / "dashboards" / "vncgate.json").read_text()
    assert json.loads(config_map["data"]["vncgate.json"]) == json.loads(shipped)
    dashboard = json.loads(shipped)
    jobs = set(job_labels(rendered))
    exported = exported_names()
    queried: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            metrics = queried_metrics(target["expr"])
            assert metrics and metrics <= exported, (panel["title"], metrics - exported)
            assert set(re.findall(r'job="([^"]+)"', target["expr"])) <= jobs, panel["title"]
            queried |= metrics
    # Every metric vncgate itself exports is on the dashboard.
    ours = {"vncgate_sessions_active", "vncgate_sessions_total", "vncgate_relayed_bytes_total",
            "vncgate_connect_seconds_bucket", "vncgate_routes",
            "vncgate_operator_handler_runs_total", "vncgate_operator_handler_seconds_bucket"}
    assert ours <= queried
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "namespace"}


def test_dashboard_namespace_is_checked() -> None:
    result = helm("template", "vncgate", CHART, "--set", "grafanaDashboard.enabled=true",
                  "--set", "grafanaDashboard.namespace=Monitoring", check=False)
    assert result.returncode != 0
    assert "/grafanaDashboard/namespace" in result.stderr


def test_additional_rules_need_an_expression() -> None:
    result = helm("template", "vncgate", CHART, "--set", "prometheusRule.enabled=true",
                  "--set", "prometheusRule.additionalRules[0].alert=X", check=False)
    assert result.returncode != 0
    assert "/prometheusRule/additionalRules/0" in result.stderr


# --- pod settings, commonLabels, global ----------------------------------------------------------

def test_pod_settings_reach_both_pods() -> None:
    given = yaml.safe_load(POD_SETTINGS.read_text())
    rendered = render([POD_SETTINGS])
    for component in ("relay", "operator"):
        deployment = rendered.one("Deployment", f"vncgate-{component}")
        template = deployment["spec"]["template"]
        pod = template["spec"]
        values = given[component]
        assert pod["affinity"] == values["affinity"], component
        assert pod["nodeSelector"] == values["nodeSelector"], component
        assert pod["tolerations"] == values["tolerations"], component
        assert pod["priorityClassName"] == "system-cluster-critical", component
        (spread,) = pod["topologySpreadConstraints"]
        assert spread["topologyKey"] == values["topologySpreadConstraints"][0]["topologyKey"]
        # A constraint without a labelSelector counts this component's pods.
        assert spread["labelSelector"]["matchLabels"] == \
            deployment["spec"]["selector"]["matchLabels"]
        labels = template["metadata"]["labels"]
        assert labels["cost-center"] == "lab", f"{component}: commonLabels reach the pods"
        assert labels["tier"] == values["podLabels"]["tier"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        annotations = template["metadata"]["annotations"]
        assert values["podAnnotations"].items() <= annotations.items()
        (container,) = pod["containers"]
        assert {"name": "TZ", "value": "UTC"} in container["env"]
        assert values["extraVolumes"][0] in pod["volumes"]
        assert values["extraVolumeMounts"][0] in container["volumeMounts"]
    for manifest in rendered.manifests:
        if manifest["kind"] != "CustomResourceDefinition":
            assert manifest["metadata"]["labels"]["cost-center"] == "lab", manifest["kind"]


def test_common_labels_do_not_change_selectors() -> None:
    rendered = render(sets=["commonLabels.app\\.kubernetes\\.io/component=oops",
                            "relay.podLabels.app\\.kubernetes\\.io/instance=oops"])
    for deployment in rendered.of_kind("Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_topology_spread_needs_its_keys() -> None:
    result = helm("template", "vncgate", CHART,
                  "--set", "operator.topologySpreadConstraints[0].maxSkew=1", check=False)
    assert result.returncode != 0
    assert "/operator/topologySpreadConstraints/0" in result.stderr


def test_global_values_are_accepted(tmp_path: Path) -> None:
    """As a subchart, the parent passes `global` down; the schema must not refuse it."""
    values = tmp_path / "values.yaml"
    values.write_text("global:\n  imageRegistry: registry.example.com\n  storageClass: fast\n")
    helm("template", "vncgate", CHART, "--values", values)
