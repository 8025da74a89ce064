from __future__ import annotations

from pathlib import Path

import pytest

from vncgate.operator.settings import parse_args, parse_duration


@pytest.fixture
def token_file(tmp_path: Path) -> str:
    path = tmp_path / "token"
    path.write_text("s3cret-token\n")
    return str(path)


def test_interval_flags_take_the_shared_duration_grammar_and_bare_seconds() -> None:
    # The grammar itself is tested in tests/unit/test_common.py; flags also take bare seconds.
    assert parse_duration("1h30m") == 5400.0
    assert parse_duration("1d") == 86400.0
    assert parse_duration("30") == 30.0
    with pytest.raises(ValueError, match="duration"):
        parse_duration("5m3")


def test_flags(token_file: str) -> None:
    settings = parse_args([
        "--namespace", "lab", "--namespace", "ops", "--relay-url", "http://127.0.0.1:8081/",
        "--relay-url", "http://127.0.0.1:9081", "--api-token-file", token_file,
        "--public-url", "https://vnc.example.com/", "--allow-cidr", "10.20.0.0/16",
        "--allow-host", "*.bmc.lab.example", "--resync-interval", "2m", "--probe-interval", "15",
        "--probe-timeout", "1500ms", "--cluster-domain", "corp.local", "--liveness", "off",
    ], environ={})
    assert settings.namespaces == ("lab", "ops")
    assert settings.relay_urls == ("http://127.0.0.1:8081", "http://127.0.0.1:9081")
    assert settings.api_token == "s3cret-token"
    assert settings.public_url == "https://vnc.example.com"
    assert settings.target_url("lab", "desk-1") == "https://vnc.example.com/t/lab/desk-1/"
    assert [str(n) for n in settings.policy.allow_cidrs] == ["10.20.0.0/16"]
    assert settings.policy.allow_hosts == ("*.bmc.lab.example",)
    assert (settings.resync_interval, settings.probe_interval, settings.probe_timeout) == (
        120.0, 15.0, 1.5)
    assert settings.cluster_domain == "corp.local"
    assert settings.liveness_endpoint is None


def test_environment(token_file: str) -> None:
    settings = parse_args([], environ={
        "VNCGATE_RELAY_SERVICE": "vncgate/vncgate-relay-headless",
        "VNCGATE_API_TOKEN_FILE": token_file, "VNCGATE_ALLOW_CIDR": "10.0.0.0/8, 192.168.0.0/16",
        "VNCGATE_NAMESPACE": "lab,ops", "VNCGATE_PROBE_INTERVAL": "1m",
    })
    assert settings.relay_service == ("vncgate", "vncgate-relay-headless")
    assert settings.namespaces == ("lab", "ops")
    assert len(settings.policy.allow_cidrs) == 2
    assert settings.probe_interval == 60.0
    assert settings.policy.is_default is False
    assert settings.target_url("lab", "x") is None  # no public URL: no status.url


def test_flags_win_over_environment(token_file: str) -> None:
    settings = parse_args(["--relay-url", "http://10.0.0.1:8081", "--probe-interval", "5s"],
                          environ={"VNCGATE_RELAY_URL": "http://10.0.0.2:8081",
                                   "VNCGATE_PROBE_INTERVAL": "1m",
                                   "VNCGATE_API_TOKEN_FILE": token_file})
    assert settings.relay_urls == ("http://10.0.0.1:8081",)
    assert settings.probe_interval == 5.0


@pytest.mark.parametrize(("argv", "message"), [
    ([], "tell the operator where the relays are"),
    (["--relay-url", "http://a:1", "--relay-service", "ns/svc"], "not both"),
    (["--relay-url", "ftp://a"], "not an http"),
    (["--relay-service", "just-a-name"], "NAMESPACE/NAME"),
    (["--relay-url", "http://a:1", "--allow-cidr", "10.0.0.0/40"], "CIDR"),
    (["--relay-url", "http://a:1", "--probe-interval", "often"], "duration"),
])
def test_usage_errors_say_what_to_do(argv: list[str], message: str, token_file: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv, environ={"VNCGATE_API_TOKEN_FILE": token_file})
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_token_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--relay-url", "http://a:1"], environ={})
    assert "--api-token-file is required" in capsys.readouterr().err


def test_kopf_lists_existing_targets_in_pages(token_file: str) -> None:
    # An unpaged initial LIST of 5,000 targets was the RSS peak after a restart:
    # kopf asks for pages of `chunk_size` and handles each page before it reads the next.
    import kopf

    from vncgate.operator.handlers import LIST_PAGE_SIZE, tune

    kopf_settings = kopf.OperatorSettings()
    assert kopf_settings.watching.chunk_size is None  # kopf's default: one LIST of everything
    tune(kopf_settings, parse_args(["--relay-url", "http://127.0.0.1:8081/",
                                    "--api-token-file", token_file]))
    assert kopf_settings.watching.chunk_size == LIST_PAGE_SIZE
    assert 100 <= LIST_PAGE_SIZE <= 1000

