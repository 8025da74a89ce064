"""A real reverse proxy in front of a relay: HAProxy (Debian `haproxy`), as an Ingress would be.

`HttpProxy` runs `haproxy` in the foreground on a free loopback port with a config of its own,
in `mode http`, adding `X-Forwarded-For` (the client's address, as ingress-nginx does) and
`X-Forwarded-Proto`, and stops it by its process id. Every request then reaches the relay from
127.0.0.1, the proxy's address, as every user reaches a relay from its Ingress controller.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path
from types import TracebackType

import pytest

from harness.cluster import free_port
from harness.waiting import wait_until

_CONFIG = """global
    maxconn 256
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout tunnel 1h
frontend public
    bind 127.0.0.1:{port}
    option forwardfor
    http-request set-header X-Forwarded-Proto http
    default_backend relay
backend relay
    server relay {backend}
"""


def need_haproxy() -> None:
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed: `apt-get install haproxy` (scripts/setup does)")


class HttpProxy:
    """`with HttpProxy(tmp_path, "127.0.0.1:8080") as proxy:` then use `proxy.url`."""

    def __init__(self, workdir: Path, backend: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / f"haproxy-{self.port}.cfg"
        self.config.write_text(_CONFIG.format(port=self.port, backend=backend))
        self.log = workdir / f"haproxy-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def _listening(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"haproxy exited: {self.log.read_text()}")
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def __enter__(self) -> HttpProxy:
        need_haproxy()
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(["haproxy", "-db", "-f", str(self.config)],
                                            stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._listening, "haproxy listening", timeout=20)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
