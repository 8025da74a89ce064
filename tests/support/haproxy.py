"""A real reverse proxy in front of a relay: HAProxy (Debian `haproxy`), as an Ingress would be.

`HttpProxy` runs harness/haproxy.py's `Haproxy` for the length of a `with`: `mode http` in
front of one relay (`X-Forwarded-For`, `X-Forwarded-Proto`), so that every request reaches the
relay from 127.0.0.1, the proxy's address, as every user reaches a relay from its Ingress
controller; or, `balanced=True`, several relays behind one address (`balancer_config`).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import pytest

from harness.haproxy import Haproxy, balancer_config, proxy_config


def need_haproxy() -> None:
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed: `apt-get install haproxy` (scripts/setup does)")


class HttpProxy(Haproxy):
    """`with HttpProxy(tmp_path, "127.0.0.1:8080") as proxy:` then use `proxy.url`.

    `balanced=True`: `mode tcp`, `balance roundrobin` over every backend (host:port each), with
    health checks on /readyz (harness/haproxy.py's `balancer_config`, its default limits)."""

    def __init__(self, workdir: Path, backend: str | Sequence[str], *,
                 balanced: bool = False) -> None:
        backends = [backend] if isinstance(backend, str) else list(backend)

        def config(port: int) -> str:
            return balancer_config(port, backends) if balanced else proxy_config(port, backends)
        super().__init__(workdir, config)

    def __enter__(self) -> HttpProxy:
        need_haproxy()
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
