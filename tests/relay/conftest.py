"""Fixtures of the relay tests that speak raw WebSocket frames to a relay's public listener."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.certs import make_ca, make_server_cert
from tests.relay.test_endings import Listener
from vncgate.relay import internals


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    ca = make_ca(directory / "ca")
    pem = make_server_cert(ca, directory / "relay", "relay")
    return ca.cert, pem.cert, pem.key


@pytest.fixture(params=["http", "https"])
def listener(request: pytest.FixtureRequest,
             certificates: tuple[Path, Path, Path]) -> Listener:
    """The relay's plain public listener, then its TLS one with the test's own CA."""
    if request.param == "http":
        return Listener()
    ca, cert, key = certificates
    return Listener({"tls_cert": cert, "tls_key": key}, ssl.create_default_context(cafile=ca))


@pytest.fixture(params=["private", "public"])
def path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each test on the private path (the relay's reader: messages straight to the session),
    then on the public fallback (every message through aiohttp's queue and the pump). Tests
    that parametrize a `path` of their own (test_pages, test_embed) are not affected."""
    if request.param == "private":
        assert internals.private_in_use(), f"the fast paths are off: {internals.MISSING}"
        yield "private"
    else:
        with internals.public_api_only():
            yield "public"
