"""The chart renders, lints and validates against the Kubernetes schemas with every CI values file,
and what it renders follows the chart's security and network rules."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.chart.conftest import (
    CHART,
    CI_VALUES,
    RELEASE,
    ROOT,
    Rendered,
    ci_id,
    helm,
    install_dry_run,
    load_script,
    render,
)

AGGREGATE = "rbac.authorization.k8s.io/aggregate-to-"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and a recent one.
KUBERNETES_VERSIONS = ("1.29", "1.35")
# Custom resources kubernetes-validate has no schema for; checked by the policy tests instead.
UNKNOWN_TO_KUBERNETES_VALIDATE = {"ServiceMonitor", "PrometheusRule", "HTTPRoute"}

RELAY = "vncgate-relay"
HEADLESS = "vncgate-relay-headless"
OPERATOR = "vncgate-operator"
TOKEN_SECRET = "vncgate-registration-token"
USERS_SECRET = "vncgate-users"
KEYS_SECRET = "vncgate-keys"
VIEWER = "vncgate-viewer"
INITIAL_USER_BINDING = "vncgate-initial-user-" + hashlib.sha256(VIEWER.encode()).hexdigest()[:8]
OPERATOR_LABELS = {"app.kubernetes.io/name": "vncgate", "app.kubernetes.io/instance": "vncgate",
                   "app.kubernetes.io/component": "operator"}

ci_values = pytest.mark.parametrize("values", CI_VALUES, ids=ci_id)


def test_there_are_ci_values_files() -> None:
    assert {ci_id(p) for p in CI_VALUES} >= {
        "default", "ingress-tls", "ha-hpa", "existing-secret", "restricted-namespaces",
        "auth-proxy"}


@ci_values
def test_lint_strict(values: Path) -> None:
    result = helm("lint", "--strict", CHART, "--values", values)
    assert "0 chart(s) failed" in result.stdout


@ci_values
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_match_kubernetes_schemas(values: Path, version: str) -> None:
    rendered = render([values])
    checked = set()
    for manifest in rendered.manifests:
        if manifest["kind"] in UNKNOWN_TO_KUBERNETES_VALIDATE:
            continue
        where = f"{manifest['kind']}/{manifest['metadata']['name']}"
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(map(str, exc.path))
            pytest.fail(f"{where} is invalid for Kubernetes {version} at {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{where}: {exc.message}; if it is a custom resource, "
                        "add it to UNKNOWN_TO_KUBERNETES_VALIDATE")
        checked.add(manifest["kind"])
    assert {"Deployment", "Service", "NetworkPolicy"} <= checked


def test_every_component_is_rendered_by_default() -> None:
    rendered = render()
    rendered.one("Deployment", RELAY)
    rendered.one("Deployment", OPERATOR)
    rendered.one("Service", RELAY)
    rendered.one("Service", HEADLESS)
    rendered.one("Secret", TOKEN_SECRET)
    rendered.one("Secret", USERS_SECRET)
    rendered.one("Secret", KEYS_SECRET)
    rendered.one("ClusterRole", OPERATOR)
    rendered.one("ClusterRoleBinding", OPERATOR)
    rendered.one("ClusterRole", RELAY)
    rendered.one("Role", RELAY)
    rendered.one("ClusterRole", VIEWER)
    rendered.one("ClusterRoleBinding", INITIAL_USER_BINDING)
    assert not rendered.of_kind("Ingress"), "no host, no Ingress"
    assert not rendered.of_kind("PodDisruptionBudget"), "one relay: a PDB would block drains"
    assert not rendered.of_kind("HorizontalPodAutoscaler")
    assert not rendered.of_kind("ServiceMonitor")


# --- pods: non-root, read-only, no capabilities, bounded -----------------------------------------

@ci_values
def test_every_container_is_locked_down(values: Path) -> None:
    rendered = render([values])
    assert len(rendered.containers()) == 2
    for deployment, container in rendered.containers():
        where = f"{deployment}/{container['name']}"
        context = container.get("securityContext", {})
        assert context.get("runAsNonRoot") is True, where
        assert context.get("runAsUser") == 10001, where
        assert context.get("readOnlyRootFilesystem") is True, where
        assert context.get("allowPrivilegeEscalation") is False, where
        assert context.get("capabilities", {}).get("drop") == ["ALL"], where
        assert context.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        resources = container.get("resources", {})
        assert {"cpu", "memory"} <= set(resources.get("requests", {})), f"{where}: requests"
        assert "memory" in resources.get("limits", {}), f"{where}: a memory limit"
        if container["name"] == "relay":
            # Latency-sensitive: CFS throttling would stall every session of the pod at once.
            assert "cpu" not in resources["limits"], f"{where}: no CPU limit by default"
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{where}: a writable /tmp on a read-only root"
    for manifest in rendered.of_kind("Deployment"):
        pod = manifest["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert not pod.get("hostNetwork") and not pod.get("hostPID")


def test_relay_runs_as_the_chart_says() -> None:
    rendered = render(sets=["ingress.host=vnc.example.com"])
    pod = rendered.one("Deployment", RELAY)["spec"]["template"]["spec"]
    # SubjectAccessReviews and Leases: the relay calls the API with its ServiceAccount.
    assert pod["automountServiceAccountToken"] is True
    (relay,) = pod["containers"]
    assert relay["command"] == ["vncgate-relay"]
    args = relay["args"]
    for expected in ("--listen=0.0.0.0:8080", "--internal-listen=0.0.0.0:8081",
                     "--metrics-listen=0.0.0.0:9090",
                     "--api-token-file=/etc/vncgate/registration-token/token",
                     "--log-format=json", "--wait-for-sync",
                     "--allowed-origin=https://vnc.example.com", "--auth=token",
                     "--users-file=/etc/vncgate/users/users.yaml",
                     "--session-secret-file=/etc/vncgate/keys/session-secret",
                     "--link-key-file=/etc/vncgate/keys/link-key",
                     "--authorization=kubernetes", "--lease-namespace=vncgate-system"):
        assert expected in args
    env = {e["name"]: e for e in relay["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # `kubectl exec ... vncgate-relay link` finds the key and the URL without flags.
    assert env["VNCGATE_LINK_KEY_FILE"]["value"] == "/etc/vncgate/keys/link-key"
    assert env["VNCGATE_PUBLIC_URL"]["value"] == "https://vnc.example.com"
    assert relay["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert relay["readinessProbe"]["httpGet"]["path"] == "/readyz"
    ports = {p["name"]: p["containerPort"] for p in relay["ports"]}
    assert ports == {"http": 8080, "internal": 8081, "metrics": 9090}


def test_operator_is_one_pod_that_finds_the_relays() -> None:
    rendered = render(sets=["ingress.host=vnc.example.com", "operator.watchNamespaces={lab}",
                            "operator.addressPolicy.allowCidrs={10.20.0.0/16}"])
    deployment = rendered.one("Deployment", OPERATOR)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    (operator,) = deployment["spec"]["template"]["spec"]["containers"]
    assert operator["command"] == ["vncgate-operator"]
    args = operator["args"]
    for expected in (f"--relay-service=vncgate-system/{HEADLESS}",
                     "--api-token-file=/etc/vncgate/registration-token/token",
                     "--public-url=https://vnc.example.com", "--namespace=lab",
                     "--allow-cidr=10.20.0.0/16", "--liveness=http://0.0.0.0:8082/healthz",
                     "--standalone", "--log-format=json"):
        assert expected in args
    assert operator["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "liveness"}
    assert {p["name"]: p["containerPort"] for p in operator["ports"]} == {
        "liveness": 8082, "metrics": 8083, "webhook": 8443}
    assert "--metrics-listen=0.0.0.0:8083" in args


# --- RBAC: least privilege ------------------------------------------------------------------------

def rules_of(rendered: Rendered) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{role['kind']}/{role['metadata'].get('namespace', '')}/{role['metadata']['name']}",
             rule)
            for role in rendered.of_kind("ClusterRole") + rendered.of_kind("Role")
            for rule in role.get("rules", [])]


@ci_values
def test_no_rbac_wildcards(values: Path) -> None:
    for where, rule in rules_of(render([values])):
        for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
            assert "*" not in rule.get(field, []), f"{where}: wildcard in {field}: {rule}"


def granted_rules(rendered: Rendered, name: str | None = None) -> dict[tuple[str, str], set[str]]:
    """(group, resource) -> verbs, of every role, or of the roles named `name`."""
    granted: dict[tuple[str, str], set[str]] = {}
    for where, rule in rules_of(rendered):
        if name is not None and where.rsplit("/", 1)[1] != name:
            continue
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def test_operator_rbac_all_namespaces() -> None:
    rendered = render()
    assert not [r for r in rendered.of_kind("Role") if r["metadata"]["name"] == OPERATOR]
    assert granted_rules(rendered, OPERATOR) == {
        ("vncgate.io", "vnctargets"): {"get", "list", "watch", "patch"},
        ("vncgate.io", "vnctargets/status"): {"get", "patch", "update"},
        ("", "services"): {"get", "list", "watch"},
        ("discovery.k8s.io", "endpointslices"): {"get", "list", "watch"},
        ("", "events"): {"create", "patch"},
        ("events.k8s.io", "events"): {"create", "patch"},
        ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
        # relay.credentials: may the relay read a target's Secret? (asks; reads nothing)
        ("authorization.k8s.io", "localsubjectaccessreviews"): {"create"},
    }
    binding = rendered.one("ClusterRoleBinding", OPERATOR)
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": OPERATOR, "namespace": "vncgate-system"}]


def test_operator_rbac_restricted_namespaces_is_not_cluster_wide() -> None:
    rendered = render([CHART / "ci" / "restricted-namespaces-values.yaml"])
    operator_bound = [b for b in rendered.of_kind("ClusterRoleBinding")
                      if any(s["name"] == OPERATOR for s in b["subjects"])]
    assert not operator_bound
    assert not [r for r in rendered.of_kind("ClusterRole") if r["metadata"]["name"] == OPERATOR]
    # kopf watches everything it serves in each listed namespace and in the relay's own.
    roles = {r["metadata"]["namespace"]: r for r in rendered.of_kind("Role")
             if r["metadata"]["name"] == OPERATOR}
    assert set(roles) == {"lab", "desktops", "vncgate-system"}
    all_namespaces = granted_rules(render(), OPERATOR)
    all_namespaces.pop(("apiextensions.k8s.io", "customresourcedefinitions"))
    # The credential check is a LocalSubjectAccessReview: granted per namespace, as the rest.
    for role in roles.values():
        assert role["metadata"]["name"] == OPERATOR
        assert granted_rules(Rendered((role,))) == all_namespaces
    bindings = {(b["metadata"]["namespace"], b["roleRef"]["kind"], b["roleRef"]["name"])
                for b in rendered.of_kind("RoleBinding") if b["metadata"]["name"] == OPERATOR}
    assert bindings == {(namespace, "Role", OPERATOR) for namespace in roles}


def bound_to(rendered: Rendered, account: str) -> list[dict[str, Any]]:
    """The bindings with the ServiceAccount `account` of the release namespace as a subject."""
    return [b for b in rendered.of_kind("RoleBinding") + rendered.of_kind("ClusterRoleBinding")
            if {"kind": "ServiceAccount", "name": account, "namespace": "vncgate-system"}
            in b["subjects"]]


def test_relay_rbac_is_exactly_reviews_and_leases() -> None:
    rendered = render()
    # Cluster-wide: asking the API server about a user and a token, nothing else.
    assert rendered.one("ClusterRole", RELAY)["rules"] == [
        {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"],
         "verbs": ["create"]},
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
         "verbs": ["create"]}]
    # Leases in its own namespace only.
    role = rendered.one("Role", RELAY)
    assert role["metadata"]["namespace"] == "vncgate-system"
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
         "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list"]}]
    bindings = {(b["kind"], b["metadata"].get("namespace"), b["roleRef"]["kind"],
                 b["roleRef"]["name"]) for b in bound_to(rendered, RELAY)}
    assert bindings == {("ClusterRoleBinding", None, "ClusterRole", RELAY),
                        ("RoleBinding", "vncgate-system", "Role", RELAY)}
    # The account itself mounts nothing; the relay pod asks for the token.
    assert rendered.one("ServiceAccount", RELAY)["automountServiceAccountToken"] is False


@pytest.mark.parametrize(("sets", "reviews", "leases"), [
    ((), True, True),
    (("relay.authorization=manifest",), False, True),
    (("relay.leases.enabled=false",), True, False),
    (("relay.auth.mode=none",), False, True),  # nobody to ask about: every console is open
    (("relay.authorization=manifest", "relay.leases.enabled=false",
      "relay.credentials.enabled=false"), False, False),
])
def test_relay_rbac_and_token_follow_the_features(sets: tuple[str, ...], reviews: bool,
                                                   leases: bool) -> None:
    rendered = render(sets=sets)
    kinds = {b["roleRef"]["kind"] for b in bound_to(rendered, RELAY)}
    assert ("ClusterRole" in kinds) is reviews
    assert ("Role" in kinds) is leases
    assert bool([r for r in rendered.of_kind("ClusterRole") if r["metadata"]["name"] == RELAY]) \
        is reviews
    assert bool(rendered.of_kind("Role")) is leases
    pod = rendered.one("Deployment", RELAY)["spec"]["template"]["spec"]
    credentials = "relay.credentials.enabled=false" not in sets  # reads opted-in Secrets
    assert pod["automountServiceAccountToken"] is (reviews or leases or credentials)
    credential_roles = [r for r in rendered.of_kind("ClusterRole")
                        if r["metadata"]["name"] == f"{RELAY}-credentials"]
    assert bool(credential_roles) is credentials
    # Bound nowhere by the chart: each namespace opts in with its own RoleBinding.
    assert not [b for b in rendered.of_kind("ClusterRoleBinding") + rendered.of_kind(
        "RoleBinding") if b["roleRef"]["name"] == f"{RELAY}-credentials"]
    if credentials:
        assert credential_roles[0]["rules"] == [
            {"apiGroups": [""], "resources": ["secrets", "configmaps"], "verbs": ["get"]}]
    args = pod["containers"][0]["args"]
    assert ("--lease-namespace=vncgate-system" in args) is leases
    assert ("--kubernetes-tokens" in args) is reviews
    assert ("--peer-service=vncgate-system/vncgate-relay-headless" in args) is leases


@pytest.mark.parametrize(("sets", "made"), [
    ((), True),
    (("relay.leases.flowSchema.enabled=false",), False),
    (("relay.leases.enabled=false",), False),  # no Leases: nothing to give a flow
])
def test_the_relays_leases_are_a_flow_of_their_own(sets: tuple[str, ...], made: bool) -> None:
    """API Priority and Fairness: the relay account's Lease requests in its namespace, and
    nothing else, in a FlowSchema of their own (tests/cluster/test_api_connections.py has the
    API server classify them)."""
    rendered = render(sets=sets)
    schemas = rendered.of_kind("FlowSchema")
    assert bool(schemas) is made
    if not made:
        return
    (schema,) = schemas
    assert schema["metadata"]["name"] == f"{RELAY}-leases"
    spec = schema["spec"]
    assert spec["priorityLevelConfiguration"] == {"name": "workload-low"}
    assert spec["matchingPrecedence"] < 9000  # before the suggested service-accounts schema
    assert spec["rules"] == [{
        "subjects": [{"kind": "ServiceAccount", "serviceAccount": {
            "name": RELAY, "namespace": "vncgate-system"}}],
        "resourceRules": [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                           "verbs": ["*"], "namespaces": ["vncgate-system"]}]}]


def test_kubernetes_tokens_can_be_turned_off_and_narrowed_to_an_audience() -> None:
    rendered = render(sets=("relay.auth.kubernetesTokens.enabled=false",))
    assert rendered.one("ClusterRole", RELAY)["rules"] == [
        {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"],
         "verbs": ["create"]}]
    args = rendered.one("Deployment", RELAY)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--kubernetes-tokens" not in args
    assert not [a for a in args if a.startswith("--token-audience")]
    rendered = render(sets=("relay.auth.kubernetesTokens.audiences={vncgate}",))
    args = rendered.one("Deployment", RELAY)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--kubernetes-tokens" in args
    assert [a for a in args if a.startswith("--token-audience")] == ["--token-audience=vncgate"]


def _token_audiences(rendered: Rendered) -> list[str]:
    args = rendered.one("Deployment", RELAY)["spec"]["template"]["spec"]["containers"][0]["args"]
    return [a.partition("=")[2] for a in args if a.startswith("--token-audience")]


def test_kubernetes_tokens_are_for_the_releases_own_audience_by_default() -> None:
    """Without a setting the relay accepts no token minted for the API server itself (which
    it could replay there), only tokens for this release: vncgate:<namespace>:<release>."""
    assert _token_audiences(render()) == ["vncgate:vncgate-system:vncgate"]
    notes = install_dry_run()["info"]["notes"]
    assert "--audience vncgate:vncgate-system:vncgate" in notes
    # Tokens for the API server itself only when asked for, with a warning.
    sets = ("relay.auth.kubernetesTokens.apiServerTokens=true",)
    args = render(sets=sets).one("Deployment", RELAY)["spec"]["template"]["spec"][
        "containers"][0]["args"]
    assert "--kubernetes-tokens" in args and _token_audiences(render(sets=sets)) == []
    assert "tokens for the API server itself, which it could replay" in \
        install_dry_run(sets)["info"]["notes"]
    result = helm("template", RELEASE, CHART, "--set", sets[0], "--set",
                  "relay.auth.kubernetesTokens.audiences={vncgate}", check=False)
    assert result.returncode != 0
    assert ("apiServerTokens=true accepts tokens for the API server itself, audiences names "
            "others; set one of them") in result.stderr
    result = helm("template", RELEASE, CHART, "--set-string",
                  "relay.auth.kubernetesTokens.apiServerTokens=yes", check=False)
    assert result.returncode != 0 and "apiServerTokens" in result.stderr


def test_relay_without_kubernetes_api_has_no_rbac() -> None:
    rendered = render([CHART / "ci" / "auth-proxy-values.yaml"])
    assert not bound_to(rendered, RELAY)
    pod = rendered.one("Deployment", RELAY)["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False


def test_rbac_create_false_renders_no_rbac() -> None:
    rendered = render(sets=["rbac.create=false"])
    for kind in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"):
        assert not rendered.of_kind(kind), kind


def test_viewer_cluster_role_is_what_teams_bind() -> None:
    rendered = render()
    viewer = rendered.one("ClusterRole", VIEWER)
    assert viewer["rules"] == [{"apiGroups": ["vncgate.io"], "resources": ["vnctargets"],
                                "verbs": ["get", "list", "connect"]}]
    # Nobody is bound to it by a RoleBinding of the chart: teams bind it in their namespace.
    assert not [b for b in rendered.of_kind("RoleBinding") if b["roleRef"]["name"] == VIEWER]
    # Only the generated initial user, cluster-wide.
    (binding,) = [b for b in rendered.of_kind("ClusterRoleBinding")
                  if b["roleRef"]["name"] == VIEWER]
    # Named after the role it binds too: roleRef cannot change, a new role needs a new binding.
    assert binding["metadata"]["name"] == INITIAL_USER_BINDING
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": VIEWER}
    assert binding["subjects"] == [
        {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "admin"}]


@pytest.mark.parametrize("sets", [
    ("relay.auth.token.initialUserClusterWide=false",),
    ("relay.authorization=manifest",),
    ("relay.auth.token.existingSecret=my-users",),
    ("relay.auth.mode=proxy", "relay.auth.trustedProxies={10.0.0.0/8}"),
])
def test_initial_user_binding_only_for_a_generated_user_checked_by_rbac(
        sets: tuple[str, ...]) -> None:
    rendered = render(sets=sets)
    assert not [b for b in rendered.of_kind("ClusterRoleBinding")
                if b["roleRef"]["name"] == VIEWER]
    rendered.one("ClusterRole", VIEWER)


def test_viewer_cluster_role_name_and_a_second_release() -> None:
    renamed = render(sets=["rbac.viewerClusterRole.name=consoles-viewer",
                           "relay.auth.token.initialUser=root"])
    renamed.one("ClusterRole", "consoles-viewer")
    (binding,) = [b for b in renamed.of_kind("ClusterRoleBinding")
                  if b["roleRef"]["name"] == "consoles-viewer"]
    assert binding["subjects"][0]["name"] == "root"
    # A release may bind a ClusterRole made elsewhere instead of making its own.
    second = render(sets=["rbac.viewerClusterRole.create=false",
                          f"rbac.viewerClusterRole.name={VIEWER}"], release="second")
    assert not [r for r in second.of_kind("ClusterRole") if r["metadata"]["name"] == VIEWER]
    assert [b for b in second.of_kind("ClusterRoleBinding") if b["roleRef"]["name"] == VIEWER]
    relay = second.one("Deployment", "second-vncgate-relay")["spec"]["template"]["spec"][
        "containers"][0]
    assert f"--viewer-role={VIEWER}" in relay["args"], "refusals name the role that is bound"


CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"}


def cluster_scoped(rendered: Rendered) -> set[tuple[str, str]]:
    return {(m["kind"], m["metadata"]["name"]) for m in rendered.manifests
            if m["kind"] in CLUSTER_SCOPED}


@pytest.mark.parametrize("values", [[], [CHART / "ci" / "kubevirt-values.yaml"]],
                         ids=["default", "kubevirt"])
def test_two_releases_make_no_cluster_scoped_object_of_the_same_name(values: list[Path]) -> None:
    """Two releases in one cluster (the second without the CRD, which a cluster has once):
    every ClusterRole, binding and webhook configuration carries its release's name, and the
    relay is told the names its release made."""
    first = render(values, release="vncgate")
    second = render(values, ["crds.enabled=false"], release="lab")
    assert cluster_scoped(first) & cluster_scoped(second) == set()
    assert ("ClusterRole", "lab-vncgate-viewer") in cluster_scoped(second)
    for rendered, fullname in ((first, "vncgate"), (second, "lab-vncgate")):
        made = {name for kind, name in cluster_scoped(rendered) if kind == "ClusterRole"}
        relay = rendered.one("Deployment", f"{fullname}-relay")["spec"]["template"]["spec"][
            "containers"][0]
        named = {a.split("=", 1)[1] for a in relay["args"] if a.split("=", 1)[0] in (
            "--viewer-role", "--editor-role", "--admin-role", "--recordings-viewer-role",
            "--credentials-role")}
        assert len(named) == 5 and named <= made, named - made
        # Aggregation into Kubernetes' edit/admin is by label, whatever the name.
        editor = rendered.one("ClusterRole", f"{fullname}-editor")["metadata"]["labels"]
        assert editor[AGGREGATE + "edit"] == "true" and editor[AGGREGATE + "admin"] == "true"


# --- network: the internal port stays internal ----------------------------------------------------

@ci_values
def test_internal_port_is_never_an_ingress_backend(values: Path) -> None:
    rendered = render([values])
    public = rendered.one("Service", RELAY)
    assert [p["port"] for p in public["spec"]["ports"]] == [8080]
    assert [p["targetPort"] for p in public["spec"]["ports"]] == ["http"]
    for ingress in rendered.of_kind("Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                service = path["backend"]["service"]
                assert service["name"] == RELAY
                assert service["port"] in ({"name": "http"}, {"number": 8080})


@ci_values
def test_network_policy_admits_internal_port_only_from_operator_and_relays(values: Path) -> None:
    rendered = render([values])
    given = yaml.safe_load(values.read_text()) or {}
    metrics_from = given.get("networkPolicy", {}).get("metricsFrom", [])
    policy = rendered.one("NetworkPolicy", RELAY)
    # Ingress only by default: egress stays open (VNC servers, the API for reviews and Leases).
    if given.get("networkPolicy", {}).get("relayEgress", {}).get("enabled"):
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    else:
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        assert "egress" not in policy["spec"]
    internal_rules = [rule for rule in policy["spec"]["ingress"]
                      if any(p["port"] in (8081, "internal") for p in rule["ports"])]
    assert len(internal_rules) == 1, "one rule for the internal port"
    (rule,) = internal_rules
    assert [p["port"] for p in rule["ports"]] == [8081], "the internal rule opens nothing else"
    # The operator and the relay pods themselves (kubectl vnc sessions / kill ask each
    # replica); not the metrics scraper, which has a port of its own.
    relay_labels = rendered.one("Deployment", RELAY)["spec"]["selector"]["matchLabels"]
    assert rule["from"] == [{"podSelector": {"matchLabels": OPERATOR_LABELS}},
                            {"podSelector": {"matchLabels": relay_labels}}]
    # Every other rule names the public port or the metrics port only: nothing else reaches
    # 8081, and networkPolicy.metricsFrom reaches /metrics alone.
    others = []
    for other in policy["spec"]["ingress"]:
        assert "ports" in other, "a rule without ports would open every port"
        if other is not rule:
            others.append(([p["port"] for p in other["ports"]], other.get("from")))
    expected: list[tuple[list[int], Any]] = [
        ([8080], given.get("networkPolicy", {}).get("publicFrom"))]
    if metrics_from:
        port = given.get("relay", {}).get("metrics", {}).get("port", 9090)
        expected.append(([port], metrics_from))
    assert others == expected
    # The operator: Prometheus (metricsFrom) on the metrics port, and the API server (from an
    # address no selector names) on the admission webhook's port; nothing else.
    operator_policy = rendered.one("NetworkPolicy", OPERATOR)
    webhook = [{"ports": [{"port": 8443, "protocol": "TCP"}]}]
    if metrics_from:
        assert operator_policy["spec"]["ingress"] == [
            {"ports": [{"port": 8083, "protocol": "TCP"}], "from": metrics_from}, *webhook]
    else:
        assert operator_policy["spec"]["ingress"] == webhook


@ci_values
def test_headless_service_lists_starting_relays(values: Path) -> None:
    headless = render([values]).one("Service", HEADLESS)
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    ports = {p["name"]: p["port"] for p in headless["spec"]["ports"]}
    given = yaml.safe_load(values.read_text()) or {}
    metrics = given.get("relay", {}).get("metrics", {}).get("port", 9090)
    assert ports == {"http": 8080, "internal": 8081, "metrics": metrics}


def test_ha_values_add_hpa_pdb_and_service_monitor() -> None:
    rendered = render([CHART / "ci" / "ha-hpa-values.yaml"])
    assert "replicas" not in rendered.one("Deployment", RELAY)["spec"], "the HPA owns replicas"
    hpa = rendered.one("HorizontalPodAutoscaler", RELAY)
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert rendered.one("PodDisruptionBudget", RELAY)["spec"]["maxUnavailable"] == 1
    monitor = rendered.one("ServiceMonitor", RELAY)
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "scheme": "http", "interval": "30s",
         "scrapeTimeout": "10s"}]
    # It selects the headless Service only: the public Service has no metrics port.
    selector = monitor["spec"]["selector"]["matchLabels"]
    labels_of = {svc["metadata"]["name"]: svc["metadata"]["labels"]
                 for svc in rendered.of_kind("Service")}
    selected = [name for name, labels in labels_of.items()
                if selector.items() <= labels.items()]
    assert selected == [HEADLESS]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_pdb_with_more_than_one_relay() -> None:
    rendered = render(sets=["relay.replicas=2"])
    assert rendered.one("PodDisruptionBudget", RELAY)["spec"]["minAvailable"] == 1


# --- the registration token -----------------------------------------------------------------------

def test_generated_token_secret_is_kept_and_mounted() -> None:
    rendered = render()
    secret = rendered.one("Secret", TOKEN_SECRET)
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    token = secret["data"]["token"]
    assert len(base64.b64decode(token)) == 48
    checksums = set()
    for deployment in rendered.of_kind("Deployment"):
        pod = deployment["spec"]["template"]
        volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "registration-token")
        assert volume["secret"]["secretName"] == TOKEN_SECRET
        assert volume["secret"]["items"] == [{"key": "token", "path": "token"}]
        checksums.add(pod["metadata"]["annotations"]["checksum/registration-token"])
    assert len(checksums) == 1, "relay and operator restart together when the token changes"


def test_existing_secret_is_used_and_none_is_generated() -> None:
    rendered = render([CHART / "ci" / "existing-secret-values.yaml"])
    # The only Secret is the admission webhook's certificate, which is not a registration token.
    assert [s["metadata"]["name"] for s in rendered.of_kind("Secret")] == [
        "vncgate-operator-webhook-tls"]
    for deployment in rendered.of_kind("Deployment"):
        pod = deployment["spec"]["template"]
        volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "registration-token")
        assert volume["secret"]["secretName"] == "vncgate-registration"
        assert volume["secret"]["items"] == [{"key": "api-token", "path": "token"}]
        assert "checksum/registration-token" not in pod["metadata"].get("annotations", {})
        (container,) = pod["spec"]["containers"]
        assert container["image"].endswith("@sha256:" + "0" * 64)
    pod = rendered.one("Deployment", RELAY)["spec"]["template"]
    volumes = {v["name"]: v["secret"] for v in pod["spec"]["volumes"] if "secret" in v}
    assert volumes["users"]["secretName"] == "vncgate-users"
    assert volumes["users"]["items"] == [{"key": "users.yaml", "path": "users.yaml"}]
    assert volumes["keys"]["secretName"] == "vncgate-keys"
    assert {"checksum/users", "checksum/keys"}.isdisjoint(pod["metadata"].get("annotations", {}))
    assert not [b for b in rendered.of_kind("ClusterRoleBinding")
                if b["roleRef"]["name"] == VIEWER], "no generated user to bind"


# --- sign-in: the users file and the keys ---------------------------------------------------------

def test_generated_users_and_keys_are_kept_and_mounted_read_only() -> None:
    rendered = render()
    users = rendered.one("Secret", USERS_SECRET)
    keys = rendered.one("Secret", KEYS_SECRET)
    for secret in (users, keys):
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert secret["metadata"]["namespace"] == "vncgate-system"
    # The relay's users-file format: the initial user and a random 32-character secret.
    users_file = yaml.safe_load(base64.b64decode(users["data"]["users.yaml"]))
    assert set(users_file) == {"admin"}
    assert users_file["admin"]["groups"] == []
    secret = users_file["admin"]["token"]
    assert isinstance(secret, str) and len(secret) == 32 and secret.isalnum()
    assert set(keys["data"]) == {"session-secret", "link-key"}
    decoded = {k: base64.b64decode(v).decode() for k, v in keys["data"].items()}
    assert all(len(v) == 48 and v.isalnum() for v in decoded.values())
    assert decoded["session-secret"] != decoded["link-key"]
    template = rendered.one("Deployment", RELAY)["spec"]["template"]
    volumes = {v["name"]: v["secret"] for v in template["spec"]["volumes"] if "secret" in v}
    assert volumes["users"] == {"secretName": USERS_SECRET, "defaultMode": 0o440,
                                "items": [{"key": "users.yaml", "path": "users.yaml"}]}
    assert volumes["keys"]["secretName"] == KEYS_SECRET
    assert volumes["keys"]["items"] == [{"key": "session-secret", "path": "session-secret"},
                                        {"key": "link-key", "path": "link-key"}]
    (relay,) = template["spec"]["containers"]
    mounts = {m["name"]: m for m in relay["volumeMounts"]}
    assert mounts["users"] == {"name": "users", "mountPath": "/etc/vncgate/users",
                               "readOnly": True}
    assert mounts["keys"] == {"name": "keys", "mountPath": "/etc/vncgate/keys", "readOnly": True}
    # The pods restart when a generated file changes: the relay reads them once at start.
    annotations = template["metadata"]["annotations"]
    assert annotations["checksum/users"] == hashlib.sha256(
        users["data"]["users.yaml"].encode()).hexdigest()
    assert set(annotations) >= {"checksum/keys", "checksum/registration-token"}


def test_no_users_file_outside_token_mode() -> None:
    rendered = render([CHART / "ci" / "auth-proxy-values.yaml"])
    assert not [s for s in rendered.of_kind("Secret") if s["metadata"]["name"] == USERS_SECRET]
    rendered.one("Secret", KEYS_SECRET)  # share links work in every mode
    pod = rendered.one("Deployment", RELAY)["spec"]["template"]["spec"]
    assert "users" not in {v["name"] for v in pod["volumes"]}
    assert not any(a.startswith("--users-file") for a in pod["containers"][0]["args"])


def test_rotation_adds_an_older_link_key_after_the_chart_s() -> None:
    rendered = render(sets=["relay.extraArgs={--link-key-file=/etc/vncgate/old-key/link-key}"])
    args = rendered.one("Deployment", RELAY)["spec"]["template"]["spec"]["containers"][0]["args"]
    keys = [a for a in args if a.startswith("--link-key-file=")]
    assert keys == ["--link-key-file=/etc/vncgate/keys/link-key",
                    "--link-key-file=/etc/vncgate/old-key/link-key"], "newest first"


# --- the Ingress: one relay pod per console, when asked -------------------------------------------

HASH_BY = "nginx.ingress.kubernetes.io/upstream-hash-by"


def test_ingress_hash_by_target() -> None:
    ingress = render([CHART / "ci" / "ha-hpa-values.yaml"]).one("Ingress", "vncgate")
    # The path without the query: the viewer's WebSocket, with or without ?takeover=1, and
    # every other viewer of the same console hash alike.
    assert ingress["metadata"]["annotations"][HASH_BY] == "$uri"
    assert "nginx.ingress.kubernetes.io/proxy-read-timeout" in ingress["metadata"]["annotations"]
    plain = render(sets=["ingress.host=vnc.example.com"]).one("Ingress", "vncgate")
    assert HASH_BY not in plain["metadata"]["annotations"]
    own = render(sets=["ingress.host=vnc.example.com", "ingress.hashByTarget=true",
                       "ingress.annotations.nginx\\.ingress\\.kubernetes\\.io/upstream-hash-by=$host"]
                 ).one("Ingress", "vncgate")
    assert own["metadata"]["annotations"][HASH_BY] == "$host", "your own annotation wins"


# --- the CRD --------------------------------------------------------------------------------------

CANONICAL_CRD = ROOT / "crds" / "vnctargets.vncgate.io.yaml"


def test_crd_template_is_generated_from_crds() -> None:
    """One CRD is edited (crds/); the chart's template is what scripts/chart-crds makes of it."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "chart-crds"), "--check"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    # Helm installs a chart's crds/ folder once and never upgrades it: the chart has none.
    assert not (CHART / "crds").exists()


def test_chart_renders_the_crd_of_crds_with_its_labels_and_keep() -> None:
    canonical = yaml.safe_load(CANONICAL_CRD.read_text())
    crd = render().one("CustomResourceDefinition", "vnctargets.vncgate.io")
    assert crd["spec"] == canonical["spec"]
    assert canonical["metadata"]["labels"].items() <= crd["metadata"]["labels"].items()
    assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    unkept = render(sets=["crds.keep=false"]).one("CustomResourceDefinition",
                                                  "vnctargets.vncgate.io")
    assert "annotations" not in unkept["metadata"]
    assert not render(sets=["crds.enabled=false"]).of_kind("CustomResourceDefinition")


def test_chart_crds_refuses_template_syntax_in_the_crd(tmp_path: Path) -> None:
    """A `{{` in a description would be read by Helm as a template action."""
    module = load_script("chart-crds")
    bad = tmp_path / "bad.yaml"
    bad.write_text(CANONICAL_CRD.read_text().replace(
        "description: The metadata.generation", "description: Use {{ .Values }}, the", 1))
    with pytest.raises(module.CrdError, match="template action"):
        module.template_of(bad)
    assert module.template_of(CANONICAL_CRD).endswith("{{- end }}\n")


def test_a_stopping_relay_closes_its_sessions_before_it_is_killed() -> None:
    """preStop first (new viewers go elsewhere), then SIGTERM: 1001 within --shutdown-grace,
    all inside terminationGracePeriodSeconds."""
    deployment = next(d for d in render().of_kind("Deployment")
                      if d["metadata"]["name"].endswith("relay"))
    pod = deployment["spec"]["template"]["spec"]
    relay = next(c for c in pod["containers"] if c["name"] == "relay")
    assert relay["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert "--shutdown-grace=10s" in relay["args"]
    assert "--stall-timeout=60s" in relay["args"]
    assert pod["terminationGracePeriodSeconds"] >= 5 + 10 + 2
    result = helm("template", CHART, "--set", "relay.terminationGracePeriodSeconds=10",
                  check=False)
    assert result.returncode != 0
    assert "must be at least relay.preStopSeconds + relay.shutdownGraceSeconds" in result.stderr


def test_editor_and_admin_roles_are_aggregated_into_kubernetes_roles() -> None:
    """kubectl vnc's verbs: share for editors, sessions and disconnect for admins,
    aggregated into edit/admin; vncgate-viewer stays out of `view` (console access types)."""
    rendered = render()
    editor = rendered.one("ClusterRole", "vncgate-editor")
    admin = rendered.one("ClusterRole", "vncgate-admin")
    assert editor["rules"] == [{"apiGroups": ["vncgate.io"], "resources": ["vnctargets"],
                                "verbs": ["get", "list", "watch", "create", "update", "patch",
                                          "delete", "connect", "share"]}]
    assert admin["rules"] == [
        {"apiGroups": ["vncgate.io"], "resources": ["vnctargets"],
         "verbs": ["get", "list", "watch", "create", "update", "patch", "delete", "connect",
                   "share", "sessions", "disconnect"]},
        {"apiGroups": ["vncgate.io"], "resources": ["vnctargets/recordings"], "verbs": ["get"]}]
    labels = {name: {k for k, v in rendered.one("ClusterRole", name)["metadata"]["labels"]
                     .items() if k.startswith(AGGREGATE) and v == "true"}
              for name in ("vncgate-editor", "vncgate-admin", VIEWER)}
    assert labels == {"vncgate-editor": {AGGREGATE + "edit", AGGREGATE + "admin"},
                      "vncgate-admin": {AGGREGATE + "admin"}, VIEWER: set()}
    # Nothing binds them: Kubernetes' edit/admin bindings carry them.
    assert not [b for b in rendered.of_kind("RoleBinding") + rendered.of_kind(
        "ClusterRoleBinding") if b["roleRef"]["name"] in ("vncgate-editor", "vncgate-admin")]


def test_editor_and_admin_roles_can_be_renamed_unaggregated_or_left_out() -> None:
    rendered = render(sets=("rbac.editorClusterRole.aggregate=false",
                            "rbac.adminClusterRole.name=consoles-admin"))
    assert not [k for k in rendered.one("ClusterRole", "vncgate-editor")["metadata"]["labels"]
                if k.startswith(AGGREGATE)]
    rendered.one("ClusterRole", "consoles-admin")
    rendered = render(sets=("rbac.editorClusterRole.create=false",
                            "rbac.adminClusterRole.create=false"))
    names = {r["metadata"]["name"] for r in rendered.of_kind("ClusterRole")}
    assert not names & {"vncgate-editor", "vncgate-admin"}
    assert not [r for r in render(sets=("rbac.create=false",)).of_kind("ClusterRole")
                if r["metadata"]["name"] in ("vncgate-editor", "vncgate-admin")]


KUBEVIRT_READ = {("kubevirt.io", "virtualmachines"): {"get", "list", "watch"},
                 ("kubevirt.io", "virtualmachineinstances"): {"get", "list", "watch"}}
VNC_RULE = [{"apiGroups": ["subresources.kubevirt.io"],
             "resources": ["virtualmachineinstances/vnc"], "verbs": ["get"]}]


def test_kubevirt_rbac_only_when_enabled() -> None:
    off = render()
    assert not [r for r in off.of_kind("ClusterRole") if r["metadata"]["name"] ==
                f"{RELAY}-kubevirt"]
    assert not set(KUBEVIRT_READ) & set(granted_rules(off, OPERATOR))
    on = render([CHART / "ci" / "kubevirt-values.yaml"])
    assert on.one("ClusterRole", f"{RELAY}-kubevirt")["rules"] == VNC_RULE
    binding = on.one("ClusterRoleBinding", f"{RELAY}-kubevirt")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": RELAY, "namespace": "vncgate-system"}]
    granted = granted_rules(on, OPERATOR)
    assert {key: granted[key] for key in KUBEVIRT_READ} == KUBEVIRT_READ
    # Discovery creates and deletes the VncTargets of labelled VMs.
    assert {"create", "delete"} <= granted[("vncgate.io", "vnctargets")]
    assert "--kubevirt-discovery" in on.one("Deployment", OPERATOR)["spec"]["template"][
        "spec"]["containers"][0]["args"]
    without = render(sets=("kubevirt.enabled=true",))
    assert not {"create", "delete"} & granted_rules(without, OPERATOR)[("vncgate.io",
                                                                        "vnctargets")]
    assert "--kubevirt-discovery" not in without.one("Deployment", OPERATOR)["spec"][
        "template"]["spec"]["containers"][0]["args"]
    # The relay needs its token for the API server even with every other feature off.
    minimal = render([CHART / "ci" / "kubevirt-values.yaml"], sets=(
        "relay.authorization=manifest", "relay.leases.enabled=false",
        "relay.credentials.enabled=false"))
    pod = minimal.one("Deployment", RELAY)["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is True


def test_kubevirt_rbac_in_watched_namespaces_only() -> None:
    rendered = render([CHART / "ci" / "restricted-namespaces-values.yaml",
                       CHART / "ci" / "kubevirt-values.yaml"])
    assert not [b for b in rendered.of_kind("ClusterRoleBinding")
                if b["roleRef"]["name"] == f"{RELAY}-kubevirt"]
    bindings = {b["metadata"]["namespace"] for b in rendered.of_kind("RoleBinding")
                if b["roleRef"]["name"] == f"{RELAY}-kubevirt"}
    assert bindings == {"lab", "desktops"}
    for role in rendered.of_kind("Role"):
        if role["metadata"]["name"] == OPERATOR:
            granted = granted_rules(Rendered((role,)))
            assert {key: granted[key] for key in KUBEVIRT_READ} == KUBEVIRT_READ


def test_kubevirt_discovery_needs_kubevirt_enabled() -> None:
    result = helm("template", RELEASE, CHART, "--set", "kubevirt.discovery=true", check=False)
    assert result.returncode != 0
    assert "kubevirt.discovery=true needs kubevirt.enabled=true" in result.stderr


# --- the admission webhook and the network-reach grants ------------------------------------------

def webhook_configuration(rendered: Rendered) -> dict[str, Any]:
    (configuration,) = rendered.of_kind("ValidatingWebhookConfiguration")
    return configuration


def test_webhook_fails_closed_for_vnctarget_writes_with_its_ca_wired() -> None:
    rendered = render(sets=["ingress.host=vnc.example.com"])
    (hook,) = webhook_configuration(rendered)["webhooks"]
    assert hook["failurePolicy"] == "Fail" and hook["sideEffects"] == "None"
    assert hook["rules"] == [{"apiGroups": ["vncgate.io"], "apiVersions": ["*"],
                              "resources": ["vnctargets"], "operations": ["CREATE", "UPDATE"],
                              "scope": "Namespaced"}]
    # Only writes that can lend something call it (tests/cluster/test_admission.py checks what
    # the API server makes of the expression).
    assert [c["name"] for c in hook["matchConditions"]] == ["spec-written"]
    assert "object.spec != oldObject.spec" in hook["matchConditions"][0]["expression"]
    service = hook["clientConfig"]["service"]
    assert service == {"name": "vncgate-operator-webhook", "namespace": "vncgate-system",
                       "port": 443, "path": "/validate-vnctarget"}
    assert rendered.one("Service", "vncgate-operator-webhook")["spec"]["ports"][0][
        "targetPort"] == "webhook"
    # The CA in the configuration signed the certificate the operator serves.
    secret = rendered.one("Secret", "vncgate-operator-webhook-tls")
    assert hook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    args = rendered.one("Deployment", OPERATOR)["spec"]["template"]["spec"]["containers"][0][
        "args"]
    assert "--webhook-listen=0.0.0.0:8443" in args
    assert "--webhook-cert-file=/etc/vncgate/webhook/tls.crt" in args
    # The operator asks its reviews with LocalSubjectAccessReviews, nothing wider.
    verbs = [rule for _, rule in rules_of(rendered)
             if "localsubjectaccessreviews" in rule.get("resources", [])]
    assert verbs and all(rule["verbs"] == ["create"] for rule in verbs)


def test_webhook_with_cert_manager_makes_no_certificate_of_its_own() -> None:
    rendered = render(sets=["ingress.host=vnc.example.com", "webhook.certManager.enabled=true"])
    configuration = webhook_configuration(rendered)
    assert configuration["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == \
        "vncgate-system/vncgate-operator-webhook"
    assert "caBundle" not in configuration["webhooks"][0]["clientConfig"]
    assert not [s for s in rendered.of_kind("Secret")
                if s["metadata"]["name"] == "vncgate-operator-webhook-tls"]
    (certificate,) = rendered.of_kind("Certificate")
    assert certificate["spec"]["secretName"] == "vncgate-operator-webhook-tls"
    assert "vncgate-operator-webhook.vncgate-system.svc" in certificate["spec"]["dnsNames"]


def test_webhook_off_renders_none_of_it() -> None:
    rendered = render(sets=["ingress.host=vnc.example.com", "webhook.enabled=false"])
    assert not rendered.of_kind("ValidatingWebhookConfiguration")
    args = rendered.one("Deployment", OPERATOR)["spec"]["template"]["spec"]["containers"][0][
        "args"]
    assert not [a for a in args if a.startswith("--webhook-")]


def test_network_reach_grants_reach_the_operator() -> None:
    rendered = render(sets=["ingress.host=vnc.example.com",
                            "networkReach.grants[0].namespaces={lab}",
                            "networkReach.grants[0].cidrs={10.20.0.0/16}"])
    grants = yaml.safe_load(rendered.one("ConfigMap", "vncgate-network-reach")["data"][
        "grants.yaml"])
    assert grants == {"grants": [{"namespaces": ["lab"], "cidrs": ["10.20.0.0/16"]}]}
    for component in (OPERATOR, RELAY):
        pod = rendered.one("Deployment", component)["spec"]["template"]
        assert "--address-grants=/etc/vncgate/network-reach/grants.yaml" in pod["spec"][
            "containers"][0]["args"]
        assert "checksum/network-reach" in pod["metadata"]["annotations"]
    # The upgrade value that keeps the behaviour before grants: no file, no flag.
    kept = render(sets=["ingress.host=vnc.example.com", "networkReach.enforced=false"])
    assert not [c for c in kept.of_kind("ConfigMap")
                if c["metadata"]["name"] == "vncgate-network-reach"]
    assert not [a for a in kept.one("Deployment", OPERATOR)["spec"]["template"]["spec"][
        "containers"][0]["args"] if a.startswith("--address-grants")]


def test_trusted_proxies_are_rendered_in_every_auth_mode() -> None:
    """Behind an Ingress every browser arrives from its controller: with relay.trustedProxies
    the relay takes the browser's address from X-Forwarded-For, in each mode."""
    for mode, extra in (("token", ()), ("none", ()),
                        ("proxy", ("relay.auth.trustedProxies={10.9.0.0/16}",))):
        rendered = render(sets=(f"relay.auth.mode={mode}", "ingress.host=vnc.example.com",
                                "relay.trustedProxies={10.42.0.0/16,fd00:42::/64}", *extra))
        args = rendered.one("Deployment", RELAY)["spec"]["template"]["spec"][
            "containers"][0]["args"]
        proxies = [a for a in args if a.startswith("--trusted-proxy=")]
        expected = ["--trusted-proxy=10.42.0.0/16", "--trusted-proxy=fd00:42::/64"]
        if mode == "proxy":
            expected.append("--trusted-proxy=10.9.0.0/16")
        assert proxies == expected, mode
    assert "relay.trustedProxies is empty" in install_dry_run(
        sets=("ingress.host=vnc.example.com",))["info"]["notes"]
    assert "relay.trustedProxies is empty" not in install_dry_run(
        sets=("ingress.host=vnc.example.com", "relay.trustedProxies={10.42.0.0/16}",
              ))["info"]["notes"]
