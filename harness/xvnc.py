"""A real VNC server for tests and the demo: TigerVNC's Xvnc on a free display, loopback only.

`XvncServer` picks a display whose X lock and VNC port are both free, starts Xvnc without a
password bound to 127.0.0.1, waits until it listens (found in /proc, not by connecting: see
`_wait_ready`), and paints the root window a known colour so that a viewer can check what it
sees.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from harness import reaper
from harness.waiting import NotInTime, wait_until

XVNC = shutil.which("Xvnc") or "/usr/bin/Xvnc"
XSETROOT = shutil.which("xsetroot") or "/usr/bin/xsetroot"


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _listens(pid: int, port: int) -> bool:
    """Whether process `pid` holds a TCP socket listening on `port` (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEXADDR:HEXPORT; state 0A is LISTEN; the inode is field 9.
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return False
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd) in inodes:
                return True
        except OSError:
            continue
    return False


def _free_display(start: int = 20, stop: int = 400) -> int:
    for display in range(start + os.getpid() % 50, stop):
        if Path(f"/tmp/.X{display}-lock").exists() or Path(f"/tmp/.X11-unix/X{display}").exists():
            continue
        if _port_free(5900 + display):
            return display
    raise RuntimeError("no free X display between :20 and :400")


class XvncServer:
    """Start with `with XvncServer() as vnc:`; `vnc.port` is the RFB port on 127.0.0.1."""

    def __init__(self, geometry: str = "800x600", colour: str = "#ff0000",
                 log_path: Path | None = None, interface: str = "127.0.0.1",
                 port: int | None = None, extra_args: Sequence[str] = ()) -> None:
        # `interface` and `port` stand a server in for a Service's cluster IP and port (e.g.
        # 127.0.0.2:5900): only loopback addresses, never another network.
        assert interface.startswith("127."), "tests only listen on loopback"
        self.interface = interface
        self.fixed_port = port
        # extra_args come last, so they override: ("-SecurityTypes", "VncAuth", ...).
        self.geometry = geometry
        self.extra_args = tuple(extra_args)
        self.colour = colour
        self.log_path = log_path
        self.display = 0
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: object = None

    def start(self, timeout: float = 15.0) -> XvncServer:
        if not Path(XVNC).exists():
            raise RuntimeError(f"{XVNC} not found: run scripts/setup "
                               "(it installs tigervnc-standalone-server)")
        for _attempt in range(5):
            self.display = _free_display()
            self.port = self.fixed_port or 5900 + self.display
            log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
            where = (["-localhost"] if self.interface == "127.0.0.1"
                     else ["-interface", self.interface])
            self._proc = reaper.popen(
                [XVNC, f":{self.display}", "-rfbport", str(self.port), "-SecurityTypes", "None",
                 "-geometry", self.geometry, *where, "-AlwaysShared", "-nolisten", "tcp",
                 *self.extra_args],
                stdout=log, stderr=log)
            if self._wait_ready(timeout):
                self.paint(self.colour)
                return self
            self.stop()  # lost a race for the display; try another one
        raise RuntimeError("Xvnc did not start; see its log")

    def _wait_ready(self, timeout: float) -> bool:
        """Whether it listens on its RFB port within `timeout` (False at once if it exited).

        Read from /proc, not by connecting: TigerVNC black-marks every connection from an
        address that does not log in, and a few readiness checks that time out on a busy
        machine would get 127.0.0.1 blacklisted before the test begins. (Xvnc opens its X
        socket before its RFB port, and `paint` waits for the X server's reply, so the server
        is serving when `start` returns.)
        """
        def listening() -> str:
            if self._proc is None or self._proc.poll() is not None:
                return "exited"
            return "listening" if _listens(self._proc.pid, self.port) else ""

        try:
            return wait_until(listening, "Xvnc listening", timeout, interval=0.05) == "listening"
        except NotInTime:
            return False

    def paint(self, colour: str) -> None:
        """Fill the root window with one colour (xsetroot), so a viewer has something to check."""
        env = {**os.environ, "DISPLAY": f":{self.display}"}
        subprocess.run([XSETROOT, "-solid", colour], env=env, check=True, timeout=10)
        self.colour = colour

    def stop(self) -> None:
        if self._proc is not None:
            reaper.end(self._proc, grace=5)
            self._proc = None

    def __enter__(self) -> XvncServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
