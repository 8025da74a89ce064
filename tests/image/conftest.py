"""The real image: the root Dockerfile built by scripts/build-image (buildah, local Debian bases)
and its commands run from the image with `buildah run`, as the image's user.

Outside CI the tests skip when this machine cannot build images (not root, or buildah or
debootstrap missing), with the command that fixes it. In CI (`CI=true`) they never skip: the
build script installs its own tools there, and anything missing is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from harness import reaper
from tests.conftest import ARTIFACTS, ROOT

BUILD_SCRIPT = ROOT / "scripts" / "build-image"
TOOLS = ("buildah", "debootstrap")
SBIN_PATH = f"{os.environ.get('PATH', '')}:/usr/local/sbin:/usr/sbin:/sbin"
IN_CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")
BUILD_TIMEOUT = 900  # the first run makes the Debian bases (debootstrap): 1-3 minutes


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "image: builds the Dockerfile with buildah and runs it")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def cannot_build_reason() -> str | None:
    """Why this machine cannot build the image, or None. In CI a missing tool is installed."""
    if os.geteuid() != 0:
        return ("building the image needs root (debootstrap, buildah's storage): "
                "run the tests as root, or `sudo scripts/build-image`")
    missing = [tool for tool in TOOLS if shutil.which(tool, path=SBIN_PATH) is None]
    if missing and not IN_CI:
        return (f"{' and '.join(missing)} not installed: `apt-get install {' '.join(missing)}` "
                "or `scripts/build-image --install-tools` (CI=true installs them itself)")
    return None


class Image:
    """A built image and one working container of it; `run` and `start` run the image's files
    as the image's user with this machine's network (`buildah run --isolation chroot`)."""

    def __init__(self, tag: str, container: str) -> None:
        self.tag = tag
        self.container = container

    def command(self, args: Sequence[str], volumes: Mapping[Path, str] = {},
                env: Mapping[str, str] = {}) -> list[str]:
        line = ["buildah", "run", "--isolation", "chroot", "--network", "host"]
        for source, target in volumes.items():
            line += ["-v", f"{source}:{target}"]
        for name, value in env.items():
            line += ["--env", f"{name}={value}"]
        return [*line, self.container, "--", *args]

    def run(self, args: Sequence[str], volumes: Mapping[Path, str] = {},
            env: Mapping[str, str] = {}, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(args, volumes, env), capture_output=True, text=True,
                              timeout=timeout, check=False, env={**os.environ, "PATH": SBIN_PATH})

    def start(self, args: Sequence[str], log_path: Path, volumes: Mapping[Path, str] = {},
              env: Mapping[str, str] = {}) -> Process:
        return Process(self.command(args, volumes, env), log_path)


class Process:
    """A command running in the image; `stop()` ends `buildah run`, which ends what it runs."""

    def __init__(self, command: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = reaper.popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PATH": SBIN_PATH})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        # SIGTERM to `buildah run` alone ends what it runs; then the rest of its session.
        reaper.end(self.proc, grace=15, group=False)
        self._log.close()


@pytest.fixture(scope="session")
def image() -> Iterator[Image]:
    """Build the Dockerfile once per test session (scripts/build-image) into a tag of its own."""
    reason = cannot_build_reason()
    if reason is not None:
        if IN_CI:
            pytest.fail(f"CI must build the image: {reason}")
        pytest.skip(reason)
    ARTIFACTS.mkdir(exist_ok=True)
    tag = f"localhost/vncgate-test:{uuid.uuid4().hex[:12]}"
    command = [str(BUILD_SCRIPT), "--tag", tag, *(["--install-tools"] if IN_CI else [])]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
                            check=False, cwd=ROOT)
    elapsed = time.monotonic() - started
    (ARTIFACTS / "image-build.log").write_text(
        f"$ {' '.join(command)}\n{result.stdout}{result.stderr}\n"
        f"exit {result.returncode} after {elapsed:.0f} s\n")
    if result.returncode != 0:
        pytest.fail(f"scripts/build-image failed (exit {result.returncode}; full log in "
                    f"test-artifacts/image-build.log):\n{result.stderr[-4000:]}")
    container = f"vncgate-test-{uuid.uuid4().hex[:12]}"
    env = {**os.environ, "PATH": SBIN_PATH}
    subprocess.run(["buildah", "from", "--pull-never", "--name", container, tag],
                   capture_output=True, text=True, timeout=60, check=True, env=env)
    try:
        yield Image(tag, container)
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True, timeout=60,
                       check=False, env=env)
        subprocess.run(["buildah", "rmi", tag], capture_output=True, timeout=60, check=False,
                       env=env)
