"""The RFB probe: is there a VNC server at this host and port, and which protocol does it speak?

In RFB the server speaks first, with a 12-byte `RFB xxx.yyy\n`. Reading it proves more than a TCP
connect (a web server or a database on the port fails it) and costs the server nothing: the probe
hangs up before any authentication, so servers that lock out after failed logins do not count it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
from dataclasses import dataclass

GREETING_RE = re.compile(rb"^RFB \d{3}\.\d{3}\n$")


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    reason: str  # CamelCase, for the Reachable condition
    message: str
    server_version: str | None = None


async def probe_rfb(host: str, port: int, timeout: float) -> ProbeResult:  # noqa: ASYNC109
    # (A timeout per phase, connect and greeting, so that the reason names the phase that hung.)
    """Connect, read the greeting, hang up; every failure becomes a reason, never an exception."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    writer: asyncio.StreamWriter | None = None
    try:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port)
        except TimeoutError:
            return ProbeResult(False, "ConnectTimeout",
                               f"no answer from {where} within {timeout:g}s: check the address, "
                               "the port and the firewalls between the relay and the server")
        except socket.gaierror as exc:
            return ProbeResult(False, "NameNotResolved",
                               f"cannot resolve {host}: {exc.strerror or exc}; check the host name")
        except ConnectionRefusedError:
            return ProbeResult(False, "ConnectionRefused",
                               f"{where} refused the connection: is the VNC server running "
                               "and listening on that port?")
        except OSError as exc:
            return ProbeResult(False, "ConnectFailed", f"cannot connect to {where}: "
                                                       f"{exc.strerror or exc}")
        try:
            async with asyncio.timeout(timeout):
                greeting = await reader.readexactly(12)
        except TimeoutError:
            return ProbeResult(False, "NoGreeting",
                               f"{where} accepted the connection but sent no RFB greeting within "
                               f"{timeout:g}s: it is probably not a VNC server")
        except asyncio.IncompleteReadError as exc:
            return ProbeResult(False, "ConnectionClosed",
                               f"{where} closed the connection after {len(exc.partial)} bytes "
                               "instead of an RFB greeting (too many clients, or not VNC)")
        except OSError as exc:
            return ProbeResult(False, "ConnectionClosed",
                               f"{where} dropped the connection: {exc.strerror or exc}")
        if not GREETING_RE.match(greeting):
            return ProbeResult(False, "NotVNC",
                               f"{where} answered {greeting[:12]!r}, not an RFB greeting: this "
                               "port is not a VNC server")
        version = greeting.decode("ascii").strip()
        return ProbeResult(True, "RFBGreeting", f"{where} answered {version}", version)
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def next_probe_delay(interval: float, first: bool, rng: random.Random) -> float:
    """Seconds until a target's next probe, jittered so that probes spread over the interval.

    The first wait is anywhere in the interval: after an operator restart every target starts
    at once, and without this they would all probe in the same second.
    """
    if first:
        return rng.uniform(0.0, interval)
    return interval * rng.uniform(0.8, 1.2)
