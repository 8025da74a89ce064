"""values.schema.json turns values that would not work into messages that name the value."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.chart.conftest import CHART, helm, value_args

SCHEMA_ERROR = "values don't meet the specifications of the schema"


def template_error(*sets: str, set_strings: tuple[str, ...] = ()) -> str:
    args = value_args(sets=sets)
    for item in set_strings:
        args += ["--set-string", item]
    result = helm("template", "vncgate", CHART, *args, check=False)
    assert result.returncode != 0, f"helm accepted {sets} {set_strings}:\n{result.stdout[:400]}"
    return result.stderr


def test_replicas_as_a_string() -> None:
    message = template_error(set_strings=("relay.replicas=three",))
    assert SCHEMA_ERROR in message
    assert "at '/relay/replicas': got string, want integer" in message


def test_replicas_below_one() -> None:
    message = template_error("relay.replicas=0")
    assert "at '/relay/replicas': minimum: got 0, want 1" in message


def test_unknown_top_level_key() -> None:
    message = template_error("replicas=3")
    assert "at '': additional properties 'replicas' not allowed" in message


def test_unknown_nested_key() -> None:
    message = template_error("relay.replica=3")
    assert "at '/relay': additional properties 'replica' not allowed" in message


def test_ingress_enabled_without_host() -> None:
    message = template_error("ingress.enabled=true")
    assert SCHEMA_ERROR in message
    assert "at '/ingress/host'" in message
    assert "minLength: got 0, want 1" in message


def test_proxy_auth_without_trusted_proxies() -> None:
    message = template_error("relay.auth.mode=proxy")
    assert "at '/relay/auth/trustedProxies': minItems: got 0, want 1" in message


def test_auth_mode_typo() -> None:
    message = template_error("relay.auth.mode=tokn")
    assert SCHEMA_ERROR in message
    assert "at '/relay/auth/mode': value must be one of 'none', 'proxy', 'token', 'oidc'" \
        in message


def test_oidc_mode_says_what_it_needs() -> None:
    message = template_error("relay.auth.mode=oidc")
    assert "relay.auth.mode=oidc needs relay.auth.oidc.issuer" in message
    message = template_error("relay.auth.mode=oidc",
                             "relay.auth.oidc.issuer=http://idp.example.com")
    assert "at '/relay/auth/oidc/issuer'" in message
    base = ("relay.auth.mode=oidc", "relay.auth.oidc.issuer=https://idp.example.com",
            "relay.auth.oidc.clientID=vncgate")
    message = template_error(*base)
    assert "relay.auth.oidc.clientSecret.existingSecret" in message
    message = template_error(*base, "relay.auth.oidc.clientSecret.existingSecret=vncgate-oidc")
    assert "needs a public URL" in message
    message = template_error(*base, "relay.auth.oidc.clientSecret.existingSecret=vncgate-oidc",
                             "relay.auth.oidc.clientSecret.value=hunter2")
    assert "at '/relay/auth/oidc/clientSecret': additional properties 'value'" in message


def test_oidc_mode_with_restricted_egress_names_the_provider_value() -> None:
    message = template_error(
        "relay.auth.mode=oidc", "relay.auth.oidc.issuer=https://idp.example.com",
        "relay.auth.oidc.clientID=vncgate", "ingress.host=vnc.example.com",
        "relay.auth.oidc.clientSecret.existingSecret=vncgate-oidc", "networkPolicy.enabled=true",
        "networkPolicy.relayEgress.enabled=true",
        "networkPolicy.relayEgress.vncTo[0].ipBlock.cidr=10.20.0.0/16",
        "networkPolicy.relayEgress.apiServerTo[0].ipBlock.cidr=10.0.0.10/32")
    assert "needs networkPolicy.relayEgress.oidcProviderTo" in message


def test_token_mode_without_any_user_says_what_to_set() -> None:
    message = template_error(set_strings=("relay.auth.token.initialUser=",))
    assert "relay.auth.mode=token needs users" in message
    assert "set relay.auth.token.initialUser" in message
    assert "relay.auth.token.existingSecret" in message


def test_token_mode_with_users_of_your_own_and_no_initial_user_renders() -> None:
    result = helm("template", "vncgate", CHART, "--set-string", "relay.auth.token.initialUser=",
                  "--set", "relay.auth.token.existingSecret=my-users")
    assert "secretName: my-users" in result.stdout
    assert "name: vncgate-users" not in result.stdout


def test_no_initial_user_is_needed_outside_token_mode() -> None:
    helm("template", "vncgate", CHART, "--set-string", "relay.auth.token.initialUser=",
         "--set", "relay.auth.mode=none")


def test_ingress_enabled_with_host_renders() -> None:
    result = helm("template", "vncgate", CHART,
                  *value_args(sets=["ingress.enabled=true", "ingress.host=vnc.example.com"]))
    assert "kind: Ingress" in result.stdout


@pytest.mark.parametrize("value", ["30", "thirty", "5 m", "-1s"])
def test_durations_are_kubernetes_style(value: str) -> None:
    message = template_error(set_strings=(f"operator.probeInterval={value}",))
    assert "at '/operator/probeInterval'" in message
    assert "does not match pattern" in message


def test_a_duration_as_a_number() -> None:
    message = template_error("operator.resyncInterval=60")
    assert "at '/operator/resyncInterval': got number, want string" in message


@pytest.mark.parametrize(("setting", "where"), [
    ("relay.logLevel=LOUD", "/relay/logLevel"),
    ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
    ("relay.podAntiAffinity=strict", "/relay/podAntiAffinity"),
    ("operator.watchNamespaces={Lab_1}", "/operator/watchNamespaces/0"),
    ("publicUrl=vnc.example.com", "/publicUrl"),
    ("relay.extraArgs={-v}", "/relay/extraArgs/0"),
    ("relay.authorization=rbac", "/relay/authorization"),
    ("relay.authorization=auto", "/relay/authorization"),
    ("relay.auth.token.initialUser=ad:min", "/relay/auth/token/initialUser"),
    ("relay.auth.proxy.userHeader=X User", "/relay/auth/proxy/userHeader"),
    ("relay.auth.token.initialUserClusterwide=true", "/relay/auth/token"),
    ("relay.auth.keys.secretName=mine", "/relay/auth/keys"),
    ("relay.leases=true", "/relay/leases"),
    ("rbac.viewerClusterRole.name=Viewer", "/rbac/viewerClusterRole/name"),
    ("ingress.hashByTarget=yes", "/ingress/hashByTarget"),
    ("webhook.timeoutSeconds=60", "/webhook/timeoutSeconds"),
    ("webhook.certManager.issuerRef.kind=Vault", "/webhook/certManager/issuerRef/kind"),
    ("networkReach.grants[0].cidrs={10.0.0.0/8}", "/networkReach/grants/0"),
    ("networkReach.grants[0].namespaces={Lab}", "/networkReach/grants/0/namespaces/0"),
    ("networkReach.grants[0].ports={59x}", "/networkReach/grants/0/ports/0"),
])
def test_values_that_would_not_work(setting: str, where: str) -> None:
    assert f"at '{where}'" in template_error(setting)


def test_a_grant_of_host_names_needs_networks_for_them() -> None:
    message = template_error("networkReach.grants[0].namespaces={lab}",
                             "networkReach.grants[0].hosts={*.bmc.example}")
    assert "at '/networkReach/grants/0'" in message and "cidrs" in message


def test_every_value_in_values_yaml_is_in_the_schema() -> None:
    """The schema is closed, so a value added to values.yaml without the schema fails to render;
    this says which one."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node: dict[str, object], props: dict[str, object], path: str) -> None:
        for key, value in node.items():
            assert key in props, f"{path}.{key} is in values.yaml but not in values.schema.json"
            sub = props[key]
            assert isinstance(sub, dict)
            if "$ref" in sub:
                sub = schema["definitions"][sub["$ref"].rsplit("/", 1)[1]]
            if isinstance(value, dict) and sub.get("additionalProperties") is False:
                walk(value, sub["properties"], f"{path}.{key}")

    walk(values, schema["properties"], "")
