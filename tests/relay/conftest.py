"""Fixtures of the relay tests that speak raw WebSocket frames to a relay's public listener."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from harness.certs import make_ca, make_server_cert
from tests.relay.test_endings import Listener


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
