"""`vncgate-relay` as users run it: manifests, flags, environment, start and stop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from harness import reaper
from harness.waiting import wait_until
from tests.conftest import ROOT
from vncgate.common.addresses import Address
from vncgate.common.model import Route
from vncgate.relay.manifests import ManifestError, load_routes
from vncgate.relay.settings import settings_from_args

RELAY = [sys.executable, "-m", "vncgate.relay"]

GOOD = """\
apiVersion: vncgate.io/v1alpha1
kind: VncTarget
metadata: {name: bmc-1, namespace: lab}
spec:
  endpoint: {address: {host: 127.0.0.1, port: 5901}}
  displayName: BMC 1
---
apiVersion: vncgate.io/v1alpha1
kind: VncTarget
metadata: {name: desk}
spec:
  endpoint: {service: {name: desk, port: vnc}}
"""


def test_manifests_load_addresses_and_skip_service_targets(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "targets.yaml").write_text(GOOD)
    (tmp_path / "notes.txt").write_text("not a manifest")
    routes = load_routes([tmp_path], [Route("lab", "cli", "127.0.0.1", 5902)])
    assert routes == [Route("lab", "bmc-1", "127.0.0.1", 5901, display_name="BMC 1"),
                      Route("lab", "cli", "127.0.0.1", 5902)]
    assert "default/desk" in caplog.text and "needs the operator" in caplog.text


def test_every_problem_is_reported_with_file_document_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("port: 5901", "port: 99999") + "---\n"
                   "apiVersion: vncgate.io/v1\nkind: VncTarget\nmetadata: {name: x}\n"
                   "---\n- a list\n")
    (tmp_path / "broken.yml").write_text("spec: [unclosed\n")
    first = GOOD.split("---")[0]
    (tmp_path / "dup.yaml").write_text(f"{first}---\n{first}")
    with pytest.raises(ManifestError) as raised:
        load_routes([tmp_path])
    problems = raised.value.problems
    assert any(f"{bad} document 0: spec.endpoint.address.port" in p for p in problems)
    assert any(f"{bad} document 2: apiVersion" in p and "vncgate.io/v1alpha1" in p
               for p in problems)
    assert any(f"{bad} document 3: expected a VncTarget" in p for p in problems)
    assert any("broken.yml: not valid YAML" in p for p in problems)
    assert any("dup.yaml document 1: lab/bmc-1 is also defined" in p for p in problems), problems


def test_unknown_spec_fields_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(GOOD.split("---")[0] + "  viewonly: true\n")
    with pytest.raises(ManifestError, match=r"spec\.viewonly: unknown field"):
        load_routes([path])


def test_relay_refuses_to_start_on_bad_manifests(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(GOOD.replace("port: 5901", "port: 0"))
    result = subprocess.run([*RELAY, "--targets", str(tmp_path), "--listen", "127.0.0.1:0",
                             "--internal-listen", "127.0.0.1:0"],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 2
    assert "cannot start; fix these targets" in result.stderr
    assert "spec.endpoint.address.port" in result.stderr


@pytest.mark.parametrize(("args", "words"), [
    (["--target", "lab/desk"], "NAMESPACE/NAME=HOST:PORT"),
    (["--target", "lab/Desk=127.0.0.1:5900"], "not an object name"),
    (["--listen", "8080"], "HOST:PORT"),
    (["--max-sessions", "0"], "at least 1"),
    (["--kube-api-connections", "0"], "--kube-api-connections must be at least 1"),
    (["--api-token-file", "/nonexistent/token"], "--api-token-file"),
    (["--stall-timeout", "60"], "--stall-timeout: '60' is not a duration"),
    (["--shutdown-grace", "soon"], "--shutdown-grace"),
    (["--kubernetes-tokens"], "--kubernetes-tokens needs a sign-in mode"),
    (["--auth", "proxy", "--trusted-proxy", "127.0.0.1/32", "--authorization", "manifest",
      "--kubernetes-tokens"], "--kubernetes-tokens needs the Kubernetes API"),
    (["--token-audience", "vncgate"], "--token-audience goes with --kubernetes-tokens"),
    (["--metrics-listen", "9090"], "--metrics-listen: '9090' is not HOST:PORT"),
    (["--internal-listen", "127.0.0.1:9091", "--metrics-listen", "127.0.0.1:9091"],
     "give /metrics a port of its own"),
])
def test_bad_flags_say_what_to_write(args: list[str], words: str) -> None:
    result = subprocess.run([*RELAY, *args], capture_output=True, text=True, timeout=30,
                            cwd=ROOT)
    assert result.returncode == 2
    assert words in result.stderr


def test_short_token_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token = tmp_path / "token"
    token.write_text("short\n")
    with pytest.raises(SystemExit):
        settings_from_args(["--api-token-file", str(token)])
    assert "at least 16 characters" in capsys.readouterr().err


def test_environment_variables_set_the_flags(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123\n")
    monkeypatch.setenv("VNCGATE_LISTEN", "0.0.0.0:9000")
    monkeypatch.setenv("VNCGATE_TARGET", "lab/a=127.0.0.1:5901, lab/b=[::1]:5902")
    monkeypatch.setenv("VNCGATE_API_TOKEN_FILE", str(token))
    monkeypatch.setenv("VNCGATE_ALLOWED_ORIGIN", "https://vnc.example.com/")
    monkeypatch.setenv("VNCGATE_WAIT_FOR_SYNC", "true")
    monkeypatch.setenv("VNCGATE_AUTH", "none")  # 0.0.0.0 needs a choice of authentication
    settings = settings_from_args([])
    assert settings.listen == Address("0.0.0.0", 9000)
    assert settings.targets == (Route("lab", "a", "127.0.0.1", 5901),
                                Route("lab", "b", "::1", 5902))
    assert settings.api_token == "0123456789abcdef0123"
    assert settings.allowed_origins == ("https://vnc.example.com",)
    assert settings.wait_for_sync
    monkeypatch.setenv("VNCGATE_STALL_TIMEOUT", "2m")
    monkeypatch.setenv("VNCGATE_SHUTDOWN_GRACE", "20s")
    assert (settings_from_args([]).stall_timeout, settings_from_args([]).shutdown_grace) == (
        120, 20)
    assert settings_from_args(["--shutdown-grace", "9s"]).shutdown_grace == 9
    monkeypatch.setenv("VNCGATE_METRICS_LISTEN", "0.0.0.0:9090")
    assert settings_from_args([]).metrics_listen == Address("0.0.0.0", 9090)
    assert settings_from_args([]).kube_api_connections == 16
    monkeypatch.setenv("VNCGATE_KUBE_API_CONNECTIONS", "4")
    assert settings_from_args([]).kube_api_connections == 4
    assert settings_from_args(["--kube-api-connections=8"]).kube_api_connections == 8
    # A flag wins over the environment.
    assert settings_from_args(["--listen", "127.0.0.1:1234"]).listen == Address("127.0.0.1", 1234)


def test_relay_serves_and_stops_cleanly_on_sigterm(xvnc: object) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = reaper.popen([*RELAY, "--listen", "127.0.0.1:0", "--internal-listen",
                             "127.0.0.1:0", "--target", "lab/desk=127.0.0.1:5999",
                             "--log-format", "json"],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert proc.stderr is not None
        lines: list[str] = []

        def listening() -> str | None:
            assert proc.stderr is not None
            lines.append(proc.stderr.readline())
            found = re.search(r'"public": "(http://127\.0\.0\.1:\d+)"', lines[-1])
            return found.group(1) if found else None

        url = wait_until(listening, "the relay's listening line", timeout=20, interval=0,
                         context=lambda: lines)
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as resp:  # noqa: S310
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        reaper.end(proc)
