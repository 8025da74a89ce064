"""The findings of the second hostile review (issue #26), each against the real relay.

Real sockets on 127.0.0.1; a real HAProxy in front where the finding is about the Ingress; real
Xvnc where a VNC server is involved. docs/SECURITY.md names each test in its threat table.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import socket
import ssl
import struct
import sys
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from harness.certs import make_ca, make_server_cert
from harness.servers import GREETING, TcpServer
from harness.waiting import eventually
from harness.xvnc import XvncServer
from tests.conftest import RelayFactory
from tests.relay.test_auth import (
    ALICE_PASSWORD,
    BOB_TOKEN,
    KEY,
    csrf_from,
    exchange,
    jar_session,
    targets,
)
from tests.relay.test_recording import tiny_tmpfs as tiny_tmpfs  # a fixture
from tests.support.haproxy import HttpProxy
from tests.support.rfbclient import viewer_handshake
from vncgate.common.model import Route
from vncgate.common.spec import RecordingPolicy, SpecError, parse_recording
from vncgate.kubectl import localpeer
from vncgate.kubectl.proxy import Tunnel, serve
from vncgate.relay import closecodes
from vncgate.relay.access import links
from vncgate.relay.access.identity import AuthMode
from vncgate.relay.access.passwords import hash_secret
from vncgate.relay.access.proxies import parse_networks
from vncgate.relay.access.users import User
from vncgate.relay.recording.capture import (
    CLIENT,
    END,
    FORMAT_VERSION,
    HEADER,
    MAGIC,
    SERVER,
    SUFFIX,
    encode_record,
    read_records,
    summary_path,
)
from vncgate.relay.recording.store import RecordingSettings, summarize
from vncgate.relay.rfb.viewerstream import ClientFilter
from vncgate.relay.settings import AuthSettings
from vncgate.relay.web.server import RelayServer

CAROL_PASSWORD = "carol's plain password"
USERS = {
    "alice": User("alice", hash_secret(ALICE_PASSWORD), ("lab-admins",)),
    "bob": User("bob", "sha256$" + hashlib.sha256(BOB_TOKEN.encode()).hexdigest()),
    "carol": User("carol", CAROL_PASSWORD),  # a plain entry: a password too
}
# The relay believes X-Forwarded-For from 127.0.0.1: tests name clients there, or a real
# HAProxy on loopback does.
AUTH = AuthSettings(mode=AuthMode.TOKEN, users=USERS, session_secret=b"s" * 32,
                    link_keys=(KEY,), trusted_proxies=parse_networks(["127.0.0.1/32"], "t"))


@pytest.fixture
async def relay(make_relay: RelayFactory, backend: TcpServer) -> AsyncIterator[RelayServer]:
    async with make_relay(routes=targets(backend.port), auth=AUTH) as server:
        yield server


def bearer(token: str, client: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "X-Forwarded-For": client}


async def signed_in(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> int:
    """200 with a credential, 302 (to the login page) without one, 429 when refused."""
    async with http.get(f"{url}/", allow_redirects=False, headers=headers) as resp:
        return resp.status


# --- 3. bearer tokens: token entries only, failures counted overall --------------------------

async def test_passwords_are_never_bearer_tokens(relay: RelayServer) -> None:
    async with aiohttp.ClientSession() as http:
        url = relay.public_url
        assert await signed_in(http, url, bearer(BOB_TOKEN, "192.0.2.1")) == 200
        # A password (scrypt or plain entry) as a bearer token skipped the per-account limit
        # of sign-ins: it is no bearer token at all.
        assert await signed_in(http, url, bearer(ALICE_PASSWORD, "192.0.2.2")) == 302
        assert await signed_in(http, url, bearer(CAROL_PASSWORD, "192.0.2.3")) == 302


async def test_bearer_guesses_from_many_addresses_are_limited_overall(relay: RelayServer
                                                                      ) -> None:
    limit = relay.state.bearer_failures.limit
    async with aiohttp.ClientSession() as http:
        url = relay.public_url
        # The reviewer's spread: each address stays under its own limit of 5.
        for n in range(limit):
            assert await signed_in(http, url, bearer(f"guess-{n}", f"198.51.100.{n % 50}")) \
                == 302
        assert await signed_in(http, url, bearer("one-more", "203.0.113.1")) == 429
        # The limit refuses failures only: a good token still works, from anywhere.
        assert await signed_in(http, url, bearer(BOB_TOKEN, "203.0.113.2")) == 200


async def test_failures_never_refuse_a_good_token_or_link(relay: RelayServer) -> None:
    link, _ = links.mint(KEY, "lab/open", 600)
    async with aiohttp.ClientSession() as http:
        url = relay.public_url
        for n in range(5):
            assert await signed_in(http, url, bearer(f"guess-{n}", "192.0.2.7")) == 302
        assert await signed_in(http, url, bearer("guess-5", "192.0.2.7")) == 429
        # Before the fix the whole address was refused, good credentials included: behind an
        # Ingress without a trusted proxy that address was everyone's.
        assert await signed_in(http, url, bearer(BOB_TOKEN, "192.0.2.7")) == 200
    async with jar_session() as http:
        http.headers["X-Forwarded-For"] = "192.0.2.7"
        status, reply = await exchange(http, relay, "open", "not-a-link")
        assert status == 429 and "too many bad links" in reply["error"]
        assert (await exchange(http, relay, "open", link))[0] == 200


# --- 7. one address's failures lock nobody else out, behind a real reverse proxy -------------

def from_address(address: str) -> aiohttp.ClientSession:
    """A browser on its own loopback address (127.0.0.0/8 is all local on Linux)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)),
                                 cookie_jar=aiohttp.CookieJar(unsafe=True))


async def sign_in_at(http: aiohttp.ClientSession, url: str, user: str, password: str) -> int:
    csrf = await csrf_from(http, f"{url}/login")
    async with http.post(f"{url}/login", allow_redirects=False, headers={"Origin": url},
                         data={"user": user, "password": password, "csrf": csrf}) as resp:
        return resp.status


async def test_guessing_behind_the_ingress_keeps_no_one_else_out(
        relay: RelayServer, tmp_path: Path) -> None:
    backend = relay.public_url.removeprefix("http://")
    with HttpProxy(tmp_path, backend) as proxy:
        url = proxy.url
        async with from_address("127.0.0.3") as alice, from_address("127.0.0.2") as guesser, \
                from_address("127.0.0.4") as helper, from_address("127.0.0.5") as colleague, \
                from_address("127.0.0.6") as new_browser:
            assert await sign_in_at(alice, url, "alice", ALICE_PASSWORD) == 303
            # One address guesses: it is slowed, keyed on its own address (from HAProxy's
            # X-Forwarded-For), not on the proxy's, which every user shares.
            for _ in range(5):
                assert await sign_in_at(guesser, url, "alice", "a guess!") == 401
            assert await sign_in_at(guesser, url, "alice", "a guess!") == 429
            assert await sign_in_at(colleague, url, "bob", BOB_TOKEN) == 303
            # With a second address the account's own limit (10 in 5 minutes) is reached: a
            # browser that never signed in as alice waits, the one that did does not.
            for _ in range(5):
                assert await sign_in_at(helper, url, "alice", "a guess!") == 401
            assert await sign_in_at(new_browser, url, "alice", ALICE_PASSWORD) == 429
            assert await sign_in_at(alice, url, "alice", ALICE_PASSWORD) == 303
            # Guesses at another account from alice's browser are not exempt.
            assert await sign_in_at(alice, url, "carol", "a guess!") == 401


# --- 5. CSRF: the token hangs on the sign-in, not on a cookie a sibling host can plant --------

async def list_csrf(http: aiohttp.ClientSession, url: str) -> str:
    """The token of the list page's forms (sign-out, End session), as the page carries it."""
    async with http.get(f"{url}/") as page:
        assert page.status == 200
        assert page.headers["Referrer-Policy"] == "same-origin"
        match = re.search(r'name="csrf" value="([^"]+)"', await page.text())
    assert match is not None
    return match.group(1)


async def still_signed_in(http: aiohttp.ClientSession, url: str) -> bool:
    async with http.get(f"{url}/", allow_redirects=False) as page:
        return page.status == 200


async def test_a_planted_csrf_cookie_and_origin_null_sign_nobody_out(relay: RelayServer) -> None:
    url = relay.public_url
    async with jar_session() as http:
        assert await sign_in_at(http, url, "alice", ALICE_PASSWORD) == 303
        # evil.example.test set `vncgate_csrf=known; Domain=example.test`: the browser sends it
        # here, and the page posts the same value with Referrer-Policy: no-referrer.
        http.cookie_jar.update_cookies({"vncgate_csrf": "known-value"}, URL(url))
        for end in ("logout", "sessions/end"):
            async with http.post(f"{url}/{end}", allow_redirects=False,
                                 headers={"Origin": "null"},
                                 data={"csrf": "known-value", "namespace": "lab",
                                       "name": "open"}) as resp:
                assert resp.status == 403, end
        assert await still_signed_in(http, url)
        token = await list_csrf(http, url)
        # The page's own token, but from a page that hides its origin: refused.
        async with http.post(f"{url}/logout", allow_redirects=False, data={"csrf": token},
                             headers={"Origin": "null"}) as resp:
            assert resp.status == 403
        # Another sign-in's token (the attacker's own, from their account) does not fit.
        async with jar_session() as other:
            assert await sign_in_at(other, url, "bob", BOB_TOKEN) == 303
            foreign_token = await list_csrf(other, url)
        async with http.post(f"{url}/logout", allow_redirects=False,
                             data={"csrf": foreign_token}, headers={"Origin": url}) as resp:
            assert resp.status == 403
        assert await still_signed_in(http, url)
        # The relay's own form, as a browser posts it: signs out.
        async with http.post(f"{url}/logout", allow_redirects=False, data={"csrf": token},
                             headers={"Origin": url}) as resp:
            assert resp.status == 303
        assert not await still_signed_in(http, url)


async def test_cookies_are_host_only_under_tls(make_relay: RelayFactory, backend: TcpServer,
                                               tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    pem = make_server_cert(ca, tmp_path / "server", "relay")
    context = ssl.create_default_context(cafile=ca.cert)
    async with make_relay(routes=targets(backend.port), auth=AUTH, tls_cert=pem.cert,
                          tls_key=pem.key) as relay, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context),
            cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        url = relay.public_url
        async with http.get(f"{url}/login") as page:
            set_cookies = page.headers.getall("Set-Cookie")
        assert [c.split("=")[0] for c in set_cookies] == ["__Host-vncgate_csrf"]
        # A plain-named cookie (as a sibling host can plant) is not read at all.
        http.cookie_jar.update_cookies({"vncgate_csrf": "known-value"}, URL(url))
        csrf = await csrf_from(http, f"{url}/login")
        async with http.post(f"{url}/login", allow_redirects=False, headers={"Origin": url},
                             data={"user": "alice", "password": ALICE_PASSWORD,
                                   "csrf": csrf}) as resp:
            assert resp.status == 303
            names = {c.split("=")[0]: c for c in resp.headers.getall("Set-Cookie")}
        assert set(names) == {"__Host-vncgate_session", "__Host-vncgate_device"}
        for cookie in names.values():
            assert "Secure" in cookie and "Path=/" in cookie and "Domain" not in cookie
        assert await still_signed_in(http, url)


# --- 1. a small recording cannot exhaust the relay's memory -----------------------------------

ZEROS_MIB = 320


def craft_zero_recording(directory: Path) -> tuple[str, Path]:
    """What a viewer with `connect` on a recorded black screen gets Xvnc to send in Raw:
    hundreds of MiB of zeros, which compress to well under 1 MiB. Written as the relay writes
    (relay/recording/capture.py), but with no summary beside it, as for a session still open
    or cut by a crash."""
    recording_id = "lab/open/20260101T000000Z-0123abcd"
    path = directory / f"{recording_id}{SUFFIX}"
    path.parent.mkdir(parents=True)
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    header = json.dumps({"format": FORMAT_VERSION, "namespace": "lab", "name": "open",
                         "user": "viewer", "started": "2026-01-01T00:00:00Z",
                         "startedEpoch": 1767225600}).encode()
    chunk = encode_record(SERVER, 1, bytes(64 * 1024))
    with path.open("wb") as file:
        file.write(compressor.compress(MAGIC + bytes([FORMAT_VERSION])))
        file.write(compressor.compress(encode_record(HEADER, 0, header)))
        for _ in range(ZEROS_MIB * 16):
            file.write(compressor.compress(chunk))
        file.write(compressor.compress(encode_record(END, 2, json.dumps(
            {"code": 1000, "reason": "", "complete": True}).encode())))
        file.write(compressor.flush())
    assert path.stat().st_size < 1 << 20
    return recording_id, path


@contextlib.contextmanager
def peak_memory() -> Iterator[list[int]]:
    """The peak of Python's allocations (bytes objects included) within the block."""
    peak: list[int] = []
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        yield peak
        peak.append(tracemalloc.get_traced_memory()[1] - base)
    finally:
        tracemalloc.stop()


BOUND = 48 << 20  # the old code peaked at hundreds of MiB per listing


async def test_listing_a_recording_of_zeros_keeps_memory_bounded(
        make_relay: RelayFactory, backend: TcpServer, tmp_path: Path) -> None:
    recording_id, _ = craft_zero_recording(tmp_path)
    async with make_relay(routes=targets(backend.port),
                          recording=RecordingSettings(directory=tmp_path)) as relay, \
            aiohttp.ClientSession() as http:
        async def listing() -> str:
            async with http.get(f"{relay.public_url}/recordings/") as page:
                assert page.status == 200
                return await page.text()

        async def player() -> int:
            async with http.get(f"{relay.public_url}/recordings/{recording_id}/") as page:
                return page.status

        with peak_memory() as peak:
            pages = await asyncio.gather(*(listing() for _ in range(4)), player())
        assert peak[0] < BOUND, f"listing peaked at {peak[0] >> 20} MiB"
        assert all(recording_id in page for page in pages[:4]) and pages[4] == 200
        assert "complete" in pages[0]


def test_recordings_command_keeps_memory_bounded(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from vncgate.relay.cli import main

    recording_id, path = craft_zero_recording(tmp_path / "recordings")
    directory = str(tmp_path / "recordings")
    with peak_memory() as peak:
        assert main(["recordings", "--recording-dir", directory, "list", "--json"]) == 0
        assert main(["recordings", "--recording-dir", directory, "export", recording_id,
                     "-o", str(tmp_path / "copy")]) == 0
    assert peak[0] < BOUND, f"list and export peaked at {peak[0] >> 20} MiB"
    assert json.loads(capsys.readouterr().out)["state"] == "complete"
    assert (tmp_path / "copy").read_bytes() == path.read_bytes()


async def test_a_finished_recording_has_its_summary_beside_it(
        make_relay: RelayFactory, xvnc: XvncServer, tmp_path: Path) -> None:
    from tests.relay.test_recording import record_session

    await record_session(make_relay, xvnc, tmp_path, RecordingPolicy(enabled=True))
    check_summary_beside(tmp_path)


def check_summary_beside(directory: Path) -> None:
    [path] = directory.rglob(f"*{SUFFIX}")
    tmp_path = directory
    beside = json.loads(summary_path(path).read_text())
    assert beside["size"] == path.stat().st_size and beside["end"]["complete"] is True
    assert beside["header"]["name"] == "xvnc" and beside["keyframes"] >= 1
    assert summarize(tmp_path, path, NoInflating()).state == "complete"  # type: ignore[arg-type]


class NoInflating:
    """In place of the semaphore that bounds inflating files: fails if one is inflated."""

    def __enter__(self) -> None:
        raise AssertionError("a file with its summary beside it was inflated")

    def __exit__(self, *exc: object) -> None:
        pass


# --- 2. the recorded viewer cannot switch its recording off -----------------------------------

KEY_DOWN_UP = struct.pack("!BBxxI", 4, 1, 0x61) + struct.pack("!BBxxI", 4, 0, 0x61)
RAW_ONLY = struct.pack("!BxHi", 2, 1, 0)


async def drain(ws: aiohttp.ClientWebSocketResponse, received: list[int]) -> None:
    """Read everything the relay sends, as a browser that keeps up does."""
    async for msg in ws:
        if msg.type is aiohttp.WSMsgType.BINARY:
            received[0] += len(msg.data)


async def test_large_updates_wait_for_the_disk_and_the_keys_after_them_are_recorded(
        make_relay: RelayFactory, tmp_path: Path) -> None:
    """The reviewer's attack, scaled: four non-incremental full-screen Raw updates, far over
    the recording's queue, then keys. Before, the recording was cut ("the disk did not keep
    up", complete=false) and the keys typed afterwards went unrecorded."""
    width, height = 1920, 1080
    queue = 1 << 20  # each update is 8 MiB
    with XvncServer(geometry=f"{width}x{height}") as big:
        route = Route("lab", "big", "127.0.0.1", big.port,
                      recording=RecordingPolicy(enabled=True, input=True))
        async with make_relay(routes=[route], recording=RecordingSettings(
                directory=tmp_path, queue_bytes=queue)) as relay, \
                aiohttp.ClientSession() as http, \
                http.ws_connect(f"{relay.public_url}/t/lab/big/websockify",
                                protocols=("binary",)) as ws:
            stream, _ = await viewer_handshake(ws)
            received = [len(stream.buffer)]
            reader = asyncio.create_task(drain(ws, received))
            full = struct.pack("!BBHHHH", 3, 0, 0, 0, width, height)
            await ws.send_bytes(RAW_ONLY)
            for n in range(1, 5):  # one at a time: Xvnc answers requests that wait together once
                await ws.send_bytes(full)
                await eventually(lambda n=n: received[0] >= n * width * height * 4,
                                 f"full-screen update {n} relayed", timeout=60,
                                 context=lambda: received[0])
            await ws.send_bytes(KEY_DOWN_UP * 12)
            before = received[0]
            await ws.send_bytes(struct.pack("!BBHHHH", 3, 0, 0, 0, 8, 8))  # after the keys
            await eventually(lambda: received[0] > before, "the server answered after the keys")
            await ws.close()
            await reader
            assert not relay.state.metrics.registry.get_sample_value(
                "vncgate_recordings_incomplete_total", {"reason": "queue"})
    [path] = await asyncio.to_thread(lambda: list(tmp_path.rglob(f"*{SUFFIX}")))
    records = await asyncio.to_thread(lambda: list(read_records(path)))
    assert records[-1].kind == END and records[-1].json()["complete"] is True
    keys = [r.payload for r in records if r.kind == CLIENT and r.payload[0] == 4]
    assert len(keys) == 24, f"{len(keys)} of 24 keystrokes recorded"


async def test_a_required_recording_that_cannot_go_on_ends_the_session(
        make_relay: RelayFactory, xvnc: XvncServer, tiny_tmpfs: Path) -> None:
    route = Route("lab", "xvnc", "127.0.0.1", xvnc.port,
                  recording=RecordingPolicy(enabled=True, input=True, required=True))
    async with make_relay(routes=[route], recording=RecordingSettings(directory=tiny_tmpfs)) \
            as relay, aiohttp.ClientSession() as http, \
            http.ws_connect(f"{relay.public_url}/t/lab/xvnc/websockify",
                            protocols=("binary",)) as ws:
        # The header cannot be written: the session ends during its handshake already.
        await ws.send_bytes(b"RFB 003.008\n\x01\x01" + RAW_ONLY
                            + struct.pack("!BBHHHH", 3, 0, 0, 0, 800, 600))

        async def closed() -> aiohttp.WSMessage | None:
            msg = await ws.receive(timeout=10)
            return msg if msg.type is aiohttp.WSMsgType.CLOSE else None

        msg = await eventually(closed, "the session closed", timeout=20, interval=0)
    assert msg.data == closecodes.RECORDING_FAILED
    assert "must be recorded" in msg.extra


def test_required_recording_needs_it_enabled() -> None:
    assert parse_recording({"enabled": True, "required": True}) == RecordingPolicy(
        enabled=True, required=True)
    with pytest.raises(SpecError, match="needs enabled: true"):
        parse_recording({"required": True})


async def test_a_pointer_with_the_0x80_bit_smuggles_no_set_encodings(
        make_relay: RelayFactory, xvnc: XvncServer, tmp_path: Path) -> None:
    """TigerVNC reads a PointerEvent as 6 bytes unless the viewer announced
    ExtendedMouseButtons; the relay read 7 when the 0x80 bit was set, one byte off from the
    server from there on: a SetEncodings after it went past the recording's encoding filter
    (or the session stalled)."""
    route = Route("lab", "xvnc", "127.0.0.1", xvnc.port, recording=RecordingPolicy(enabled=True))
    async with make_relay(routes=[route], recording=RecordingSettings(directory=tmp_path)) \
            as relay, aiohttp.ClientSession() as http, \
            http.ws_connect(f"{relay.public_url}/t/lab/xvnc/websockify",
                            protocols=("binary",)) as ws:
        stream, _ = await viewer_handshake(ws)
        zrle_and_mouse = struct.pack("!BxH2i", 2, 2, 16, -316)
        await ws.send_bytes(struct.pack("!BBHH", 5, 0x80, 10, 10) + zrle_and_mouse
                            + struct.pack("!BBHHHH", 3, 0, 0, 0, 800, 600))
        assert await stream.read(1) == b"\x00"  # a FramebufferUpdate: the relay kept step
        (count,) = struct.unpack("!xH", await stream.read(3))
        encodings = set()
        for _ in range(count):
            _x, _y, w, h, encoding = struct.unpack("!HHHHi", await stream.read(12))
            encodings.add(encoding)
            if encoding == 0:
                await stream.read(w * h * 4)
            else:
                break  # anything but Raw: the SetEncodings was not filtered
        assert encodings == {0}, f"the server used encodings {encodings}"


async def test_view_only_and_idle_sessions_take_extended_mouse_buttons_out() -> None:
    """The view-only filter removes ExtendedMouseButtons from SetEncodings, so no server reads
    7-byte PointerEvents where the relay reads 6."""
    flt = ClientFilter(view_only=False)
    flt.server_greeting(b"RFB 003.008\n")
    handshake = b"RFB 003.008\n" + b"\x01" + b"\x01"
    sent = flt.feed(handshake + struct.pack("!BxH3i", 2, 3, 16, -316, 0)
                    + struct.pack("!BBHH", 5, 0x80, 1, 1) + struct.pack("!BBxxI", 4, 1, 0x61))
    assert sent == handshake + struct.pack("!BxH2i", 2, 2, 16, 0) \
        + struct.pack("!BBHH", 5, 0x80, 1, 1) + struct.pack("!BBxxI", 4, 1, 0x61)


# --- 4. kubectl vnc proxy lends its user's identity to that user's processes only ------------

CLIENT_AS = """
import encodings.idna, os, socket, sys  # imported before setuid: root's files are private
os.setuid(int(sys.argv[2]))
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10) as conn:
    data = b""
    while len(data) < 12:
        chunk = conn.recv(12 - len(data))
        if not chunk:
            break
        data += chunk
print(data.hex())
"""


async def first_bytes_as(uid: int, port: int) -> bytes:
    """The first bytes a viewer run by `uid` (a child process) gets from the local port."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT_AS, str(port), str(uid), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await child.communicate()
    assert child.returncode == 0, err.decode()
    return bytes.fromhex(out.decode().strip())


async def unused_bearer() -> str:
    return "Bearer unused"


@pytest.mark.skipif(os.geteuid() != 0, reason="connecting as another user needs root (setuid)")
async def test_the_local_proxy_refuses_other_users(make_relay: RelayFactory,
                                                   backend: TcpServer) -> None:
    reports: list[str] = []
    async with make_relay(routes=targets(backend.port)) as relay:
        tunnel = Tunnel(f"{relay.public_url.replace('http', 'ws', 1)}/t/lab/open/websockify",
                        unused_bearer, report=reports.append)
        ports: list[int] = []
        server = asyncio.create_task(serve(tunnel, "127.0.0.1", 0, ports.append))
        try:
            await eventually(lambda: ports, "the proxy listening")
            # Another user of the machine (nobody, 65534): no console, and the user is told.
            assert await first_bytes_as(65534, ports[0]) == b""
            assert tunnel.refused == 1 and "uid 65534" in reports[-1]
            # The proxy's own user gets the console (the server's greeting, through the relay:
            # not the proxy's own, which would come with a refusal).
            assert await first_bytes_as(os.getuid(), ports[0]) == GREETING
            assert tunnel.sessions == 1
            await eventually(lambda: any(r.endswith("connected") for r in reports),
                             "the tunnel's session through the relay", context=lambda: reports)
            assert not any("refused" in r or "credentials" in r for r in reports[1:]), reports
        finally:
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server


def test_the_owner_of_a_loopback_connection_is_read() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener, \
            socket.create_connection(listener.getsockname()) as client:
        accepted, peer = listener.accept()
        with accepted:
            assert localpeer.peer_uid(accepted.getsockname(), peer) == os.getuid()
            assert localpeer.peer_uid(accepted.getsockname(), ("127.0.0.1", 1)) is None
        assert client.getsockname()[1] == peer[1]
