"""The command lines the chart renders are ones the relay and the operator accept: each is parsed
by the component's own argument parser, as the container would run it."""

from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.chart.conftest import CI_VALUES, Rendered, ci_id, render
from vncgate.common.addresses import Address
from vncgate.operator.settings import parse_args
from vncgate.relay.access.roles import RoleNames
from vncgate.relay.settings import settings_from_args

TOKEN_PATH = "/etc/vncgate/registration-token/token"
USERS_PATH = "/etc/vncgate/users/users.yaml"
KEYS_DIR = "/etc/vncgate/keys"
GRANTS_PATH = "/etc/vncgate/network-reach/grants.yaml"
WEBHOOK_DIR = "/etc/vncgate/webhook"
T = TypeVar("T")


def command_of(values: list[Path], deployment: str, sets: tuple[str, ...] = (),
               release: str = "vncgate") -> list[str]:
    rendered = render(values, sets, release)
    (container,) = rendered.one("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return [*container["command"], *container["args"]]


def parse(parser: Callable[[list[str]], T], args: list[str], token_file: Path,
          files: dict[str, Path] | None = None) -> T:
    """Run a component's parser on the rendered args, the token path (and any other path in
    `files`, from the path in the pod to a real file) pointing at a real file."""
    replacements = {TOKEN_PATH: token_file, **(files or {})}
    for pod_path, real in replacements.items():
        args = [arg.replace(pod_path, str(real)) for arg in args]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parser(args)
    except SystemExit:
        pytest.fail(f"the component refuses the chart's command line {args}:\n{stderr.getvalue()}")


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("a-registration-token-of-48-characters-0123456789\n")
    return path


def relay_files(values: list[Path], tmp_path: Path) -> dict[str, Path]:
    """The files the pods would mount (users file, keys, network-reach grants, the webhook's
    certificate): from the Secrets and ConfigMaps the chart generates, or stand-ins for the
    Secrets of your own that the values name."""
    rendered = render(values)
    secrets = {s["metadata"]["name"]: s["data"] for s in rendered.of_kind("Secret")}
    contents = {
        USERS_PATH: "alice:\n  secret: a-long-enough-secret\n  groups: [lab-team]\n",
        f"{KEYS_DIR}/session-secret": "s" * 48,
        f"{KEYS_DIR}/link-key": "k" * 48,
        # relay.auth.oidc: the client secret and the provider's CA from objects of your own.
        "/etc/vncgate/oidc/client-secret": "the relay's client secret\n",
        "/etc/vncgate/oidc-ca/ca.crt": "-----BEGIN CERTIFICATE-----\n",
    }
    if "vncgate-users" in secrets:
        contents[USERS_PATH] = base64.b64decode(secrets["vncgate-users"]["users.yaml"]).decode()
    grants = [c["data"]["grants.yaml"] for c in rendered.of_kind("ConfigMap")
              if c["metadata"]["name"] == "vncgate-network-reach"]
    if grants:  # the network-reach grants, mounted into the relay and the operator
        contents[GRANTS_PATH] = grants[0]
    if "vncgate-operator-webhook-tls" in secrets:  # the webhook's certificate (genCA)
        for key in ("tls.crt", "tls.key"):
            contents[f"{WEBHOOK_DIR}/{key}"] = base64.b64decode(
                secrets["vncgate-operator-webhook-tls"][key]).decode()
    if "vncgate-keys" in secrets:
        for key in ("session-secret", "link-key"):
            contents[f"{KEYS_DIR}/{key}"] = base64.b64decode(secrets["vncgate-keys"][key]).decode()
    files = {}
    for pod_path, content in contents.items():
        real = tmp_path / pod_path.strip("/").replace("/", "_")
        real.write_text(content)
        files[pod_path] = real
    return files


@pytest.mark.parametrize("values", CI_VALUES, ids=ci_id)
def test_relay_accepts_the_chart_command_line(values: Path, token_file: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LISTEN", "INTERNAL_LISTEN", "ALLOWED_ORIGIN", "WAIT_FOR_SYNC", "AUTH",
                 "TRUSTED_PROXY", "PUBLIC_URL", "AUTHORIZATION", "USERS_FILE",
                 "SESSION_SECRET_FILE", "LINK_KEY_FILE", "LEASE_NAMESPACE", "IDENTITY",
                 "USER_HEADER", "GROUPS_HEADER", "KUBECONFIG_FILE"):
        monkeypatch.delenv(f"VNCGATE_{name}", raising=False)
    # The pod's name, from the downward API: the relay's identity in Leases.
    monkeypatch.setenv("POD_NAME", "vncgate-relay-7d9c8b6f5-x2k4q")
    command = command_of([values], "vncgate-relay")
    assert command[0] == "vncgate-relay"
    files = relay_files([values], tmp_path)
    settings = parse(settings_from_args, command[1:], token_file, files)
    assert settings.listen == Address("0.0.0.0", 8080)
    assert settings.internal_listen == Address("0.0.0.0", 8081)
    assert settings.api_token == token_file.read_text().strip()
    assert settings.log_format == "json"
    assert settings.wait_for_sync is True
    assert "--kube-api-connections=16" in command  # relay.kubeApiConnections
    assert settings.kube_api_connections == 16
    # DNS rebinding: the resolved address of a target is checked against these at dial time.
    assert {str(n) for n in settings.deny_networks} >= {"127.0.0.0/8", "::1/128",
                                                         "169.254.0.0/16", "fe80::/10"}
    expected_origins = {
        "default": (),
        "ingress-tls": ("https://vnc.example.com",),
        "ha-hpa": ("https://vnc.example.com",),
        "existing-secret": ("https://consoles.example.org",),
        "restricted-namespaces": ("https://vnc.lab.example.com",),
        "auth-proxy": ("https://vnc.example.com",),
        "auth-oidc": ("https://vnc.example.com",),
        "gateway-api": ("https://vnc.example.com",),  # the HTTPRoute's first host name
        "monitoring": (),
        "pod-settings": (),
        "recording": (),
        "kubevirt": (),
        "conventions": ("https://vnc.example.com", "https://vnc.lab.example.com"),
    }
    assert settings.allowed_origins == expected_origins[ci_id(values)]
    if ci_id(values) == "recording":  # the chart's recording flags, as the relay reads them
        assert str(settings.recording.directory) == "/var/lib/vncgate/recordings"
        assert (settings.recording.keyframe_interval, settings.recording.max_age,
                settings.recording.max_total) == (5, 30 * 86400, 40 << 30)
    auth = settings.auth
    assert auth.public_url == (expected_origins[ci_id(values)] or ("",))[0]
    # Login cookies and share links are signed with the mounted keys, the same on every pod.
    assert auth.session_secret == files[f"{KEYS_DIR}/session-secret"].read_bytes()
    assert auth.link_keys == (files[f"{KEYS_DIR}/link-key"].read_bytes(),)
    if ci_id(values) == "auth-proxy":
        assert auth.mode == "proxy"
        assert [str(n) for n in auth.trusted_proxies] == ["10.42.0.0/16", "fd00:42::/64"]
        assert (auth.user_header, auth.groups_header) == (
            "X-Auth-Request-User", "X-Auth-Request-Groups")
        assert auth.users == {}
        assert auth.authorization == "manifest"
        assert settings.lease_namespace is None
        return
    if ci_id(values) == "auth-oidc":
        # The API server's claim mappings, as the values say them; no users file.
        assert auth.mode == "oidc" and auth.users == {}
        oidc = auth.oidc
        assert oidc is not None
        assert (oidc.issuer, oidc.client_id, oidc.client_secret) == (
            "https://keycloak.example.com/realms/lab", "vncgate", "the relay's client secret")
        assert (oidc.username_claim, oidc.user_prefix, oidc.groups_claim,
                oidc.groups_prefix) == ("email", "", "groups", "oidc:")
        assert oidc.bearer_audiences == ("kubernetes",)
        assert oidc.ca_file is not None and oidc.ca_file.name.endswith("ca.crt")
        assert auth.authorization == "kubernetes"
        return
    assert auth.mode == "token"
    if ci_id(values) == "existing-secret":
        assert set(auth.users) == {"alice"}
    else:
        # The generated users file is one the relay loads: the initial user, a plain secret.
        (user,) = auth.users.values()
        assert user.name == "admin"
        assert len(user.secret) == 32 and user.groups == ()
    assert auth.authorization == "kubernetes"
    assert settings.lease_namespace == "vncgate-system"
    assert settings.identity == "vncgate-relay-7d9c8b6f5-x2k4q"


def test_relay_without_sign_in_or_leases(token_file: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """auth none, only when asked for: no users file; still the same keys (share links)."""
    for name in ("AUTH", "USERS_FILE", "LEASE_NAMESPACE", "AUTHORIZATION"):
        monkeypatch.delenv(f"VNCGATE_{name}", raising=False)
    sets = ("relay.auth.mode=none", "relay.leases.enabled=false")
    command = command_of([], "vncgate-relay", sets)
    assert not any(arg.startswith("--users-file") for arg in command)
    settings = parse(settings_from_args, command[1:], token_file, relay_files([], tmp_path))
    assert settings.auth.mode == "none"
    assert settings.lease_namespace is None


@pytest.mark.parametrize("values", CI_VALUES, ids=ci_id)
def test_operator_accepts_the_chart_command_line(values: Path, token_file: Path,
                                                 tmp_path: Path) -> None:
    command = command_of([values], "vncgate-operator")
    assert command[0] == "vncgate-operator"
    settings = parse(lambda args: parse_args(args, environ={}), command[1:], token_file,
                     relay_files([values], tmp_path))
    assert settings.relay_service == ("vncgate-system", "vncgate-relay-headless")
    assert settings.relay_urls == ()
    assert settings.liveness_endpoint == "http://0.0.0.0:8082/healthz"
    assert settings.metrics_listen == ("0.0.0.0", 8083)
    assert settings.standalone is True
    assert settings.log_format == "json"
    by_values: dict[str, dict[str, Any]] = {
        "default": {"public_url": "http://127.0.0.1:8080", "namespaces": ()},
        "ingress-tls": {"public_url": "https://vnc.example.com", "namespaces": ()},
        "ha-hpa": {"public_url": "https://vnc.example.com", "namespaces": ()},
        "existing-secret": {"public_url": "https://consoles.example.org", "namespaces": ()},
        "restricted-namespaces": {"public_url": "https://vnc.lab.example.com",
                                  "namespaces": ("lab", "desktops"),
                                  "resync_interval": 300.0, "probe_interval": 45.0},
        "auth-proxy": {"public_url": "https://vnc.example.com", "namespaces": ()},
        "auth-oidc": {"public_url": "https://vnc.example.com", "namespaces": ()},
        "gateway-api": {"public_url": "https://vnc.example.com", "namespaces": ()},
        "monitoring": {"public_url": "http://127.0.0.1:8080", "namespaces": ()},
        "pod-settings": {"public_url": "http://127.0.0.1:8080", "namespaces": ()},
        "recording": {"public_url": "http://127.0.0.1:8080", "namespaces": ()},
        "conventions": {"public_url": "https://vnc.example.com", "namespaces": ()},
        "kubevirt": {"public_url": "http://127.0.0.1:8080", "namespaces": (),
                     "kubevirt_discovery": True},
    }
    expected = by_values[ci_id(values)]
    for field, value in expected.items():
        assert getattr(settings, field) == value, field
    if ci_id(values) == "ingress-tls":
        assert len(settings.policy.allow_cidrs) == 1
        assert len(settings.policy.allow_hosts) == 1


def granting(rendered: Rendered, resource: str, verb: str) -> set[str]:
    """The ClusterRoles the release renders that grant `verb` on `resource` (no aggregates)."""
    return {role["metadata"]["name"] for role in rendered.of_kind("ClusterRole")
            for rule in role.get("rules") or ()
            if resource in rule.get("resources", ()) and verb in rule.get("verbs", ())}


@pytest.mark.parametrize(("release", "renamed"), [
    ("vncgate", False), ("consoles", False), ("consoles", True)],
    ids=["default-names", "another-release", "renamed"])
def test_every_role_a_message_names_is_one_the_release_created(
        release: str, renamed: bool, token_file: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The relay's refusals and 4424, and the operator's CredentialsNotReadable advice, name
    ClusterRoles: each name is one this release renders, whatever the release is called and
    whatever the values call the roles."""
    for name in ("VIEWER_ROLE", "EDITOR_ROLE", "ADMIN_ROLE", "RECORDINGS_VIEWER_ROLE",
                 "CREDENTIALS_ROLE"):
        monkeypatch.delenv(f"VNCGATE_{name}", raising=False)
    fullname = "vncgate" if release == "vncgate" else f"{release}-vncgate"  # helm's fullname
    sets = ("relay.credentials.enabled=true",)
    if renamed:
        sets += ("rbac.viewerClusterRole.name=lab-console-viewer",
                 "rbac.editorClusterRole.name=lab-console-editor",
                 "rbac.adminClusterRole.name=lab-console-admin",
                 "rbac.recordingsViewerClusterRole.name=lab-recordings-viewer")
    rendered = render([], sets, release)
    relay = command_of([], f"{fullname}-relay", sets, release)
    files = relay_files([], tmp_path)  # same content whatever the release's name
    roles = parse(settings_from_args, relay[1:], token_file, files).roles
    assert roles.viewer in granting(rendered, "vnctargets", "connect")
    assert roles.editor in granting(rendered, "vnctargets", "share")
    assert roles.admin in granting(rendered, "vnctargets", "sessions")
    assert roles.admin in granting(rendered, "vnctargets", "disconnect")
    assert roles.recordings_viewer in granting(rendered, "vnctargets/recordings", "get")
    assert roles.credentials in granting(rendered, "secrets", "get")
    operator = command_of([], f"{fullname}-operator", sets, release)
    settings = parse(lambda args: parse_args(args, environ={}), operator[1:], token_file, files)
    assert settings.relay_credentials_role == roles.credentials
    if renamed:  # not today's names by accident
        assert roles.viewer == "lab-console-viewer"
        assert roles.credentials == "consoles-vncgate-relay-credentials"
    elif release == "vncgate":
        assert roles == RoleNames()
    else:  # the release's own names, which a second release does not collide with
        assert roles == RoleNames(viewer="consoles-vncgate-viewer",
                                  editor="consoles-vncgate-editor",
                                  admin="consoles-vncgate-admin",
                                  recordings_viewer="consoles-vncgate-recordings-viewer",
                                  credentials="consoles-vncgate-relay-credentials")
