"""Session set-up time when the relay answers the server's security (VncAuth, VeNCrypt X509).

One real Xvnc per security type (None, VncAuth with a `vncpasswd -f` file, X509Vnc with a
certificate from a throw-away openssl CA), one relay in this process, and a client that opens the
viewer's WebSocket and times it until ServerInit has arrived: the whole handshake a viewer waits
for, RFB security and (for X509) the TLS handshake included. Sequential sessions, a fixed count
per type, so it is bounded and stops by itself. Prints one Markdown table line per type.

    .venv/bin/python -m bench.security_setup --sessions 100
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import tempfile
import time
from pathlib import Path

import aiohttp

from harness.vncsecurity import SERVER_NAME, make_ca, write_vnc_password
from harness.xvnc import XvncServer
from vncgate.common.addresses import Address
from vncgate.common.model import Route
from vncgate.common.spec import Credentials, TlsSpec
from vncgate.relay.settings import RelaySettings
from vncgate.relay.web.server import RelayServer

PASSWORD = "bench-pw"  # noqa: S105 - the throw-away benchmark server's


async def one_session(url: str) -> float:
    started = time.perf_counter()
    async with aiohttp.ClientSession() as http, http.ws_connect(url,
                                                                protocols=("binary",)) as ws:
        buffer = b""

        async def read(n: int) -> bytes:
            nonlocal buffer
            while len(buffer) < n:
                buffer += await ws.receive_bytes(timeout=10)
            part, buffer = buffer[:n], buffer[n:]
            return part

        await read(12)
        await ws.send_bytes(b"RFB 003.008\n")
        (count,) = await read(1)
        await read(count)
        await ws.send_bytes(b"\x01")
        await read(4)
        await ws.send_bytes(b"\x01")
        head = await read(24)
        await read(struct.unpack("!I", head[20:24])[0])
        return time.perf_counter() - started


async def measure(relay: RelayServer, target: str, sessions: int) -> list[float]:
    url = f"{relay.public_url}/t/bench/{target}/websockify"
    await one_session(url)  # warm-up
    return [await one_session(url) for _ in range(sessions)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_vnc_password(folder / "passwd", PASSWORD)
        (folder / "password").write_text(PASSWORD)
        ca, cert, key = make_ca(folder)
        creds = Credentials(password_file=str(folder / "password"))
        with XvncServer() as plain, \
                XvncServer(extra_args=("-SecurityTypes", "VncAuth",
                                       "-PasswordFile", str(folder / "passwd"))) as vncauth, \
                XvncServer(extra_args=("-SecurityTypes", "X509Vnc", "-PasswordFile",
                                       str(folder / "passwd"), "-X509Cert", str(cert),
                                       "-X509Key", str(key))) as x509:
            routes = [
                Route("bench", "none", "127.0.0.1", plain.port),
                Route("bench", "vncauth", "127.0.0.1", vncauth.port, credentials=creds),
                Route("bench", "x509", "127.0.0.1", x509.port, credentials=creds,
                      tls=TlsSpec(ca_file=str(ca), server_name=SERVER_NAME)),
            ]
            settings = RelaySettings(listen=Address("127.0.0.1", 0),
                                     internal_listen=Address("127.0.0.1", 0))

            async def run() -> dict[str, list[float]]:
                async with RelayServer(settings, routes) as relay:
                    return {name: await measure(relay, name, args.sessions)
                            for name in ("none", "vncauth", "x509")}

            results = asyncio.run(run())
    base = statistics.median(results["none"])
    print("| security toward the server | median ms | p90 ms | vs None |")
    print("|---|---|---|---|")
    labels = {"none": "None (passed through)", "vncauth": "VNC Authentication (relay)",
              "x509": "VeNCrypt X509Vnc (relay: TLS + DES)"}
    for name, times in results.items():
        median = statistics.median(times)
        p90 = statistics.quantiles(times, n=10)[-1]
        print(f"| {labels[name]} | {median * 1000:.1f} | {p90 * 1000:.1f} | "
              f"{median / base:.2f}x |")


if __name__ == "__main__":
    main()
