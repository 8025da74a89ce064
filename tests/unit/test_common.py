"""vncgate.common's primitives: one implementation each, shared by the relay and the operator."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from vncgate.common import envflags
from vncgate.common.addresses import Address, host_port, http_url, split_host_port
from vncgate.common.durations import PATTERN, DurationError, format_duration, parse_duration
from vncgate.common.kube import MAX_WATCH_EVENT, WatchEventTooLarge, json_lines
from vncgate.common.networks import NetworkError, parse_cidr, parse_cidrs
from vncgate.common.rfb import parse_greeting, parse_version
from vncgate.common.spec import SpecError, parse_sessions

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90.0), ("1.5s", 1.5), ("500ms", 0.5), ("15m", 900.0), ("1h30m", 5400.0),
    ("8h", 28800.0), ("1d", 86400.0), ("1d12h", 129600.0), (" 30s ", 30.0),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "abc", "10x", "5m3", "0s", "-1s", "30", "1h 30m", "s", 12])
def test_bad_durations_say_what_to_write(bad: object) -> None:
    with pytest.raises(DurationError, match=r"e\.g\. 90s|longer than zero"):
        parse_duration(bad)


def test_bare_seconds_only_where_asked_for() -> None:
    assert parse_duration("30", bare_seconds=True) == 30.0
    assert parse_duration(12, bare_seconds=True) == 12.0
    with pytest.raises(DurationError):
        parse_duration(True, bare_seconds=True)


@pytest.mark.parametrize("seconds", [1.0, 90.0, 1.5, 0.25, 86400.0])
def test_formatted_durations_parse_back(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


def test_the_crd_pattern_is_the_parsers_grammar() -> None:
    """A spec duration the API server admits is one the relay and operator parse, and back."""
    for crd_path in (ROOT / "crds/vnctargets.vncgate.io.yaml",):
        crd = yaml.safe_load(crd_path.read_text())
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        sessions = schema["properties"]["spec"]["properties"]["sessions"]["properties"]
        for field in ("idleTimeout", "maxDuration"):
            assert sessions[field]["pattern"] == PATTERN, (crd_path, field)
    for text in ("1h30m", "1d", "90s", "500ms", "1.5s"):
        assert re.match(PATTERN, text)
    for text in ("30", "1 h", "1w"):
        assert not re.match(PATTERN, text)


def test_spec_durations_are_whole_seconds_within_bounds() -> None:
    policy = parse_sessions({"idleTimeout": "1h30m", "maxDuration": "1d"})
    assert (policy.idle_timeout, policy.max_duration) == (5400, 86400)
    with pytest.raises(SpecError, match="whole seconds"):
        parse_sessions({"idleTimeout": "1.5s"})
    with pytest.raises(SpecError, match="between 1s and 30d"):
        parse_sessions({"maxDuration": "31d"})


@pytest.mark.parametrize(("host", "port", "text"), [
    ("10.20.0.15", 5900, "10.20.0.15:5900"), ("::1", 5901, "[::1]:5901"),
    ("bmc1.lab.example", 443, "bmc1.lab.example:443"),
])
def test_host_port_brackets_ipv6(host: str, port: int, text: str) -> None:
    assert host_port(host, port) == text == str(Address(host, port))
    assert http_url(host, port) == f"http://{text}"
    assert split_host_port(text) == (host, str(port))


def test_split_host_port() -> None:
    assert split_host_port(":8080") == ("", "8080")
    assert split_host_port("[fe80::1]:80") == ("fe80::1", "80")
    assert split_host_port("no-port") is None


def test_cidrs() -> None:
    assert parse_cidr("10.20.0.0/16") == ipaddress.ip_network("10.20.0.0/16")
    assert parse_cidr("10.20.0.15") == ipaddress.ip_network("10.20.0.15/32")
    assert parse_cidr("10.20.0.1/16") == ipaddress.ip_network("10.20.0.0/16")
    # An IPv4-mapped range is the IPv4 range (addresses are folded before they are checked).
    assert parse_cidr("::ffff:10.0.0.0/104") == ipaddress.ip_network("10.0.0.0/8")
    assert parse_cidrs(["::1", "fd00::/8"], "--deny-cidr") == (
        ipaddress.ip_network("::1/128"), ipaddress.ip_network("fd00::/8"))
    with pytest.raises(NetworkError, match=r"--trusted-proxy 'ten' is not a CIDR"):
        parse_cidr("ten", "--trusted-proxy")


def test_env_flags() -> None:
    environ = {"VNCGATE_ALLOW_CIDR": " 10.0.0.0/8, ,192.168.0.0/16 ", "VNCGATE_VERBOSE": "On",
               "VNCGATE_STANDALONE": "no"}
    assert envflags.env("ALLOW_CIDR", environ) == " 10.0.0.0/8, ,192.168.0.0/16 "
    assert envflags.env("MISSING", environ) is None
    assert envflags.env_list("ALLOW_CIDR", environ) == ["10.0.0.0/8", "192.168.0.0/16"]
    assert envflags.env_list("MISSING", environ) == []
    assert envflags.env_flag("VERBOSE", environ) is True
    assert envflags.env_flag("STANDALONE", environ) is False
    assert envflags.env_flag("MISSING", environ) is False
    assert [envflags.truthy(w) for w in ("1", "TRUE", "yes", "on", "0", "", None)] == [
        True, True, True, True, False, False, False]


def test_rfb_greeting() -> None:
    assert parse_greeting(b"RFB 003.008\n") == "RFB 003.008"
    assert parse_version(b"RFB 003.003\n") == (3, 3)
    for bad in (b"RFB 003.008", b"SSH-2.0-Open\n", b"RFB 3.8\n\n\n\n\n", b"RFB 003.008\r\n"):
        assert parse_greeting(bad) is None and parse_version(bad) is None


# -- watch streams -------------------------------------------------------------------------


async def chunks_of(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


async def read_lines(data: bytes, size: int, limit: int = MAX_WATCH_EVENT) -> list[Any]:
    return [doc async for doc in json_lines(chunks_of(data, size), "/apis/x", limit)]


@pytest.mark.parametrize("size", [1, 7, 4096, 10**7])
async def test_watch_lines_span_any_chunks(size: int) -> None:
    big = {"type": "ADDED", "object": {"data": "x" * 300_000}}  # over aiohttp's line limit
    stream = b"".join(json.dumps(doc).encode() + b"\n"
                      for doc in ({"type": "ADDED"}, big, {"type": "DELETED"}))
    stream += b"\n\n" + json.dumps({"type": "BOOKMARK"}).encode()  # blank lines; no last \n
    assert await read_lines(stream, size) == [{"type": "ADDED"}, big, {"type": "DELETED"},
                                              {"type": "BOOKMARK"}]


@pytest.mark.parametrize("size", [100, 10_000])
async def test_a_watch_line_over_the_limit_is_refused_clearly(size: int) -> None:
    stream = b'{"type": "ADDED"}\n' + b'{"a": "' + b"x" * 5000 + b'"}\n'
    with pytest.raises(WatchEventTooLarge) as refused:
        await read_lines(stream, size, limit=4096)
    assert refused.value.status == 413
    assert "an event of the watch of /apis/x is longer than 4096 bytes" in str(refused.value)
    # Exactly the limit is taken.
    assert await read_lines(b'{"a": "' + b"x" * (4096 - 9) + b'"}\n', size, limit=4096)
