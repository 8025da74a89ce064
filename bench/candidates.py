"""What is measured: vncgate's relay, websockify, a plain asyncio pipe, and direct TCP.

Each candidate runs in its own process (or, for direct TCP, not at all) and tells the client
where to connect for each backend kind: a port and, for WebSocket relays, a path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

KINDS = ("source", "sink", "echo", "rfb", "rfb-idle")
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_listening(port: int, proc: subprocess.Popen[bytes], within: float = 20) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.transport.abort()
        return
    raise RuntimeError(f"{proc.args!r} did not listen on {port} within {within}s")


@dataclass
class Candidate:
    name: str
    websocket: bool = True
    proc: subprocess.Popen[bytes] | None = None
    ports: dict[str, int] = field(default_factory=dict)
    paths: dict[str, str | None] = field(default_factory=dict)
    # Idle sessions this candidate is asked to hold at most (websockify forks one process each).
    max_idle_sessions: int | None = None

    async def start(self, backends: dict[str, int], workdir: Path) -> None:
        raise NotImplementedError

    def endpoint(self, kind: str) -> tuple[int, str | None]:
        return self.ports[kind], self.paths.get(kind)

    def process(self) -> psutil.Process | None:
        return psutil.Process(self.proc.pid) if self.proc is not None else None

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        for child in children:  # websockify's per-connection processes
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(children, timeout=5)


class Vncgate(Candidate):
    """This checkout's relay; or, with `checkout`, the relay of another checkout (its own
    `.venv/bin/vncgate-relay`, e.g. a `git worktree` of the commit before a change), named
    `vncgate@base`, for A/B runs of a change in one run."""

    def __init__(self, uvloop: bool = False, recording: bool = False,
                 checkout: Path | None = None) -> None:
        super().__init__("vncgate+uvloop" if uvloop else
                         "vncgate+recording" if recording else
                         "vncgate@base" if checkout is not None else "vncgate")
        self.uvloop = uvloop
        self.recording = recording
        self.checkout = checkout
        self.recording_dir: Path | None = None  # set by start when recording

    async def start(self, backends: dict[str, int], workdir: Path) -> None:
        port = free_port()
        relay = (self.checkout / ".venv" / "bin" / "vncgate-relay" if self.checkout is not None
                 else BIN / "vncgate-relay")
        command = ([sys.executable, "-m", "bench.uvloop_relay"] if self.uvloop
                   else [str(relay)])
        command += ["--listen", f"127.0.0.1:{port}",
                    "--internal-listen", f"127.0.0.1:{free_port()}",
                    "--max-sessions", "20000", "--max-sessions-per-target", "20000",
                    "--log-level", "WARNING"]
        if self.recording:  # every session recorded (screen only), into a fresh folder
            self.recording_dir = workdir / f"recordings-{port}"
            command += ["--recording-dir", str(self.recording_dir), "--record-sessions"]
        for kind, backend in backends.items():
            command += ["--target", f"bench/{kind}=127.0.0.1:{backend}"]
        log = (workdir / f"{self.name}.log").open("ab")
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - starts and returns
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            cwd=self.checkout)
        await wait_listening(port, self.proc)
        self.ports = dict.fromkeys(KINDS, port)
        self.paths = {kind: f"/t/bench/{kind}/websockify" for kind in KINDS}


class Websockify(Candidate):
    def __init__(self) -> None:
        super().__init__("websockify", max_idle_sessions=1000)

    async def start(self, backends: dict[str, int], workdir: Path) -> None:
        port = free_port()
        tokens = workdir / "websockify-tokens"
        tokens.write_text("".join(f"{kind}: 127.0.0.1:{backend}\n"
                                  for kind, backend in backends.items()))
        log = (workdir / "websockify.log").open("ab")
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - starts and returns
            [str(BIN / "websockify"), "--token-plugin", "TokenFile", "--token-source", str(tokens),
             f"127.0.0.1:{port}"], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        await wait_listening(port, self.proc)
        self.ports = dict.fromkeys(KINDS, port)
        self.paths = {kind: f"/?token={kind}" for kind in KINDS}


class Pipe(Candidate):
    def __init__(self) -> None:
        super().__init__("asyncio pipe", websocket=False)

    async def start(self, backends: dict[str, int], workdir: Path) -> None:
        log = (workdir / "pipe.log").open("ab")
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - starts and returns
            [sys.executable, "-m", "bench.pipe", *(f"{k}={p}" for k, p in backends.items())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        assert self.proc.stdout is not None
        line = await asyncio.get_running_loop().run_in_executor(None, self.proc.stdout.readline)
        self.ports = json.loads(line)
        self.paths = dict.fromkeys(KINDS)


class AiohttpRelay(Candidate):
    """bench/aiohttp_relay.py: the least a WebSocket relay on aiohttp does (the handshake's
    floor)."""

    def __init__(self) -> None:
        super().__init__("aiohttp relay")

    async def start(self, backends: dict[str, int], workdir: Path) -> None:
        log = (workdir / "aiohttp-relay.log").open("ab")
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - starts and returns
            [sys.executable, "-m", "bench.aiohttp_relay",
             *(f"{k}={p}" for k, p in backends.items())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        assert self.proc.stdout is not None
        line = await asyncio.get_running_loop().run_in_executor(None, self.proc.stdout.readline)
        port = json.loads(line)["port"]
        self.ports = dict.fromkeys(KINDS, port)
        self.paths = {kind: f"/{kind}" for kind in KINDS}


class Direct(Candidate):
    def __init__(self) -> None:
        super().__init__("direct TCP", websocket=False)

    async def start(self, backends: dict[str, int], workdir: Path) -> None:
        self.ports = dict(backends)
        self.paths = dict.fromkeys(KINDS)


def all_candidates(uvloop: bool, baseline: Path | None = None) -> list[Candidate]:
    found: list[Candidate] = [Vncgate(), Websockify(), AiohttpRelay(), Pipe(), Direct()]
    if uvloop:
        found.insert(1, Vncgate(uvloop=True))
    if baseline is not None:
        found.insert(1, Vncgate(checkout=baseline))
    return found
