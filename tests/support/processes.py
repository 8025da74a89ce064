"""vncgate's console scripts run as a user runs them: separate processes, real flags, real files.

`ConsoleScript` starts `vncgate-relay` or `vncgate-operator` from the project's .venv, keeps its
log in a file and stops it with SIGTERM (as Kubernetes does). Two things a pod has that a test
machine lacks are given to a process in a private mount namespace (`unshare --mount`, root only):
- `hosts`: an /etc/hosts of its own, so that `desk-1.lab.svc.cluster.local` resolves to a
  loopback address, as cluster DNS resolves a Service's name to its cluster IP;
- `service_account`: a folder mounted where the kubelet mounts a pod's ServiceAccount token, CA
  and namespace (/var/run/secrets/kubernetes.io/serviceaccount), for in-cluster credentials.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from harness import reaper
from harness.waiting import wait_until

BIN = Path(sys.executable).parent
SERVICE_ACCOUNT_DIR = "secrets/kubernetes.io/serviceaccount"  # below /run (= /var/run)


def can_isolate() -> str | None:
    """None when private mount namespaces work here, else why not (for a skip message)."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    if os.geteuid() != 0:
        return "a private /etc/hosts and ServiceAccount mount need root (unshare --mount)"
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        return f"unshare --mount is not permitted here: {probe.stderr.decode().strip()}"
    return None


# Bind-mounts what the process should see, then execs it; the mounts vanish with the process.
_WRAPPER = """set -e
if [ -n "$VNCGATE_TEST_HOSTS" ]; then mount --bind "$VNCGATE_TEST_HOSTS" /etc/hosts; fi
if [ -n "$VNCGATE_TEST_RUN" ]; then mount --bind "$VNCGATE_TEST_RUN" /run; fi
unset VNCGATE_TEST_HOSTS VNCGATE_TEST_RUN
exec "$@"
"""


_SERIALS = itertools.count()


class ConsoleScript:
    def __init__(self, name: str, args: Sequence[str], workdir: Path, *,
                 env: Mapping[str, str] | None = None, hosts: Mapping[str, str] | None = None,
                 service_account: Path | None = None, bin_dir: Path | None = None) -> None:
        self.name = name
        self.bin_dir = bin_dir or BIN  # another environment's scripts, e.g. a fresh venv's
        self.args = list(args)
        self.workdir = workdir
        # A serial, not id(self): a later object may get a freed one's id, and then its log
        # (with the old process's lines, which wait_for_log would find first).
        self.log_path = workdir / f"{name}-{os.getpid()}-{next(_SERIALS)}.log"
        self.env = dict(env or {})
        self.hosts = dict(hosts or {})
        self.service_account = service_account
        self.proc: subprocess.Popen[bytes] | None = None

    def _argv(self) -> tuple[list[str], dict[str, str]]:
        program = [str(self.bin_dir / self.name), *self.args]
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("VNCGATE_", "KUBERNETES_")) and key != "KUBECONFIG"}
        env["HOME"] = str(self.workdir)  # no ~/.kube/config of the machine's user
        env.update(self.env)
        if not self.hosts and self.service_account is None:
            return program, env
        if self.hosts:
            hosts = self.workdir / f"hosts-{id(self)}"
            hosts.write_text("127.0.0.1 localhost\n::1 localhost\n" + "".join(
                f"{address} {name}\n" for name, address in self.hosts.items()))
            env["VNCGATE_TEST_HOSTS"] = str(hosts)
        if self.service_account is not None:
            run = self.workdir / f"run-{id(self)}"
            shutil.copytree(self.service_account, run / SERVICE_ACCOUNT_DIR, dirs_exist_ok=True)
            env["VNCGATE_TEST_RUN"] = str(run)
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _WRAPPER, "sh",
                *program], env

    def start(self) -> ConsoleScript:
        if self.running():
            # A second process would replace the first in `self.proc`, and nothing would stop
            # the first (kubectl-vnc proxies outlived whole test runs this way).
            raise RuntimeError(f"{self.name} is already running (pid {self.proc.pid})"
                               if self.proc else f"{self.name} is already running")
        argv, env = self._argv()
        with self.log_path.open("ab") as log:
            self.proc = reaper.popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_running(self) -> bool:
        """True while running; raises with the log when the process has exited."""
        if not self.running():
            code = self.proc.returncode if self.proc else None
            raise AssertionError(f"{self.name} exited ({code}):\n{self.log()[-4000:]}")
        return True

    def wait_for_log(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        found: list[re.Match[str]] = []

        def seen() -> bool:
            match = re.search(pattern, self.log())
            if match:
                found.append(match)
                return True
            return not self.check_running()

        try:
            wait_until(seen, f"{self.name} logging /{pattern}/", timeout=timeout)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; its log:\n{self.log()[-4000:]}") from None
        return found[0]

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        # The whole session: the unshare wrapper and the program it execs are one process,
        # but a program may have children of its own.
        return reaper.end(self.proc, grace=timeout)

    def __enter__(self) -> ConsoleScript:
        """Starts the script unless it runs already (`with script.start():` is fine too)."""
        return self if self.running() else self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
