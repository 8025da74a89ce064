"""A real reverse proxy in front of a relay: HAProxy (Debian `haproxy`), as an Ingress would be.

`HttpProxy` runs `haproxy` in the foreground on a free loopback port with a config of its own,
in `mode http`, adding `X-Forwarded-For` (the client's address, as ingress-nginx does) and
`X-Forwarded-Proto`, and stops it by its process id. Every request then reaches the relay from
127.0.0.1, the proxy's address, as every user reaches a relay from its Ingress controller.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import pytest

from harness import reaper
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
{servers}"""

# Several relays behind one address as a Gateway or a cloud balancer without affinity puts
# them: TCP, each new connection to the next relay in turn, no stickiness; a relay whose
# /readyz fails (or that is gone) is skipped once its health check says so.
_BALANCER = """global
    maxconn 256
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
frontend public
    bind 127.0.0.1:{port}
    default_backend relays
backend relays
    balance roundrobin
    # A connection refused by a relay that died since its last check goes to the next one.
    option redispatch
    retries 3
    option httpchk GET /readyz
    default-server inter 1s fall 1 rise 1
{servers}"""


def need_haproxy() -> None:
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed: `apt-get install haproxy` (scripts/setup does)")


class HttpProxy:
    """`with HttpProxy(tmp_path, "127.0.0.1:8080") as proxy:` then use `proxy.url`.

    `balanced=True`: `mode tcp`, `balance roundrobin` over every backend (host:port each), with
    health checks on /readyz (see `_BALANCER`)."""

    def __init__(self, workdir: Path, backend: str | Sequence[str], *,
                 balanced: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / f"haproxy-{self.port}.cfg"
        backends = [backend] if isinstance(backend, str) else list(backend)
        check = " check" if balanced else ""
        servers = "".join(f"    server relay{n} {address}{check}\n"
                          for n, address in enumerate(backends))
        template = _BALANCER if balanced else _CONFIG
        self.config.write_text(template.format(port=self.port, servers=servers))
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
            self.process = reaper.popen(["haproxy", "-db", "-f", str(self.config)],
                                        stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._listening, "haproxy listening", timeout=20)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.process is not None:
            reaper.end(self.process, grace=10)
