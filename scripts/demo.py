"""The embedded default: a real VNC desktop (Xvnc) and the standalone relay in front of it.

Started by `scripts/demo` after set-up. Prints the URL to open, runs until Ctrl-C, and stops
both processes. Binds to loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.xvnc import XvncServer  # noqa: E402 - after the path is set

TARGET = "default/demo-desktop"


def free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise RuntimeError("no free TCP port on 127.0.0.1")


@contextlib.contextmanager
def desktop_apps(display: int) -> Iterator[None]:
    """Something alive on the desktop: a ticking clock (x11-apps) and a terminal (xterm)
    printing the time every second. Missing programs are skipped with a note."""
    env = {**os.environ, "DISPLAY": f":{display}"}
    commands = [
        ["xclock", "-update", "1", "-geometry", "220x220+40+40"],
        ["xterm", "-geometry", "80x12+40+500", "-title", "vncgate demo",
         "-e", "sh", "-c", "while :; do date; sleep 1; done"],
    ]
    started = []
    for command in commands:
        if shutil.which(command[0]) is None:
            print(f"vncgate demo: {command[0]} is not installed (scripts/setup installs it); "
                  "the desktop shows less", file=sys.stderr)
            continue
        started.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))
    try:
        yield
    finally:
        for process in started:
            process.terminate()
        for process in started:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8080, help="public port (a free one if taken)")
    parser.add_argument("--exit-after", type=float, default=0,
                        help="stop after this many seconds (0: run until Ctrl-C)")
    args = parser.parse_args()

    with XvncServer(geometry="1024x768", colour="#1565c0") as vnc, desktop_apps(vnc.display):
        port = free_port(args.port)
        internal = free_port(port + 1)
        relay = subprocess.Popen(
            [str(ROOT / ".venv/bin/vncgate-relay"), "--listen", f"127.0.0.1:{port}",
             "--internal-listen", f"127.0.0.1:{internal}",
             "--target", f"{TARGET}=127.0.0.1:{vnc.port}"])
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                with socket.socket() as probe:
                    if probe.connect_ex(("127.0.0.1", port)) == 0:
                        break
                if relay.poll() is not None:
                    return relay.returncode or 1
                time.sleep(0.1)
            print(f"\nvncgate demo: a desktop (Xvnc :{vnc.display}, a clock and a terminal)"
                  f" behind the relay."
                  f"\n  Open  http://127.0.0.1:{port}/t/{TARGET}/"
                  f"\n  List  http://127.0.0.1:{port}/"
                  f"\n  Stop with Ctrl-C.\n", flush=True)
            signal.signal(signal.SIGTERM, _interrupt)
            with contextlib.suppress(KeyboardInterrupt, subprocess.TimeoutExpired):
                relay.wait(timeout=args.exit_after or None)
        finally:
            if relay.poll() is None:
                relay.send_signal(signal.SIGINT)
                try:
                    relay.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    relay.kill()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
