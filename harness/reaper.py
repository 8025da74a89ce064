"""Every process a test starts ends with its test and with the run, however the run ends.

Three layers, from the polite to the last resort:
- `popen` / `exec_kwargs` start a process in a session (and process group) of its own, so that
  `end` stops it with everything it started (SIGTERM, then SIGKILL after a grace period); the
  helpers that start processes (ConsoleScript, XvncServer, ControlPlane, ...) stop theirs so in
  their teardown. Started from the main thread, the process also gets the parent-death signal
  SIGKILL (`setpriv --pdeathsig`, util-linux): if pytest itself is killed (SIGKILL, the OOM
  killer), the kernel ends its direct children. (The signal follows the thread that forked, so
  a process started from a worker thread does not get it: it would die with the thread.)
- `install` (pytest_configure) marks the run: an environment variable that every process the
  run starts inherits, grandchildren included (`popen` adds it to an explicit `env` as well),
  and turns SIGTERM (a CI time-out) into KeyboardInterrupt, as Ctrl-C is, so that pytest ends
  the run the same way: teardowns run and the session finishes.
- `finish` (pytest_sessionfinish, after the teardowns) looks for processes that still carry the
  run's mark, ends them, and fails the run naming them; an atexit handler and a second SIGTERM
  or SIGINT end them without the report, when the run ends before it gets there.

A run's mark is `<pytest's pid>-<random>`, so that a test that runs pytest in a child process
finds what that child started (`marked(prefix=f"{child.pid}-")`).
"""

from __future__ import annotations

import asyncio.subprocess
import atexit
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

# Not VNCGATE_*: ConsoleScript hands its programs no VNCGATE_ variable of the caller's.
MARK = "PYTEST_VNCGATE_RUN"
GRACE = 10.0
SETPRIV = shutil.which("setpriv")


@dataclass(frozen=True)
class Survivor:
    pid: int
    command: str

    def __str__(self) -> str:
        return f"pid {self.pid}: {self.command}"


def run_mark() -> str | None:
    return os.environ.get(MARK)


def _with_pdeathsig(argv: Sequence[str]) -> list[str]:
    if SETPRIV is None or threading.current_thread() is not threading.main_thread():
        return [str(arg) for arg in argv]
    return [SETPRIV, "--pdeathsig", "KILL", "--", *map(str, argv)]


def _env(env: Mapping[str, str] | None) -> dict[str, str] | None:
    mark = run_mark()
    if env is None or mark is None:
        return None if env is None else dict(env)
    return {**env, MARK: mark}


def popen(argv: Sequence[str | os.PathLike[str]], **kwargs: Any) -> subprocess.Popen[Any]:
    """`subprocess.Popen` in a session of its own, with the run's mark and the parent-death
    signal; stop it with `end(proc)`."""
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    kwargs["env"] = _env(kwargs.get("env"))
    return subprocess.Popen(_with_pdeathsig([os.fspath(a) for a in argv]),
                            start_new_session=True, **kwargs)


async def exec_async(*argv: str | os.PathLike[str], **kwargs: Any) -> asyncio.subprocess.Process:
    """`asyncio.create_subprocess_exec` with what `popen` gives a process."""
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    kwargs["env"] = _env(kwargs.get("env"))
    return await asyncio.create_subprocess_exec(
        *_with_pdeathsig([os.fspath(a) for a in argv]), start_new_session=True, **kwargs)


def end(proc: subprocess.Popen[Any], grace: float = GRACE, *, group: bool = True) -> int:
    """SIGTERM to the process's group (or, `group=False`, to the process alone), SIGKILL to
    the group after `grace` seconds; reap it. Started by `popen`, the process leads its group."""
    if proc.poll() is None:
        if group:
            kill_group(proc.pid, signal.SIGTERM)
        else:
            proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
    # Whatever the leader left behind in its group (it may have exited before its children).
    kill_group(proc.pid, signal.SIGKILL)
    return proc.returncode


def kill_group(pgid: int, signum: signal.Signals) -> None:
    """Signal a process group that may be gone already."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


# -- the run's processes, found by their mark -------------------------------------------------

def _environ_value(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, a zombie, or not ours to read
        return None
    prefix = MARK.encode() + b"="
    for item in raw.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix):].decode(errors="replace")
    return None


def _command(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)


def marked(mark: str | None = None, *, prefix: str | None = None) -> list[Survivor]:
    """The live processes (not zombies) that carry `mark` (default: this run's), or a mark
    that starts with `prefix`; never this process."""
    if prefix is None:
        mark = mark or run_mark()
        if mark is None:
            return []
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        value = _environ_value(int(entry.name))
        if value is None:
            continue
        if (value == mark) if prefix is None else value.startswith(prefix):
            found.append(Survivor(int(entry.name), _command(int(entry.name))))
    return found


def end_marked(survivors: list[Survivor], grace: float = 5.0) -> list[Survivor]:
    """SIGTERM each, SIGKILL what is left after `grace`; returns those that would not die."""
    for survivor in survivors:
        _kill(survivor.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    left = survivors
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [s for s in left if _alive(s.pid)]
    for survivor in left:
        _kill(survivor.pid, signal.SIGKILL)
    time.sleep(0.1)
    return [s for s in left if _alive(s.pid)]


def _kill(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _alive(pid: int) -> bool:
    # A zombie has an empty environ: it is no longer running anything.
    return _environ_value(pid) is not None


# -- the pytest session ------------------------------------------------------------------------

_installed = False
_signalled = 0


def install() -> str:
    """Mark this run and handle SIGTERM like SIGINT; returns the mark."""
    global _installed
    mark = f"{os.getpid()}-{secrets.token_hex(6)}"
    os.environ[MARK] = mark  # every process started from now on inherits it
    if not _installed:
        _installed = True
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        atexit.register(_at_exit)
    return mark


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _signalled
    _signalled += 1
    if _signalled == 1:
        # What pytest does on Ctrl-C: stop the run, run the teardowns, finish the session.
        raise KeyboardInterrupt(f"{signal.Signals(signum).name}: the test run was stopped")
    # Asked again while winding down: end everything now, without waiting for teardowns.
    end_marked(marked(), grace=1.0)
    os._exit(128 + signum)


def _at_exit() -> None:
    survivors = marked()
    if survivors:
        end_marked(survivors, grace=2.0)


def finish() -> str | None:
    """After the session's teardowns: end what the run left running and say what it was."""
    survivors = marked()
    if not survivors:
        return None
    stubborn = end_marked(survivors)
    lines = [f"{len(survivors)} process(es) started by the tests outlived them (now ended; "
             "stop each in the teardown of what started it, e.g. with harness.reaper.end):",
             *(f"  {s}" for s in survivors)]
    if stubborn:
        lines.append("and these would not die: " + ", ".join(str(s) for s in stubborn))
    return "\n".join(lines)
