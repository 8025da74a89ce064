"""The probe against real TigerVNC servers at their lock-out settings: probes must not get the
operator's or a viewer's address blacklisted.

TigerVNC counts every connection from an address that does not log in, and at
`-BlacklistThreshold` (default 5) answers that address with "Too many security failures" for
`-BlacklistTimeout` seconds (default 10, doubling). Every test here starts its own Xvnc, so each
begins with a clean blacklist (XvncServer finds its server ready without connecting to it). A
relay and the operator share the source address 127.0.0.1, as they do in a cluster where
traffic to a console is SNATed to the node's address.
"""

from __future__ import annotations

import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from harness.waiting import eventually
from harness.xvnc import XvncServer
from tests.conftest import RelayFactory
from tests.operator.conftest import (
    TARGETS,
    Cluster,
    conditions,
    operator_settings,
    running_operator,
    vnc_target,
)
from vncgate.common.model import Route
from vncgate.operator.probe import SECURITY_TYPES_READ, ProbeResult, probe_rfb
from vncgate.relay.rfb.security import vnc_auth_response
from vncgate.relay.web.server import RelayServer

PROBE_CYCLES = 100
PASSWORD = "probe-secret"


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "passwd"
    result = subprocess.run(["vncpasswd", "-f"], input=PASSWORD.encode() + b"\n",
                            capture_output=True, check=True, timeout=10)
    path.write_bytes(result.stdout)
    return path


@pytest.fixture
def fresh_xvnc(tmp_path: Path) -> Iterator[XvncServer]:
    """An Xvnc of this test alone, at TigerVNC's default blacklist settings, with its log."""
    with XvncServer(log_path=tmp_path / "xvnc.log") as server:
        yield server


def xvnc_log(server: XvncServer) -> str:
    assert server.log_path is not None
    return server.log_path.read_text(errors="replace")


def greeting_only(port: int) -> bytes:
    """What the old probe did: read the greeting and hang up. TigerVNC counts it as a failure."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        return conn.recv(12)


def _read(conn: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return data


def connect_only(port: int) -> None:
    socket.create_connection(("127.0.0.1", port), timeout=5).close()


def security_types_read(port: int) -> None:
    """What the probe does with a password server: version exchange, security types, hang up."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        _read(conn, 12)
        conn.sendall(b"RFB 003.008\n")
        _read(conn, _read(conn, 1)[0])


def vnc_login(port: int, password: str = PASSWORD) -> str:
    """A viewer's VNC Authentication (RFB 3.8): "ok", or the server's refusal."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        if _read(conn, 12) == b"RFB 003.003\n":  # how TigerVNC answers a blacklisted address
            _read(conn, 4)
            return _read(conn, struct.unpack("!I", _read(conn, 4))[0]).decode()
        conn.sendall(b"RFB 003.008\n")
        count = _read(conn, 1)[0]
        assert 2 in _read(conn, count)
        conn.sendall(b"\x02")
        conn.sendall(vnc_auth_response(password, _read(conn, 16)))
        (result,) = struct.unpack("!I", _read(conn, 4))
        return "ok" if result == 0 else f"SecurityResult {result}"


@pytest.mark.parametrize("leave", [connect_only, greeting_only, security_types_read],
                         ids=["connect", "greeting", "security-types"])
def test_tigervnc_counts_every_connection_that_does_not_log_in(
        leave: Any, tmp_path: Path, password_file: Path) -> None:
    # The measurement behind the probe's design, at Xvnc's default blacklist settings: however
    # early a connection without a login ends, it is a mark, and only a login clears them.
    with XvncServer(log_path=tmp_path / "xvnc.log", extra_args=(
            "-SecurityTypes", "VncAuth", "-PasswordFile", str(password_file))) as server:
        for _ in range(4):
            leave(server.port)
        assert vnc_login(server.port) == "ok"  # clears the four marks
        for _ in range(5):
            leave(server.port)
        assert vnc_login(server.port) == "Too many security failures"


async def viewer_reaches_server_init(relay: RelayServer, name: str) -> tuple[int, int]:
    """A viewer's whole handshake through the relay's bridge, as noVNC does it, to ServerInit."""
    async with aiohttp.ClientSession() as http, http.ws_connect(
            f"{relay.public_url}/t/lab/{name}/websockify", protocols=("binary",),
            origin=relay.public_url) as ws:
        buffer = b""

        async def read(count: int) -> bytes:
            nonlocal buffer
            while len(buffer) < count:
                msg = await ws.receive(timeout=5)
                assert msg.type == aiohttp.WSMsgType.BINARY, (
                    f"the bridge closed with {ws.close_code} after {buffer!r}")
                buffer += msg.data
            data, buffer = buffer[:count], buffer[count:]
            return data

        assert await read(12) == b"RFB 003.008\n"
        await ws.send_bytes(b"RFB 003.008\n")
        (count,) = await read(1)
        assert count, f"the server refused the viewer: {buffer!r}"
        assert 1 in await read(count)
        await ws.send_bytes(b"\x01")  # security type None
        assert await read(4) == b"\x00\x00\x00\x00"  # SecurityResult OK
        await ws.send_bytes(b"\x01")  # ClientInit, shared
        width, height = struct.unpack("!HH", await read(4))
        return width, height


async def test_a_hundred_probes_leave_the_viewers_in(
        fresh_xvnc: XvncServer, make_relay: RelayFactory) -> None:
    results: list[ProbeResult] = []
    for _ in range(PROBE_CYCLES):
        results.append(await probe_rfb("127.0.0.1", fresh_xvnc.port, 5))
    refused = [r for r in results if not (r.ok and r.logged_in)]
    assert not refused, f"{len(refused)} of {PROBE_CYCLES} probes failed: {refused[0]}"
    assert results[-1].security_types == (1,)
    async with make_relay(routes=[Route("lab", "desk", "127.0.0.1", fresh_xvnc.port)]) as relay:
        assert await viewer_reaches_server_init(relay, "desk") == (800, 600)
    log = xvnc_log(fresh_xvnc)
    assert "blacklisted" not in log.lower()
    # Each probe chose security type None and hung up before ClientInit (no "Client requests"
    # line is missing, so none of them stopped short of logging in).
    assert log.count("Client requests security type None") >= PROBE_CYCLES


async def test_greeting_only_connections_blacklist_and_the_probe_says_so(
        fresh_xvnc: XvncServer, make_relay: RelayFactory) -> None:
    # The old probe's habit, five times: TigerVNC blocks 127.0.0.1.
    for _ in range(5):
        greeting_only(fresh_xvnc.port)
    result = await probe_rfb("127.0.0.1", fresh_xvnc.port, 5)
    assert (result.ok, result.reason, result.blocked) == (False, "Blacklisted", True)
    assert "Too many security failures" in result.message
    assert "blocking connections from this address" in result.message
    assert "blacklisted: 127.0.0.1" in xvnc_log(fresh_xvnc).lower()


async def test_the_probe_logging_in_clears_the_marks_after_a_block(tmp_path: Path) -> None:
    # A one-second block, so that the block lifts within the test. After it lifts, TigerVNC lets
    # one connection from the address through; the probe logs in with it, which clears the
    # address, so that every later connection is let in again (without the login, each would
    # find the address blocked again: the marks stay at the threshold).
    with XvncServer(log_path=tmp_path / "xvnc.log",
                    extra_args=("-BlacklistTimeout", "1")) as server:
        for _ in range(5):
            greeting_only(server.port)

        async def probe_ok() -> ProbeResult | None:
            result = await probe_rfb("127.0.0.1", server.port, 5)
            return result if result.ok else None

        first = await eventually(probe_ok, "a probe after the block lifted", timeout=30)
        assert first.logged_in
        later = [await probe_rfb("127.0.0.1", server.port, 5) for _ in range(10)]
        assert all(r.ok for r in later), next(r for r in later if not r.ok)


async def test_password_server_is_reachable_without_logging_in(
        tmp_path: Path, password_file: Path) -> None:
    with XvncServer(log_path=tmp_path / "xvnc.log", extra_args=(
            "-SecurityTypes", "VncAuth", "-PasswordFile", str(password_file))) as server:
        result = await probe_rfb("127.0.0.1", server.port, 5)
        assert (result.ok, result.logged_in, result.security_types) == (True, False, (2,))
        assert "asks for authentication (VncAuth(2))" in result.message
        assert "AuthFailure" not in xvnc_log(server)  # it never tried a password


async def test_the_operator_never_locks_out_a_password_server(
        k8s: Any, relay: RelayServer, tmp_path: Path, password_file: Path) -> None:
    # Every connection that does not log in is a mark (above), and the operator has no
    # password: it probes a password server once, and looks at it many more times without a
    # connection. A viewer's login still succeeds afterwards, at Xvnc's default settings.
    probes: list[ProbeResult] = []

    async def counting_prober(host: str, port: int, timeout: float) -> ProbeResult:
        probes.append(await probe_rfb(host, port, timeout))
        return probes[-1]

    with XvncServer(log_path=tmp_path / "xvnc.log", extra_args=(
            "-SecurityTypes", "VncAuth", "-PasswordFile", str(password_file))) as server:
        cluster = Cluster(k8s)
        config = operator_settings(relay_urls=(relay.internal_url,), probe_interval=0.1)
        async with running_operator(k8s, config, prober=counting_prober) as runtime:
            await cluster.create(TARGETS, vnc_target("lab", "bmc", {
                "address": {"host": "127.0.0.1", "port": server.port}}))
            status = await eventually(
                lambda: ((s := cluster.status("lab", "bmc")).get("phase") == "Ready" and s),
                "phase Ready", timeout=30)
            await eventually(lambda: runtime.scheduler.evaluations["lab/bmc"] >= 25,
                             "25 evaluations of the target (a probe interval of 0.1 s)",
                             timeout=60)
        assert len(probes) == 1, probes
        reachable = conditions(status)["Reachable"]
        assert (reachable["status"], reachable["reason"]) == ("True", SECURITY_TYPES_READ)
        assert "asks for authentication (VncAuth(2))" in reachable["message"]
        assert "greeting and security types read, no login attempted" in reachable["message"]
        assert status["serverVersion"] == "RFB 003.008"
        log = xvnc_log(server)
        assert log.count("accepted:") == 1, log
        assert vnc_login(server.port) == "ok", log

        # A restarted operator reads the verdict from status and does not probe again.
        async with running_operator(k8s, config, prober=counting_prober) as runtime:
            await eventually(lambda: runtime.scheduler.evaluations["lab/bmc"] >= 10,
                             "10 evaluations after the restart", timeout=60)
        assert len(probes) == 1, probes
        assert conditions(cluster.status("lab", "bmc"))["Reachable"]["reason"] == (
            SECURITY_TYPES_READ)


async def test_operator_shows_a_blocking_server_as_blacklisted(
        k8s: Any, relay: RelayServer, tmp_path: Path, password_file: Path) -> None:
    # Something else (a client with a wrong password, a scanner) got the address blocked for
    # an hour: status must say so instead of Ready.
    with XvncServer(log_path=tmp_path / "xvnc.log", extra_args=(
            "-SecurityTypes", "VncAuth", "-PasswordFile", str(password_file),
            "-BlacklistThreshold", "2", "-BlacklistTimeout", "3600")) as server:
        for _ in range(3):
            greeting_only(server.port)
        cluster = Cluster(k8s)
        config = operator_settings(relay_urls=(relay.internal_url,), probe_interval=0.5)
        async with running_operator(k8s, config):
            await cluster.create(TARGETS, vnc_target("lab", "bmc", {
                "address": {"host": "127.0.0.1", "port": server.port}}))
            # (serverVersion goes with the next probe when a handler wrote from an older body.)
            status = await eventually(
                lambda: ((s := cluster.status("lab", "bmc")).get("phase") == "Unreachable"
                         and "serverVersion" not in s and s),
                "phase Unreachable without a server version", timeout=30)
        found = conditions(status)
        assert (found["Reachable"]["status"], found["Reachable"]["reason"]) == (
            "False", "Blacklisted")
        assert found["Ready"]["reason"] == "Blacklisted"
        assert "blocking connections from this address" in found["Ready"]["message"]
        assert found["Registered"]["status"] == "True"
        assert "blacklisted: 127.0.0.1" in xvnc_log(server).lower()
