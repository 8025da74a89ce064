"""The image built from the real Dockerfile: its commands run from the image as user 10001, the
relay serves the viewer and noVNC from the installed wheel and bridges to a real Xvnc, and the
`docker run` lines the Dockerfile documents start as written."""

from __future__ import annotations

import html
import json
import shlex
import subprocess
import textwrap
import tomllib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from harness.waiting import eventually
from harness.xvnc import XvncServer
from tests.conftest import ARTIFACTS, ROOT
from tests.image.conftest import SBIN_PATH, Image, Process, free_port

pytestmark = [pytest.mark.image, pytest.mark.timeout(1200)]

DOCKERFILE = ROOT / "Dockerfile"
DOCS = ROOT / "docs" / "KUBERNETES.md"
NOVNC_CORE = ROOT / "node_modules" / "@novnc" / "novnc" / "core"
TOKEN = "image-test-token-0123456789abcdef"


@dataclass
class DockerRun:
    """One documented `docker run` line, taken apart."""

    line: str
    publish: list[str] = field(default_factory=list)
    volumes: list[tuple[str, str]] = field(default_factory=list)  # (host path, "DEST[:ro]")
    image: str = ""
    command: list[str] = field(default_factory=list)


def documented_docker_runs() -> list[DockerRun]:
    runs = []
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.lstrip("#").strip()
        if not (raw.startswith("#") and line.startswith("docker run ")):
            continue
        tokens = shlex.split(line)
        run, index = DockerRun(line), 2
        while tokens[index].startswith("-"):
            option = tokens[index]
            if option == "--rm":
                index += 1
                continue
            assert option in ("-p", "-v"), f"{line}: the test does not know {option}"
            value, index = tokens[index + 1], index + 2
            if option == "-p":
                run.publish.append(value)
            else:
                source, _, dest = value.partition(":")
                run.volumes.append((source, dest))
        run.image, run.command = tokens[index], tokens[index + 1:]
        runs.append(run)
    return runs


RUNS = documented_docker_runs()


def run_id(run: DockerRun) -> str:
    return f"auth-{auth_mode(run)}" if "--auth" in run.command else "without-auth"


def auth_mode(run: DockerRun) -> str:
    assert "--auth" in run.command, f"{run.line}: choose --auth (the image listens on 0.0.0.0)"
    return run.command[run.command.index("--auth") + 1]


def without_auth(args: list[str]) -> list[str]:
    """The arguments with every --auth/--users-file option removed: the line as it was before."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--auth", "--users-file"):
            skip = True
        else:
            kept.append(arg)
    return kept


@pytest.fixture
def host_files(tmp_path: Path, xvnc: XvncServer) -> dict[str, Path]:
    """What the documented lines mount from "$PWD": a targets folder whose one VncTarget is the
    real Xvnc on 127.0.0.1, and a users file with one token user."""
    targets = tmp_path / "examples"
    targets.mkdir()
    (targets / "desk.yaml").write_text(textwrap.dedent(f"""\
        apiVersion: vncgate.io/v1alpha1
        kind: VncTarget
        metadata: {{name: desk, namespace: lab}}
        spec:
          endpoint: {{address: {{host: 127.0.0.1, port: {xvnc.port}}}}}
        """))
    users = tmp_path / "users.yaml"
    users.write_text(f"ci-bot: {{token: {TOKEN}}}\n")
    for path in (tmp_path, targets, targets / "desk.yaml", users):
        path.chmod(0o755 if path.is_dir() else 0o644)  # readable by the image's user 10001
    return {"$PWD/examples": targets, "$PWD/users.yaml": users}


def mounts(run: DockerRun, host_files: Mapping[str, Path]) -> dict[Path, str]:
    volumes = {}
    for source, dest in run.volumes:
        assert source in host_files, f"{run.line}: the test has nothing to mount for {source}"
        volumes[host_files[source]] = dest
    return volumes


@asynccontextmanager
async def relay_in_image(image: Image, args: list[str], volumes: Mapping[Path, str] = {},
                         ) -> AsyncIterator[str]:
    """Start `args` in the image with its public and internal ports on free loopback ports
    (through VNCGATE_LISTEN / VNCGATE_INTERNAL_LISTEN, which the flags in `args` would override);
    yield the public base URL once /healthz answers."""
    port, internal = free_port(), free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    process: Process = image.start(
        args, ARTIFACTS / f"image-relay-{port}.log", volumes,
        env={"VNCGATE_LISTEN": f"127.0.0.1:{port}",
             "VNCGATE_INTERNAL_LISTEN": f"127.0.0.1:{internal}"})
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            async def healthy() -> bool:
                if process.proc.poll() is not None:
                    pytest.fail(f"{shlex.join(args)} exited {process.proc.returncode} in the "
                                f"image:\n{process.log()}")
                try:
                    async with http.get(f"{base}/healthz") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await eventually(healthy, "the relay in the image answering /healthz", timeout=60,
                             interval=0.1, context=process.log)
        yield base
    finally:
        process.stop()


async def rfb_greeting(base: str, headers: Mapping[str, str] = {}) -> bytes:
    """The first 12 bytes through the relay's WebSocket bridge to target lab/desk."""
    async with aiohttp.ClientSession(headers=headers) as http, \
            http.ws_connect(f"{base}/t/lab/desk/websockify", protocols=("binary",)) as ws:
        data = b""
        while len(data) < 12:
            data += await ws.receive_bytes(timeout=10)
        return data[:12]


def test_image_runs_as_user_10001(image: Image) -> None:
    result = subprocess.run(["buildah", "inspect", "--type", "image", image.tag],
                            capture_output=True, text=True, timeout=60, check=True,
                            env={"PATH": SBIN_PATH})
    config = json.loads(result.stdout)["OCIv1"]["config"]
    assert config["User"] == "10001:10001"
    assert config["Cmd"] == ["vncgate-relay"]
    ids = image.run(["python", "-c", "import os; print(os.getuid(), os.getgid())"])
    assert (ids.returncode, ids.stdout.split()) == (0, ["10001", "10001"]), ids.stderr


@pytest.mark.parametrize("command", ["vncgate-relay", "vncgate-operator"])
def test_commands_print_their_help(image: Image, command: str) -> None:
    result = image.run([command, "--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {command} ")


def test_the_relay_is_the_installed_wheel(image: Image) -> None:
    """The wheel installs `vncgate.relay` and no top-level `relay` (a generic name that
    another distribution could own)."""
    result = image.run(["python", "-c", "import importlib.metadata as m, importlib.util as u, "
                        "vncgate.relay, vncgate.relay.cli, vncgate.operator.cli; "
                        "print(m.version('vncgate'), vncgate.relay.__file__, "
                        "u.find_spec('relay'), u.find_spec('vncgate_operator'))"])
    assert result.returncode == 0, result.stderr
    version, location, relay_spec, operator_spec = result.stdout.split()
    assert version == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert location.startswith("/usr/local/lib/python3.11/"), location
    assert location.endswith("-packages/vncgate/relay/__init__.py"), location
    assert (relay_spec, operator_spec) == ("None", "None")


async def test_relay_serves_viewer_and_novnc_and_bridges_to_xvnc(
        image: Image, xvnc: XvncServer) -> None:
    args = ["vncgate-relay", "--target", f"lab/desk=127.0.0.1:{xvnc.port}"]
    async with relay_in_image(image, args) as base, aiohttp.ClientSession() as http:
        async with http.get(f"{base}/t/lab/desk/") as response:
            assert response.status == 200
            page = await response.text()
        assert "static/novnc/viewer.js" in page
        async with http.get(f"{base}/static/novnc/core/rfb.js") as response:
            assert response.status == 200
            served = await response.read()
        assert served == (NOVNC_CORE / "rfb.js").read_bytes(), (
            "the image's noVNC core differs from the one package-lock.json pins")
        async with http.get(f"{base}/static/novnc/viewer.js") as response:
            assert response.status == 200
            assert await response.read() == (ROOT / "relay/static/novnc/viewer.js").read_bytes()
        assert await rfb_greeting(base) == b"RFB 003.008\n"


def test_the_docs_show_the_dockerfiles_docker_run_lines() -> None:
    assert len(RUNS) >= 2, "the Dockerfile documents a line without and one with sign-in"
    docs = DOCS.read_text()
    for run in RUNS:
        assert run.line in docs, f"docs/KUBERNETES.md does not show: {run.line}"
    assert all(run.image == "vncgate" for run in RUNS)
    assert [run.command[0] for run in RUNS] == ["vncgate-relay"] * len(RUNS)
    for run in RUNS:
        if auth_mode(run) == "none":
            assert run.publish == ["127.0.0.1:8080:8080"], (
                f"{run.line}: without sign-in, publish on the host's loopback only")


@pytest.mark.parametrize("run", RUNS, ids=[run_id(r) for r in RUNS])
def test_documented_line_passes_the_images_listen_check(
        image: Image, host_files: dict[str, Path], run: DockerRun) -> None:
    """With the image's own VNCGATE_LISTEN=0.0.0.0:8080 the documented arguments are accepted;
    the same line without its --auth options is refused with exit 2 (the line as it once was)."""
    check = ("import sys; from vncgate.relay.settings import settings_from_args; "
             "s = settings_from_args(sys.argv[1:]); print(s.listen.host, s.listen.port, "
             "s.auth.mode)")
    volumes = mounts(run, host_files)
    result = image.run(["python", "-c", check, *run.command[1:]], volumes)
    assert result.returncode == 0, f"{run.line}\n{result.stderr}"
    host, port, mode = result.stdout.split()
    assert (host, port) == ("0.0.0.0", "8080")
    assert mode == auth_mode(run)
    old = image.run(["python", "-c", check, *without_auth(run.command[1:])], volumes)
    assert old.returncode == 2
    assert "reaches beyond this machine" in old.stderr


@pytest.mark.parametrize("run", RUNS, ids=[run_id(r) for r in RUNS])
async def test_documented_line_starts_and_serves(
        image: Image, host_files: dict[str, Path], run: DockerRun) -> None:
    mode = auth_mode(run)
    headers = {"Authorization": f"Bearer {TOKEN}"} if mode == "token" else {}
    async with relay_in_image(image, run.command, mounts(run, host_files)) as base, \
            aiohttp.ClientSession() as http:
        async with http.get(f"{base}/", allow_redirects=False) as response:
            if mode == "none":
                assert response.status == 200
                assert 'href="t/lab/desk/"' in await response.text(), "the mounted target"
            else:
                assert (response.status, response.headers["Location"]) == (302, "login"), (
                    "token mode: the list sends a stranger to the login page")
        if mode == "token":
            async with http.ws_connect(f"{base}/t/lab/desk/websockify",
                                       protocols=("binary",)) as ws:
                message = await ws.receive(timeout=10)
                assert message.type == aiohttp.WSMsgType.CLOSE
                assert message.data == 4401, "token mode: no console without signing in"
        async with http.get(f"{base}/t/lab/desk/", headers=headers) as response:
            assert response.status == 200
            page = await response.text()
        assert "static/novnc/viewer.js" in page
        user = "ci-bot" if mode == "token" else ""
        # The page config is JSON in an escaped attribute (Jinja2 writes `"` as &#34;).
        assert f'"user": "{user}"' in html.unescape(page)
        assert await rfb_greeting(base, headers) == b"RFB 003.008\n"
