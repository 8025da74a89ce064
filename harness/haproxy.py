"""HAProxy (Debian `haproxy`) on a free loopback port, as an Ingress or a balancer runs it.

`Haproxy(workdir, config)` writes the configuration `config(port)` returns for a free port,
`start()` runs `haproxy -db` (foreground) through `harness/reaper.py` until it listens, and
`stop()` ends it by its process id. Two configurations:

- `proxy_config`: `mode http` in front of one relay, adding `X-Forwarded-For` (the client's
  address, as ingress-nginx does) and `X-Forwarded-Proto`, so that every request reaches the
  relay from 127.0.0.1, the proxy's address, as every user reaches a relay from its Ingress;
- `balancer_config`: several relays behind one address as a Gateway or a cloud balancer
  without affinity puts them (the tests' replicas and bench/scale.py's lanes).
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from harness import reaper
from harness.cluster import free_port
from harness.waiting import wait_until

_PROXY = """global
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

# TCP, each new connection to the next relay in turn, no stickiness; a relay whose /readyz
# fails (or that is gone) is skipped once its health check says so. (leastconn was tried in
# bench/scale.py: a relay just killed holds no connection, so it drew every reconnection until
# its health check failed.)
_BALANCER = """global
    maxconn {maxconn}
defaults
    mode tcp
{defaults}    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
frontend public
    bind 127.0.0.1:{port}{bind}
    default_backend relays
backend relays
    balance roundrobin
    # A connection refused by a relay that died since its last check goes to the next one.
    option redispatch
    retries 3
    option httpchk GET /readyz
    default-server inter 1s fall 1 rise 1
{servers}"""


def _servers(backends: Sequence[str], check: str) -> str:
    return "".join(f"    server relay{n} {address}{check}\n" for n, address in enumerate(backends))


def proxy_config(port: int, backends: Sequence[str]) -> str:
    """`mode http` on `port` in front of `backends` (host:port each; one, as a rule)."""
    return _PROXY.format(port=port, servers=_servers(backends, ""))


def balancer_config(port: int, backends: Sequence[str], *, maxconn: int = 256,
                    frontend_maxconn: int | None = None, backlog: int | None = None) -> str:
    """`mode tcp`, `balance roundrobin` on `port` over `backends` (host:port each), with health
    checks on /readyz and `option redispatch`.

    `maxconn` is the process's limit; `frontend_maxconn` (the default's, when given) and
    `backlog` (the listening socket's, when given) make room for thousands of sessions."""
    defaults = f"    maxconn {frontend_maxconn}\n" if frontend_maxconn is not None else ""
    bind = f" backlog {backlog}" if backlog is not None else ""
    return _BALANCER.format(port=port, maxconn=maxconn, defaults=defaults, bind=bind,
                            servers=_servers(backends, " check"))


class Haproxy:
    """One `haproxy -db` with the configuration `config(port)`, on a free port of 127.0.0.1;
    `url` is where to reach it. Its configuration and log are `<workdir>/haproxy-<port>.cfg`
    and `.log`."""

    def __init__(self, workdir: Path, config: Callable[[int], str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / f"haproxy-{self.port}.cfg"
        self.config.write_text(config(self.port))
        self.log = workdir / f"haproxy-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def _listening(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"haproxy exited: {self.log.read_text()[-2000:]}")
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.process = reaper.popen(["haproxy", "-db", "-f", str(self.config)],
                                        stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._listening, "haproxy listening", timeout=20)

    def stop(self) -> None:
        if self.process is not None:
            reaper.end(self.process, grace=10)
            self.process = None
