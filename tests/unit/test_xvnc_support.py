"""XvncServer is ready only when its own Xvnc listens, found without a connection to it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from harness.xvnc import XvncServer


def test_ready_means_our_own_xvnc_listens(tmp_path: Path) -> None:
    # Another server greets on the port first (another run's Xvnc, on a shared machine): the
    # Xvnc started here cannot bind it and exits. A readiness check that connects would take
    # the other server's greeting for this one's, and the test would talk to a stranger.
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        server = XvncServer(log_path=tmp_path / "xvnc.log", port=port)
        with pytest.raises(RuntimeError, match="Xvnc did not start"):
            server.start(timeout=30)
        other.settimeout(0)
        with pytest.raises(BlockingIOError):
            other.accept()  # nobody knocked


def test_starting_costs_the_server_no_connection(tmp_path: Path) -> None:
    # TigerVNC black-marks every connection that does not log in (5 block the address).
    with XvncServer(log_path=tmp_path / "xvnc.log"):
        pass
    assert "accepted:" not in (tmp_path / "xvnc.log").read_text()
