"""The command lines the chart renders are ones the relay and the operator accept: each is parsed
by the component's own argument parser, as the container would run it."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from vncgate_operator.settings import parse_args

from relay.settings import HostPort, settings_from_args
from tests.chart.conftest import CI_VALUES, ci_id, render

TOKEN_PATH = "/etc/vncgate/registration-token/token"
T = TypeVar("T")


def command_of(values: list[Path], deployment: str, sets: tuple[str, ...] = ()) -> list[str]:
    rendered = render(values, sets)
    (container,) = rendered.one("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return [*container["command"], *container["args"]]


def parse(parser: Callable[[list[str]], T], args: list[str], token_file: Path) -> T:
    """Run a component's parser on the rendered args, the token path pointing at a real file."""
    args = [arg.replace(TOKEN_PATH, str(token_file)) for arg in args]
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


@pytest.mark.parametrize("values", CI_VALUES, ids=ci_id)
def test_relay_accepts_the_chart_command_line(values: Path, token_file: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LISTEN", "INTERNAL_LISTEN", "ALLOWED_ORIGIN", "WAIT_FOR_SYNC", "AUTH",
                 "TRUSTED_PROXY", "PUBLIC_URL", "AUTHORIZATION"):
        monkeypatch.delenv(f"VNCGATE_{name}", raising=False)
    command = command_of([values], "vncgate-relay")
    assert command[0] == "vncgate-relay"
    settings = parse(settings_from_args, command[1:], token_file)
    assert settings.listen == HostPort("0.0.0.0", 8080)
    assert settings.internal_listen == HostPort("0.0.0.0", 8081)
    assert settings.api_token == token_file.read_text().strip()
    assert settings.log_format == "json"
    assert settings.wait_for_sync is True
    expected_origins = {
        "default": (),
        "ingress-tls": ("https://vnc.example.com",),
        "ha-hpa": ("https://vnc.example.com",),
        "existing-secret": ("https://consoles.example.org",),
        "restricted-namespaces": ("https://vnc.lab.example.com",),
    }
    assert settings.allowed_origins == expected_origins[ci_id(values)]
    auth = settings.auth
    assert auth.mode == ("proxy" if ci_id(values) == "ingress-tls" else "none")
    assert auth.public_url == (expected_origins[ci_id(values)] or ("",))[0]
    # No ServiceAccount token in the pod: targets' own access rules, no SubjectAccessReviews.
    assert auth.authorization == "manifest"


@pytest.mark.parametrize("values", CI_VALUES, ids=ci_id)
def test_operator_accepts_the_chart_command_line(values: Path, token_file: Path) -> None:
    command = command_of([values], "vncgate-operator")
    assert command[0] == "vncgate-operator"
    settings = parse(lambda args: parse_args(args, environ={}), command[1:], token_file)
    assert settings.relay_service == ("vncgate-system", "vncgate-relay-headless")
    assert settings.relay_urls == ()
    assert settings.liveness_endpoint == "http://0.0.0.0:8082/healthz"
    assert settings.standalone is True
    assert settings.log_format == "json"
    expected: dict[str, dict[str, Any]] = {
        "default": {"public_url": "http://127.0.0.1:8080", "namespaces": ()},
        "ingress-tls": {"public_url": "https://vnc.example.com", "namespaces": ()},
        "ha-hpa": {"public_url": "https://vnc.example.com", "namespaces": ()},
        "existing-secret": {"public_url": "https://consoles.example.org", "namespaces": ()},
        "restricted-namespaces": {"public_url": "https://vnc.lab.example.com",
                                  "namespaces": ("lab", "desktops"),
                                  "resync_interval": 300.0, "probe_interval": 45.0},
    }[ci_id(values)]
    for field, value in expected.items():
        assert getattr(settings, field) == value, field
    if ci_id(values) == "ingress-tls":
        assert len(settings.policy.allow_cidrs) == 1
        assert len(settings.policy.allow_hosts) == 1
