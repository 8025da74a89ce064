"""`stress-ng --cpu N` beside a benchmark: the load the latency goals are also measured under."""

from __future__ import annotations

import shutil
import subprocess


def start_stress(cpus: int) -> subprocess.Popen[bytes]:
    """Start `stress-ng --cpu cpus`; bounded: it stops by itself after an hour if the run that
    started it dies first. Exits with what to install when stress-ng is missing."""
    if shutil.which("stress-ng") is None:
        raise SystemExit("--stress needs stress-ng, which is not installed: "
                         "apt-get install stress-ng (Debian)")
    return subprocess.Popen(["stress-ng", "--cpu", str(cpus), "--timeout", "3600s", "--quiet"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
