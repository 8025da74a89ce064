"""The relay answers the VNC server's security itself: real Xvnc with VncAuth, X509 and TLS.

The viewer is offered security None only and gets the server's real ServerInit; the password
stays in the relay. Servers: TigerVNC's Xvnc with `-SecurityTypes VncAuth -PasswordFile`
(written by TigerVNC's own `vncpasswd -f`), `X509Vnc,X509Plain` with a certificate from a test
CA made with openssl, and `TLSVnc` (anonymous TLS).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import ssl
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import pytest

from harness.servers import GREETING, Behaviour, TcpServer, passwordless_vnc
from harness.vncsecurity import SERVER_NAME, make_ca, write_vnc_password
from harness.waiting import eventually
from harness.xvnc import XvncServer
from tests.conftest import API_TOKEN, ARTIFACTS, RelayFactory
from tests.relay.test_sessions import move_pointer_through_relay, pointer_position
from tests.support.kubeconfig import write_kubeconfig
from tests.support.rfbclient import viewer_handshake
from vncgate.common.client import RelayClient
from vncgate.common.model import LOGIN_OK, LOGIN_REFUSED, LOGIN_UNREADABLE, Route
from vncgate.common.reach import ReachPolicy, parse_grants
from vncgate.common.spec import Credentials, RecordingPolicy, TlsSpec
from vncgate.relay import closecodes
from vncgate.relay.recording.capture import END, HEADER, SERVER, Record, read_records
from vncgate.relay.recording.store import RecordingSettings
from vncgate.relay.rfb.security import vnc_auth_response
from vncgate.relay.session.serversecrets import CREDENTIALS_TYPE

PASSWORD = "s3cret-pw"  # longer than 8: VNC Authentication uses the first 8 bytes
@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("vnc-secrets")
    (folder / "password").write_text(PASSWORD + "\n")
    (folder / "wrong").write_text("not-it\n")
    write_vnc_password(folder / "passwd", PASSWORD)
    make_ca(folder)
    other = folder / "other"
    other.mkdir()
    make_ca(other)  # a CA that did not sign the server's certificate
    return folder


def _server(colour: str, *args: str) -> XvncServer:
    ARTIFACTS.mkdir(exist_ok=True)
    return XvncServer(colour=colour, log_path=ARTIFACTS / "xvnc-security.log", extra_args=args)


@pytest.fixture(scope="module")
def vncauth_xvnc(secrets_dir: Path) -> Iterator[XvncServer]:
    with _server("#ff0000", "-SecurityTypes", "VncAuth",
                 "-PasswordFile", str(secrets_dir / "passwd")) as server:
        yield server


@pytest.fixture(scope="module")
def x509_xvnc(secrets_dir: Path) -> Iterator[XvncServer]:
    with _server("#ff0000", "-SecurityTypes", "X509Vnc,X509Plain",
                 "-PasswordFile", str(secrets_dir / "passwd"),
                 "-X509Cert", str(secrets_dir / "server.crt"),
                 "-X509Key", str(secrets_dir / "server.key")) as server:
        yield server


@pytest.fixture(scope="module")
def tlsvnc_xvnc(secrets_dir: Path) -> Iterator[XvncServer]:
    with _server("#ff0000", "-SecurityTypes", "TLSVnc",
                 "-PasswordFile", str(secrets_dir / "passwd")) as server:
        yield server


async def handshake_as_viewer(relay_url: str, target: str) -> tuple[list[int], int, int]:
    """noVNC's part: returns the security types offered and the desktop's size."""
    async with aiohttp.ClientSession() as http, http.ws_connect(
            f"{relay_url}/t/lab/{target}/websockify", protocols=("binary",)) as ws:
        stream, init = await viewer_handshake(ws)
        offered, width, height = init.offered, init.width, init.height
        await ws.send_bytes(struct.pack("!BBHHHH", 3, 0, 400, 300, 1, 1))
        (message_type,) = await stream.read(1)
        assert message_type == 0  # a FramebufferUpdate: the session is live
        return offered, width, height


async def close_of(relay_url: str, target: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.ws_connect(
            f"{relay_url}/t/lab/{target}/websockify", protocols=("binary",)) as ws:
        msg = await ws.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.CLOSE, f"expected a close, got {msg.type}"
        return int(msg.data), str(msg.extra)


def test_vnc_auth_response_matches_the_known_answer() -> None:
    # The DES quirk (bit-reversed key bytes), checked against TigerVNC's own obfuscation is
    # what the real-server tests below do; this pins a vector so a regression is obvious.
    challenge = bytes(range(16))
    first = vnc_auth_response("password", challenge)
    assert len(first) == 16 and first != challenge
    assert vnc_auth_response("password-longer", challenge) == first  # 8 bytes count
    assert vnc_auth_response("passwore", challenge) != first


async def test_vnc_authentication_with_a_password_file(
        make_relay: RelayFactory, vncauth_xvnc: XvncServer, secrets_dir: Path) -> None:
    route = Route("lab", "desk", "127.0.0.1", vncauth_xvnc.port,
                  credentials=Credentials(password_file=str(secrets_dir / "password")))
    async with make_relay(routes=[route]) as relay:
        offered, width, height = await handshake_as_viewer(relay.public_url, "desk")
    assert offered == [1]  # the viewer is never asked for a password
    assert (width, height) == (800, 600)


async def test_vnc_authentication_with_an_environment_variable(
        make_relay: RelayFactory, vncauth_xvnc: XvncServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DESK_VNC_PASSWORD", PASSWORD)
    route = Route("lab", "desk", "127.0.0.1", vncauth_xvnc.port,
                  credentials=Credentials(password_env="DESK_VNC_PASSWORD"))
    async with make_relay(routes=[route]) as relay:
        offered, _, _ = await handshake_as_viewer(relay.public_url, "desk")
    assert offered == [1]


async def test_a_wrong_password_closes_with_a_reason_and_leaks_nothing(
        make_relay: RelayFactory, vncauth_xvnc: XvncServer, secrets_dir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    route = Route("lab", "desk", "127.0.0.1", vncauth_xvnc.port,
                  credentials=Credentials(password_file=str(secrets_dir / "wrong")))
    async with make_relay(routes=[route]) as relay:
        code, reason = await close_of(relay.public_url, "desk")
    assert code == closecodes.CREDENTIAL_REFUSED
    assert "refused the stored credential" in reason
    assert "not-it" not in reason and "not-it" not in caplog.text


async def test_the_summary_reports_the_last_login_per_route(
        make_relay: RelayFactory, vncauth_xvnc: XvncServer, secrets_dir: Path) -> None:
    """What the operator polls: a refused credential, then a login with the right one; an
    unreadable one; a changed route forgets what was said of the old one."""
    wrong = Route("lab", "desk", "127.0.0.1", vncauth_xvnc.port,
                  credentials=Credentials(password_file=str(secrets_dir / "wrong")))
    unset = Route("lab", "other", "127.0.0.1", vncauth_xvnc.port,
                  credentials=Credentials(password_env="VNCGATE_TEST_UNSET_VARIABLE"))
    async with make_relay(routes=[wrong, unset]) as relay, aiohttp.ClientSession() as http:
        client = RelayClient(http, relay.internal_url, API_TOKEN)
        assert (await client.get_summary()).logins == {}
        code, reason = await close_of(relay.public_url, "desk")
        assert code == closecodes.CREDENTIAL_REFUSED
        await close_of(relay.public_url, "other")
        logins = (await client.get_summary()).logins
        assert logins["lab/desk"].result == LOGIN_REFUSED
        assert logins["lab/desk"].reason == reason
        assert "not-it" not in logins["lab/desk"].reason
        assert logins["lab/other"].result == LOGIN_UNREADABLE
        assert "VNCGATE_TEST_UNSET_VARIABLE" in logins["lab/other"].reason
        refused_at = logins["lab/desk"].at

        # The Secret (here: the file) is corrected: the next session logs in and says so.
        (secrets_dir / "corrected").write_text(PASSWORD + "\n")
        try:
            # (The registration API takes only Secret names; a file route is a manifest's.)
            relay.registry.put(Route(
                "lab", "desk", "127.0.0.1", vncauth_xvnc.port,
                credentials=Credentials(password_file=str(secrets_dir / "corrected"))))
            assert "lab/desk" not in (await client.get_summary()).logins  # another credential
            await handshake_as_viewer(relay.public_url, "desk")
            outcome = (await client.get_summary()).logins["lab/desk"]
            assert outcome.result == LOGIN_OK and outcome.at >= refused_at
        finally:
            (secrets_dir / "corrected").unlink()
        await client.delete_route("lab", "other")
        assert "lab/other" not in (await client.get_summary()).logins


async def test_a_missing_password_says_what_to_set(
        make_relay: RelayFactory, vncauth_xvnc: XvncServer) -> None:
    route = Route("lab", "desk", "127.0.0.1", vncauth_xvnc.port,
                  credentials=Credentials(password_env="VNCGATE_TEST_UNSET_VARIABLE"))
    async with make_relay(routes=[route]) as relay:
        code, reason = await close_of(relay.public_url, "desk")
    assert code == closecodes.CREDENTIAL_REFUSED and "VNCGATE_TEST_UNSET_VARIABLE" in reason


async def test_x509_vnc_verified_against_the_ca(
        make_relay: RelayFactory, x509_xvnc: XvncServer, secrets_dir: Path) -> None:
    route = Route("lab", "bmc", "127.0.0.1", x509_xvnc.port,
                  credentials=Credentials(password_file=str(secrets_dir / "password")),
                  tls=TlsSpec(ca_file=str(secrets_dir / "ca.crt"), server_name=SERVER_NAME))
    async with make_relay(routes=[route]) as relay:
        offered, width, _ = await handshake_as_viewer(relay.public_url, "bmc")
    assert offered == [1] and width == 800


@pytest.mark.parametrize(("tls", "expected"), [
    (lambda d: TlsSpec(ca_file=str(d / "other" / "ca.crt"), server_name=SERVER_NAME),
     "not trusted"),
    (lambda d: TlsSpec(ca_file=str(d / "ca.crt"), server_name="other.test.invalid"),
     "not trusted"),
])
async def test_x509_refuses_an_untrusted_certificate_or_name(
        make_relay: RelayFactory, x509_xvnc: XvncServer, secrets_dir: Path,
        tls: object, expected: str) -> None:
    spec = tls(secrets_dir)  # type: ignore[operator]
    route = Route("lab", "bmc", "127.0.0.1", x509_xvnc.port,
                  credentials=Credentials(password_file=str(secrets_dir / "password")), tls=spec)
    async with make_relay(routes=[route]) as relay:
        code, reason = await close_of(relay.public_url, "bmc")
    assert code == closecodes.BAD_UPSTREAM and expected in reason, reason


async def test_x509_with_insecure_skip_verify(
        make_relay: RelayFactory, x509_xvnc: XvncServer, secrets_dir: Path) -> None:
    route = Route("lab", "bmc", "127.0.0.1", x509_xvnc.port,
                  credentials=Credentials(password_file=str(secrets_dir / "password")),
                  tls=TlsSpec(insecure_skip_verify=True))
    async with make_relay(routes=[route]) as relay:
        offered, _, _ = await handshake_as_viewer(relay.public_url, "bmc")
    assert offered == [1]


async def test_x509_plain_sends_the_username_and_the_server_judges_it(
        make_relay: RelayFactory, x509_xvnc: XvncServer, secrets_dir: Path) -> None:
    # Xvnc checks Plain against PAM and -PlainUsers (empty: nobody), so a well-formed Plain
    # login is refused by the server's check, with its reason, never by a parse error.
    route = Route("lab", "bmc", "127.0.0.1", x509_xvnc.port,
                  credentials=Credentials(password_file=str(secrets_dir / "password"),
                                          username="operator"),
                  tls=TlsSpec(ca_file=str(secrets_dir / "ca.crt"), server_name=SERVER_NAME))
    async with make_relay(routes=[route]) as relay:
        code, reason = await close_of(relay.public_url, "bmc")
    assert code == closecodes.CREDENTIAL_REFUSED and "refused the stored credential" in reason


async def test_anonymous_tls_needs_insecure_skip_verify(
        make_relay: RelayFactory, tlsvnc_xvnc: XvncServer, secrets_dir: Path) -> None:
    creds = Credentials(password_file=str(secrets_dir / "password"))
    strict = Route("lab", "strict", "127.0.0.1", tlsvnc_xvnc.port, credentials=creds,
                   tls=TlsSpec(ca_file=str(secrets_dir / "ca.crt")))
    skip = Route("lab", "skip", "127.0.0.1", tlsvnc_xvnc.port, credentials=creds,
                 tls=TlsSpec(insecure_skip_verify=True))
    async with make_relay(routes=[strict, skip]) as relay:
        code, reason = await close_of(relay.public_url, "strict")
        assert code == closecodes.BAD_UPSTREAM and "anonymous TLS" in reason, reason
        offered, _, _ = await handshake_as_viewer(relay.public_url, "skip")
    assert offered == [1]


async def test_a_type_the_relay_does_not_speak_is_named(make_relay: RelayFactory,
                                                       vncauth_xvnc: XvncServer) -> None:
    route = Route("lab", "desk", "127.0.0.1", vncauth_xvnc.port,
                  tls=TlsSpec(insecure_skip_verify=True))
    async with make_relay(routes=[route]) as relay:
        code, reason = await close_of(relay.public_url, "desk")
    assert code == closecodes.BAD_UPSTREAM
    assert "offers no VeNCrypt" in reason and "VNC Authentication (2)" in reason, reason


async def test_view_only_input_is_dropped_on_a_tls_server(
        make_relay: RelayFactory, x509_xvnc: XvncServer, secrets_dir: Path) -> None:
    creds = Credentials(password_file=str(secrets_dir / "password"))
    tls = TlsSpec(ca_file=str(secrets_dir / "ca.crt"), server_name=SERVER_NAME)
    routes = [Route("lab", "watch", "127.0.0.1", x509_xvnc.port, view_only=True,
                    credentials=creds, tls=tls),
              Route("lab", "drive", "127.0.0.1", x509_xvnc.port, credentials=creds, tls=tls)]
    async with make_relay(routes=routes) as relay:
        await move_pointer_through_relay(relay, "drive", 100, 100)
        assert pointer_position(x509_xvnc) == (100, 100)  # the check can see a move
        await move_pointer_through_relay(relay, "watch", 321, 123)
        # The round trip inside move_pointer_through_relay already ordered the server's
        # handling of the (dropped) move; a drive move afterwards shows the order held.
        assert pointer_position(x509_xvnc) == (100, 100)
        await move_pointer_through_relay(relay, "drive", 222, 111)
        assert pointer_position(x509_xvnc) == (222, 111)


async def test_secret_routes_need_a_kubernetes_client(
        make_relay: RelayFactory, vncauth_xvnc: XvncServer,
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    route = Route("lab", "desk", "127.0.0.1", vncauth_xvnc.port,
                  credentials=Credentials(secret_name="desk-vnc"))
    async with make_relay(routes=[route]) as relay:
        code, reason = await close_of(relay.public_url, "desk")
    assert code == closecodes.CREDENTIAL_REFUSED and "Kubernetes credentials" in reason, reason


@contextlib.asynccontextmanager
async def tapping_proxy(port: int) -> AsyncIterator[tuple[int, bytearray, bytearray]]:
    """A TCP proxy on 127.0.0.1 in front of a server: its port, and every byte that went
    server -> relay and relay -> server (one connection), to find the login in."""
    from_server, to_server = bytearray(), bytearray()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   seen: bytearray) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                seen += data
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(pipe(up_reader, writer, from_server),
                             pipe(reader, up_writer, to_server))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], from_server, to_server
    finally:
        server.close()


def inflated(directory: Path) -> tuple[bytes, list[Record]]:
    (path,) = list(directory.rglob("*.vncrec"))
    return gzip.decompress(path.read_bytes()), list(read_records(path))


@pytest.mark.parametrize("target", ["vncauth", "x509"])
async def test_a_target_the_relay_logs_in_to_is_recorded_without_the_login(
        make_relay: RelayFactory, vncauth_xvnc: XvncServer, x509_xvnc: XvncServer,
        secrets_dir: Path, tmp_path: Path, target: str) -> None:
    """The recording holds what the viewer saw (ServerInit, then the update) and nothing of
    the relay's login: not the password, not VncAuth's challenge or response (taken off the
    wire by a proxy between the relay and Xvnc), not the server's certificate."""
    server = vncauth_xvnc if target == "vncauth" else x509_xvnc
    tls = (TlsSpec(ca_file=str(secrets_dir / "ca.crt"), server_name=SERVER_NAME)
           if target == "x509" else None)
    async with tapping_proxy(server.port) as (port, from_server, to_server):
        route = Route("lab", "desk", "127.0.0.1", port, tls=tls,
                      credentials=Credentials(password_file=str(secrets_dir / "password")),
                      recording=RecordingPolicy(enabled=True, input=True))
        async with make_relay(routes=[route], recording=RecordingSettings(directory=tmp_path)
                              ) as relay:
            offered, width, _ = await handshake_as_viewer(relay.public_url, "desk")
            assert offered == [1] and width == 800

            async def ended() -> list[Record] | None:
                found = await asyncio.to_thread(lambda: list(tmp_path.rglob("*.vncrec")))
                if not found:
                    return None
                records = await asyncio.to_thread(lambda: list(read_records(found[0])))
                return records if records and records[-1].kind == END else None
            await eventually(ended, "the recording's end", timeout=20)
    data, records = inflated(tmp_path)
    assert records[0].kind == HEADER and records[0].json()["serverVersion"] == "RFB 003.008"
    stream = b"".join(r.payload for r in records if r.kind == SERVER)
    assert struct.unpack_from("!HH", stream) == (800, 600)  # from ServerInit on
    (name_length,) = struct.unpack_from("!I", stream, 20)
    assert stream[24 + name_length] == 0  # then the update the viewer asked for
    # Nothing of the login: the greeting and security bytes the relay and the server exchanged
    assert b"RFB 003.008" not in stream
    for secret in (PASSWORD.encode(), PASSWORD[:8].encode()):
        assert secret not in data
    if target == "vncauth":
        # server: greeting 12, [count, types...], challenge 16; relay: version 12, choice 1,
        # response 16
        count = from_server[12]
        challenge = bytes(from_server[13 + count:13 + count + 16])
        response = bytes(to_server[13:29])
        assert response == vnc_auth_response(PASSWORD, challenge)
        assert challenge not in data and response not in data
    else:
        der = ssl.PEM_cert_to_DER_cert((secrets_dir / "server.crt").read_text())
        assert der[-64:] not in data  # the certificate's signature, as an example of TLS
        assert bytes(from_server[-32:]) not in data  # ciphertext is not recorded either


def plain_only_vencrypt(tls: ssl.SSLContext) -> Behaviour:
    """A VeNCrypt server that offers only Plain (X509Plain and VeNCrypt Plain) and keeps every
    byte it is sent, the credentials inside TLS included: what a server of the target's author
    would see."""
    async def behaviour(server: TcpServer, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        writer.write(GREETING)
        server.received += await reader.readexactly(12)
        writer.write(bytes([1, 19]))  # one security type: VeNCrypt
        server.received += await reader.readexactly(1)
        writer.write(b"\x00\x02")
        server.received += await reader.readexactly(2)
        writer.write(b"\x00\x02" + struct.pack("!II", 262, 256))  # X509Plain, VeNCrypt Plain
        try:
            subtype = await reader.readexactly(4)
        except asyncio.IncompleteReadError as exc:  # the relay hung up: it chose nothing
            server.received += exc.partial
            return
        server.received += subtype
        writer.write(b"\x01")
        await writer.drain()
        if struct.unpack("!I", subtype)[0] == 262:
            await writer.start_tls(tls)
        await server.read_into_received(reader)
    return behaviour


async def test_plain_is_never_sent_to_an_unverified_server(
        make_relay: RelayFactory, secrets_dir: Path) -> None:
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(secrets_dir / "server.crt", secrets_dir / "server.key")
    async with TcpServer(plain_only_vencrypt(tls)) as server:
        route = Route("lab", "bmc", "127.0.0.1", server.port,
                      credentials=Credentials(password_file=str(secrets_dir / "password"),
                                              username="dbadmin"),
                      tls=TlsSpec(insecure_skip_verify=True))
        async with make_relay(routes=[route]) as relay:
            code, reason = await close_of(relay.public_url, "bmc")
        await server.closed.wait()
    assert code == closecodes.BAD_UPSTREAM, (code, reason)
    assert reason.startswith("Plain sends the password itself, so only to a verified server, "
                             "never under insecureSkipVerify"), reason
    # The relay read the offer and said nothing more: no subtype chosen, no user, no password.
    assert bytes(server.received) == b"RFB 003.008\n\x13\x00\x02", bytes(server.received)
    assert PASSWORD.encode() not in server.received and b"dbadmin" not in server.received


async def test_a_granted_name_resolving_outside_its_grant_is_refused_at_dial(
        make_relay: RelayFactory) -> None:
    """The webhook judged the name as written; the relay judges what it resolves to now.
    `localhost` (the machine's hosts file) stands for a name whose address changed."""
    async with TcpServer(passwordless_vnc) as server:
        def grant(*cidrs: str) -> ReachPolicy:
            return parse_grants({"grants": [{"namespaces": ["lab"], "hosts": ["localhost"],
                                             "cidrs": list(cidrs)}]})
        route = Route("lab", "desk", "localhost", server.port)
        # Its networks hold where the name resolves: the session opens (the RFB greeting).
        async with make_relay(routes=[route], reach=grant("127.0.0.0/8", "::1/128")) as relay, \
                aiohttp.ClientSession() as http, http.ws_connect(
                    f"{relay.public_url}/t/lab/desk/websockify", protocols=("binary",)) as ws:
            first = await ws.receive(timeout=10)
            assert first.type is aiohttp.WSMsgType.BINARY and first.data == GREETING, first
        dialled = server.connections
        assert dialled >= 1
        # The name now resolves outside them: refused before any connection.
        async with make_relay(routes=[route], reach=grant("10.20.0.0/16")) as relay:
            code, reason = await close_of(relay.public_url, "desk")
        assert code == closecodes.FORBIDDEN, (code, reason)
        assert reason.startswith("localhost now resolves to ") and \
            "outside the network grant of namespace lab" in reason, reason
        assert server.connections == dialled


@pytest.mark.kmock(cls=kmock.RawHandler)
async def test_an_api_server_that_fails_a_secret_read_is_asked_again_not_blamed_on_the_secret(
        make_relay: RelayFactory, vncauth_xvnc: XvncServer, kmock: kmock.RawHandler,
        tmp_path: Path) -> None:
    """The API server answers the Secret's read with 500: the viewer is refused with 4503 (it
    reconnects by itself), not 4424 (final: the credential is wrong or unreadable), and the
    target's login outcome is not marked; once the API answers, the console opens."""
    secret = {"apiVersion": "v1", "kind": "Secret", "type": CREDENTIALS_TYPE,
              "metadata": {"name": "desk-vnc", "namespace": "lab"},
              "data": {"password": base64.b64encode(PASSWORD.encode()).decode()}}
    answering = [False]

    def read() -> dict[str, Any]:
        if not answering[0]:
            raise RuntimeError("etcd is away")  # the API server's 500
        return secret

    kmock["get /api/v1/namespaces/lab/secrets/desk-vnc"] << read
    route = Route("lab", "desk", "127.0.0.1", vncauth_xvnc.port,
                  credentials=Credentials(secret_name="desk-vnc"))
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", str(kmock.url))
    async with make_relay(routes=[route], kubeconfig=kubeconfig) as relay:
        code, reason = await close_of(relay.public_url, "desk")
        assert code == closecodes.UNAVAILABLE, (code, reason)
        assert reason.startswith("try again in a moment: reading Secret lab/desk-vnc failed: "
                                 "HTTP 500"), reason
        assert "lab/desk" not in relay.state.logins.outcomes
        answering[0] = True
        async with aiohttp.ClientSession() as http, http.ws_connect(
                f"{relay.public_url}/t/lab/desk/websockify", protocols=("binary",)) as ws:
            await viewer_handshake(ws)
        assert relay.state.logins.outcomes["lab/desk"].result == LOGIN_OK


async def test_an_api_server_out_of_reach_refuses_a_secret_route_with_4503(
        make_relay: RelayFactory, vncauth_xvnc: XvncServer, tmp_path: Path) -> None:
    route = Route("lab", "desk", "127.0.0.1", vncauth_xvnc.port,
                  credentials=Credentials(secret_name="desk-vnc"))
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:9")
    async with make_relay(routes=[route], kubeconfig=kubeconfig) as relay:
        code, reason = await close_of(relay.public_url, "desk")
    assert code == closecodes.UNAVAILABLE, (code, reason)
    assert reason.startswith("try again in a moment: the Kubernetes API cannot be reached"), reason
