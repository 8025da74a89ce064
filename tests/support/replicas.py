"""Several `vncgate-relay` processes that know each other, behind one round-robin HAProxy.

As a platform team runs the chart with several replicas behind a Gateway or a cloud balancer
without affinity: each replica a separate process with the chart's relay ServiceAccount (real
API server, Leases in the release's namespace), the same session, link and registration keys,
its peers named by `--peer-url` (EndpointSlices refuse loopback addresses), and HAProxy in
`mode tcp`, `balance roundrobin`, no stickiness, so that each new connection reaches the next
replica.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from harness.cluster import ControlPlane, free_port
from harness.waiting import wait_until
from tests.support.haproxy import HttpProxy
from tests.support.processes import ConsoleScript

API_TOKEN = "replicas-registration-token-0123456789"
LINK_KEY = "l" * 48
SESSION_KEY = "s" * 48


class Replica:
    def __init__(self, script: ConsoleScript, public: int, internal: int, identity: str) -> None:
        self.script = script
        self.public = public
        self.internal = internal
        self.identity = identity

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.public}"

    @property
    def internal_url(self) -> str:
        return f"http://127.0.0.1:{self.internal}"

    def ready(self) -> bool:
        self.script.check_running()
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as reply:  # noqa: S310
                return bool(reply.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def start(self) -> None:
        self.script.start()
        wait_until(self.ready, f"{self.identity} ready", timeout=60)

    def kill(self) -> None:
        """SIGKILL, as a node that dies: nothing is released or written on the way out."""
        assert self.script.proc is not None
        self.script.proc.kill()
        self.script.proc.wait()

    def freeze(self) -> None:
        """SIGSTOP, as a replica cut off by the network: it answers nobody (peers, the
        balancer's health checks, the API server), and its open sessions stay open."""
        assert self.script.proc is not None
        os.kill(self.script.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after `freeze`."""
        assert self.script.proc is not None
        os.kill(self.script.proc.pid, signal.SIGCONT)

    def api(self, method: str, path: str, body: Any = None) -> Any:
        request = urllib.request.Request(  # noqa: S310 - http on loopback
            f"{self.internal_url}{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {API_TOKEN}",
                     "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310 - loopback
            return json.loads(reply.read())


class Replicas:
    """`with Replicas(plane, namespace, account, workdir, count, *args) as relays:` then
    `relays.url` (the balancer) and `relays.members` (each replica)."""

    def __init__(self, plane: ControlPlane, lease_namespace: str, account: str, workdir: Path,
                 count: int, *args: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        secrets = {"api-token": API_TOKEN, "link-key": LINK_KEY, "session-key": SESSION_KEY}
        for name, value in secrets.items():
            (workdir / name).write_text(value)
        kubeconfig = plane.service_account_kubeconfig(workdir / "kubeconfig", lease_namespace,
                                                      account)
        ports = [(free_port(), free_port()) for _ in range(count)]
        self.members: list[Replica] = []
        for index, (public, internal) in enumerate(ports):
            peers = [f"--peer-url=http://127.0.0.1:{other}"
                     for n, (_, other) in enumerate(ports) if n != index]
            identity = f"relay-{index}"
            script = ConsoleScript("vncgate-relay", [
                f"--listen=127.0.0.1:{public}", f"--internal-listen=127.0.0.1:{internal}",
                f"--kubeconfig={kubeconfig}", "--log-format=json",
                f"--lease-namespace={lease_namespace}", f"--identity={identity}",
                f"--api-token-file={workdir / 'api-token'}",
                f"--link-key-file={workdir / 'link-key'}",
                f"--session-secret-file={workdir / 'session-key'}", *peers, *args],
                workdir / identity)
            (workdir / identity).mkdir(exist_ok=True)
            self.members.append(Replica(script, public, internal, identity))
        self.balancer = HttpProxy(workdir, [f"127.0.0.1:{m.public}" for m in self.members],
                                  balanced=True)

    @property
    def url(self) -> str:
        return self.balancer.url

    def logs(self) -> str:
        return "\n".join(f"--- {m.identity}\n{m.script.log()[-3000:]}" for m in self.members)

    def __enter__(self) -> Replicas:
        try:
            for member in self.members:
                member.script.start()
            for member in self.members:
                wait_until(member.ready, f"{member.identity} ready", timeout=60)
            self.balancer.__enter__()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.balancer.__exit__(exc_type, exc, tb)
        for member in self.members:
            member.script.stop()
