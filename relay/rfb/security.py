"""RFB security answered by the relay: it logs in to the VNC server, the browser never sees how.

For a route with `credentials` or `tls`, the relay plays the client's part of RFC 6143 7.1-7.3
toward the server (None, VNC Authentication, VeNCrypt with its TLS and X509 subtypes None, Vnc
and Plain), sends ClientInit (shared) and reads ServerInit. Toward the browser it then plays a
server that offers only security None and hands it that ServerInit. From there on the relay
holds the plaintext RFB stream of both sides, so view-only filtering works for TLS servers too.

The password and username are never logged, never put into a close reason, and never sent to
the browser; a refusal names the target and what to fix.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import WSMsgType, web
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from vncgate.relay import closecodes
from vncgate.relay.rfb.viewerstream import ClientFilter

SEC_INVALID = 0
SEC_NONE = 1
SEC_VNC = 2
SEC_VENCRYPT = 19
# VeNCrypt subtypes (TigerVNC common/rfb/SecurityVeNCrypt, the VeNCrypt specification).
VENCRYPT_PLAIN = 256
TLS_NONE, TLS_VNC, TLS_PLAIN = 257, 258, 259
X509_NONE, X509_VNC, X509_PLAIN = 260, 261, 262
X509_SUBTYPES = (X509_VNC, X509_PLAIN, X509_NONE)
ANON_TLS_SUBTYPES = (TLS_VNC, TLS_PLAIN, TLS_NONE)
PLAIN_SUBTYPES = (X509_PLAIN, TLS_PLAIN, VENCRYPT_PLAIN)

TYPE_NAMES = {
    SEC_NONE: "None", SEC_VNC: "VNC Authentication", 5: "RA2", 6: "RA2ne", 16: "Tight",
    17: "Ultra", 18: "TLS", SEC_VENCRYPT: "VeNCrypt", 20: "SASL", 21: "MD5", 22: "xvp",
    30: "Apple ARD", 113: "MSLogonII", 129: "Unix Login", 130: "RA2 (RSA-AES)",
    VENCRYPT_PLAIN: "VeNCrypt Plain (no TLS)", TLS_NONE: "TLSNone", TLS_VNC: "TLSVnc",
    TLS_PLAIN: "TLSPlain", X509_NONE: "X509None", X509_VNC: "X509Vnc", X509_PLAIN: "X509Plain",
}
_VERSIONS = {b"RFB 003.003\n": 3, b"RFB 003.007\n": 7, b"RFB 003.008\n": 8}
MAX_REASON = 4096  # a server's failure reason; longer is cut, never all read into memory
MAX_NAME = 1 << 16  # the desktop name in ServerInit
RELAY_GREETING = b"RFB 003.008\n"  # the relay toward a viewer of a server it logs in to


class SecurityRefused(Exception):
    """The relay could not log in to the server; `code` and `reason` go to the viewer."""

    def __init__(self, code: int, reason: str, *, credential_refused: bool = False,
                 forbidden: bool = False) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.credential_refused = credential_refused
        # The relay may not read the credential (RBAC said no), as opposed to its absence.
        self.forbidden = forbidden


@dataclass(frozen=True, slots=True)
class UpstreamLogin:
    """What the relay answers the server with; built per session (`relay.credentials`)."""

    password: str | None = None
    username: str | None = None
    # VeNCrypt: a context that verifies the server (CA, or skip) and the name to check.
    tls: ssl.SSLContext | None = None
    server_name: str | None = None
    # insecureSkipVerify: also accept anonymous TLS (TLSNone/TLSVnc), and never send Plain.
    insecure: bool = False

    def __repr__(self) -> str:  # never show the secret, even in a traceback
        return (f"UpstreamLogin(password={'set' if self.password else None}, "
                f"username={'set' if self.username else None}, tls={self.tls is not None})")


def type_name(number: int) -> str:
    return f"{TYPE_NAMES.get(number, 'unknown')} ({number})"


def _reverse_bits(byte: int) -> int:
    return int(f"{byte:08b}"[::-1], 2)


def vnc_auth_response(password: str, challenge: bytes) -> bytes:
    """DES of the 16-byte challenge under the password (RFC 6143 7.2.2).

    The key is the password's first 8 bytes, zero-padded, each byte's bit order reversed (the
    RFB quirk every server shares). DES is TripleDES with the key repeated (K1 = K2 = K3).
    """
    key = bytes(_reverse_bits(b) for b in password.encode("latin-1", "replace")[:8].ljust(8, b"\0"))
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()  # noqa: S305 - RFB's DES
    return encryptor.update(challenge) + encryptor.finalize()


class _Server:
    """The upstream side as streams, with reads that name the step that failed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 target: str) -> None:
        self.reader, self.writer, self.target = reader, writer, target

    async def read(self, n: int, step: str) -> bytes:
        try:
            return await self.reader.readexactly(n)
        except asyncio.IncompleteReadError:
            raise SecurityRefused(
                closecodes.BAD_UPSTREAM,
                f"the VNC server of {self.target} closed the connection during {step}") from None

    async def u8(self, step: str) -> int:
        return (await self.read(1, step))[0]

    async def u32(self, step: str) -> int:
        return int.from_bytes(await self.read(4, step), "big")

    async def reason(self, step: str) -> str:
        length = await self.u32(step)
        text = await self.read(min(length, MAX_REASON), step)
        return text.decode("utf-8", "replace").strip()

    def write(self, data: bytes) -> None:
        self.writer.write(data)


async def login(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, greeting: bytes,
                creds: UpstreamLogin, target: str) -> bytes:
    """Answer the server's security after its `greeting`; return ServerInit (whole).

    On return the writer's transport may be a TLS transport (VeNCrypt). Raises SecurityRefused.
    """
    server = _Server(reader, writer, target)
    server_minor = _VERSIONS.get(greeting)
    if server_minor is None:
        # 3.889 (Apple) and other variants: answer as 3.8 if newer, 3.3 if older (RFC 6143 7.1.1).
        try:
            major, minor = int(greeting[4:7]), int(greeting[8:11])
        except ValueError:
            raise SecurityRefused(closecodes.BAD_UPSTREAM,
                                  f"the server of {target} sent a malformed RFB version") from None
        server_minor = 8 if (major, minor) > (3, 8) else 3
    minor = min(server_minor, 8)
    server.write(b"RFB 003.%03d\n" % minor)
    if minor == 3:
        chosen = await server.u32("security negotiation")
        if chosen == SEC_INVALID:
            reason = await server.reason("security negotiation")
            raise SecurityRefused(closecodes.BAD_UPSTREAM,
                                  f"the VNC server of {target} refused the relay: {reason}")
        offered = [chosen]
    else:
        count = await server.u8("security negotiation")
        if count == 0:
            reason = await server.reason("security negotiation")
            raise SecurityRefused(closecodes.BAD_UPSTREAM,
                                  f"the VNC server of {target} refused the relay: {reason}")
        offered = list(await server.read(count, "security negotiation"))
    chosen = _choose(offered, creds, target)
    if minor != 3:
        server.write(bytes([chosen]))
    authenticated = chosen != SEC_NONE
    if chosen == SEC_VNC:
        await _vnc_auth(server, creds, target)
    elif chosen == SEC_VENCRYPT:
        server = await _vencrypt(server, creds, target)
    if minor == 8 or authenticated:
        result = await server.u32("the security result")
        if result != 0:
            detail = await server.reason("the security result") if minor == 8 else ""
            what = ("refused the stored credential" if authenticated else "refused the relay")
            raise SecurityRefused(
                closecodes.CREDENTIAL_REFUSED if authenticated else closecodes.BAD_UPSTREAM,
                f"the VNC server of {target} {what}"
                + (f" ({detail})" if detail else "")
                + ("; update the target's credentials" if authenticated else ""),
                credential_refused=authenticated)
    server.write(b"\x01")  # ClientInit: shared; the relay's own policy decides exclusivity
    head = await server.read(24, "ServerInit")
    name_length = int.from_bytes(head[20:24], "big")
    if name_length > MAX_NAME:
        raise SecurityRefused(closecodes.BAD_UPSTREAM,
                              f"the VNC server of {target} sent a desktop name too long")
    return head + await server.read(name_length, "ServerInit")


def _choose(offered: list[int], creds: UpstreamLogin, target: str) -> int:
    names = ", ".join(type_name(t) for t in offered)
    if creds.tls is not None:
        if SEC_VENCRYPT in offered:
            return SEC_VENCRYPT
        raise SecurityRefused(
            closecodes.BAD_UPSTREAM,
            f"{target} has tls set but its VNC server offers no VeNCrypt (it offers {names})")
    if creds.password is not None and SEC_VNC in offered:
        return SEC_VNC
    if SEC_NONE in offered:
        return SEC_NONE
    if SEC_VNC in offered:
        raise SecurityRefused(closecodes.BAD_UPSTREAM,
                              f"the VNC server of {target} asks for a password; set "
                              "spec.credentials")
    if SEC_VENCRYPT in offered:
        raise SecurityRefused(closecodes.BAD_UPSTREAM,
                              f"the VNC server of {target} requires VeNCrypt (TLS); set spec.tls")
    raise SecurityRefused(closecodes.BAD_UPSTREAM,
                          f"the VNC server of {target} offers only {names}; the relay speaks "
                          "None, VNC Authentication and VeNCrypt")


async def _vnc_auth(server: _Server, creds: UpstreamLogin, target: str) -> None:
    if not creds.password:
        raise SecurityRefused(closecodes.BAD_UPSTREAM,
                              f"the VNC server of {target} asks for a password and the target's "
                              "credentials hold none")
    challenge = await server.read(16, "VNC authentication")
    server.write(vnc_auth_response(creds.password, challenge))


def _choose_subtype(offered: list[int], creds: UpstreamLogin, target: str) -> int:
    names = ", ".join(type_name(t) for t in offered) or "none"
    # A username in the credentials asks for Plain (user and password), else Vnc, else None.
    order = ((X509_PLAIN, X509_VNC, X509_NONE) if creds.username
             else (X509_VNC, X509_PLAIN, X509_NONE))
    preference: list[int] = list(order)
    if creds.insecure:
        preference += [{X509_PLAIN: TLS_PLAIN, X509_VNC: TLS_VNC, X509_NONE: TLS_NONE}[t]
                       for t in order]
    for subtype in preference:
        if subtype not in offered:
            continue
        # Plain sends the password itself: only to a server whose certificate was verified.
        # Under insecureSkipVerify anyone on the path (or whoever wrote the target's address)
        # could be that server.
        if subtype in PLAIN_SUBTYPES and (creds.insecure or not (creds.username and
                                                                 creds.password)):
            continue
        if subtype in (X509_VNC, TLS_VNC) and not creds.password:
            continue
        return subtype
    if creds.insecure and any(t in offered for t in PLAIN_SUBTYPES):
        raise SecurityRefused(
            closecodes.BAD_UPSTREAM,
            "Plain sends the password itself, so only to a verified server, never under "
            f"insecureSkipVerify: set tls.caSecret or caConfigMap ({target} offers {names})")
    if not creds.insecure and any(t in offered for t in ANON_TLS_SUBTYPES):
        raise SecurityRefused(
            closecodes.BAD_UPSTREAM,
            f"the VNC server of {target} offers only anonymous TLS ({names}), which cannot prove "
            "the server's identity; set tls.insecureSkipVerify: true to accept it")
    raise SecurityRefused(
        closecodes.BAD_UPSTREAM,
        f"the VNC server of {target} offers VeNCrypt subtypes {names}; none fits the target's "
        "credentials (Plain needs a username and a password, Vnc a password; VeNCrypt Plain "
        "without TLS is never used)")


def anonymous_tls_context() -> ssl.SSLContext:
    """TLS without certificates (VeNCrypt TLSNone/TLSVnc/TLSPlain): anonymous Diffie-Hellman."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # anonymous suites exist up to TLS 1.2
    context.set_ciphers("aNULL:!eNULL:@SECLEVEL=0")
    return context


async def _vencrypt(server: _Server, creds: UpstreamLogin, target: str) -> _Server:
    major, minor = await server.read(2, "VeNCrypt negotiation")
    if (major, minor) < (0, 2):
        raise SecurityRefused(closecodes.BAD_UPSTREAM,
                              f"the VNC server of {target} speaks VeNCrypt {major}.{minor}; "
                              "the relay needs 0.2")
    server.write(b"\x00\x02")
    if await server.u8("VeNCrypt negotiation") != 0:
        raise SecurityRefused(closecodes.BAD_UPSTREAM,
                              f"the VNC server of {target} refused VeNCrypt version 0.2")
    count = await server.u8("VeNCrypt negotiation")
    raw = await server.read(4 * count, "VeNCrypt negotiation")
    offered = [int.from_bytes(raw[i:i + 4], "big") for i in range(0, len(raw), 4)]
    subtype = _choose_subtype(offered, creds, target)
    server.write(struct.pack("!I", subtype))
    if await server.u8("VeNCrypt negotiation") != 1:
        raise SecurityRefused(closecodes.BAD_UPSTREAM,
                              f"the VNC server of {target} refused VeNCrypt {type_name(subtype)}")
    assert creds.tls is not None
    anonymous = subtype in ANON_TLS_SUBTYPES
    context = anonymous_tls_context() if anonymous else creds.tls
    server_name = None if anonymous else creds.server_name
    try:
        await server.writer.start_tls(context, server_hostname=server_name)
    except ssl.SSLCertVerificationError as exc:
        raise SecurityRefused(
            closecodes.BAD_UPSTREAM,
            f"the TLS certificate of {target}'s VNC server is not trusted "
            f"({exc.verify_message}); check tls.ca and tls.serverName") from None
    except (ssl.SSLError, ConnectionError) as exc:
        raise SecurityRefused(closecodes.BAD_UPSTREAM,
                              f"TLS with the VNC server of {target} failed: "
                              f"{getattr(exc, 'reason', None) or exc}") from None
    except TypeError as exc:  # asyncio takes no transport of ours (relay/internals.py)
        if "start_tls" not in str(exc):
            raise
        raise SecurityRefused(closecodes.BAD_UPSTREAM,
                              f"this relay's Python cannot start TLS inside the connection to "
                              f"{target} (asyncio refused the transport); use a relay image "
                              "built from constraints.txt") from None
    if subtype in (X509_VNC, TLS_VNC):
        await _vnc_auth(server, creds, target)
    elif subtype in (X509_PLAIN, TLS_PLAIN):
        user = (creds.username or "").encode()
        password = (creds.password or "").encode()
        server.write(struct.pack("!II", len(user), len(password)) + user + password)
    return server


# --- the browser's side: a server that offers only None ---------------------------------------


class _Browser:
    """Bytes from the viewer's WebSocket, whatever the message boundaries."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.buffer = bytearray()

    async def read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            msg = await self.ws.receive()
            if msg.type is not WSMsgType.BINARY:
                raise SecurityRefused(closecodes.NO_STATUS if msg.type in (
                    WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED)
                    else closecodes.UNSUPPORTED_DATA,
                    "the viewer left during the handshake")
            self.buffer += msg.data
        part, self.buffer = bytes(self.buffer[:n]), self.buffer[n:]
        return part


@dataclass(frozen=True, slots=True)
class BrowserHandshake:
    """What the viewer sent in the None handshake the relay played toward it."""

    viewer: bytes  # its version, its choice of security (3.7, 3.8) and its ClientInit
    rest: bytes  # what it sent after ClientInit (normally nothing), through the filter


async def serve_browser(ws: web.WebSocketResponse, server_init: bytes,
                        client_filter: ClientFilter | None) -> BrowserHandshake:
    """Be the server toward the viewer: RFB 3.8, security None, then the real ServerInit.

    The bytes the viewer sent after its ClientInit are for the server. The view-only filter
    sees the same handshake, so it starts at the first message; a recording is given it too
    (the viewer's part here, the relay's part is fixed: relay/recording/capture.py).
    """
    greeting = RELAY_GREETING
    if client_filter is not None:
        client_filter.server_greeting(greeting)
    browser = _Browser(ws)
    await ws.send_bytes(greeting)
    version = await browser.read(12)
    minor = _VERSIONS.get(version)
    if minor is None:
        raise SecurityRefused(closecodes.UNSUPPORTED_DATA,
                              "the viewer answered with an unknown RFB version")
    seen = bytearray(version)
    if minor == 3:
        await ws.send_bytes(struct.pack("!I", SEC_NONE))
        if client_filter is not None:
            client_filter.server_data(struct.pack("!I", SEC_NONE))
    else:
        await ws.send_bytes(bytes([1, SEC_NONE]))
        choice = await browser.read(1)
        seen += choice
        if choice[0] != SEC_NONE:
            raise SecurityRefused(closecodes.UNSUPPORTED_DATA,
                                  "the viewer chose a security type the relay did not offer")
        if minor == 8:
            await ws.send_bytes(b"\x00\x00\x00\x00")
    seen += await browser.read(1)  # ClientInit; the relay asked the server for a shared session
    await ws.send_bytes(server_init)
    rest = bytes(browser.buffer)
    if client_filter is not None:
        client_filter.feed(bytes(seen))  # the handshake: passes whole, moves it to messages
        rest = client_filter.feed(rest) if rest else rest
    return BrowserHandshake(bytes(seen), rest)


@dataclass(slots=True)
class LoggedIn:
    """A server connection past ServerInit, ready to relay."""

    transport: asyncio.Transport
    greeting: bytes
    server_init: bytes
    leftover: bytes  # read past ServerInit (servers normally send nothing until asked)
    # Held for the session's life: a StreamWriter that is collected closes its transport.
    writer: asyncio.StreamWriter


Dial = Callable[[Callable[[], asyncio.BaseProtocol]], Awaitable[asyncio.BaseTransport]]


async def open_stream(dial: Dial) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """`asyncio.open_connection` over any dialer: a TCP connection or a KubeVirt console."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2 ** 16, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport = await dial(lambda: protocol)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)  # type: ignore[arg-type]


async def open_logged_in(dial: Dial, creds: UpstreamLogin, target: str,
                         limit: float) -> LoggedIn:
    """Dial, check the greeting, log in, read ServerInit, all within `limit` seconds."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(limit):
            reader, writer = await open_stream(dial)
            greeting = await reader.readexactly(12)
            if not greeting.startswith(b"RFB ") or not greeting.endswith(b"\n"):
                raise SecurityRefused(closecodes.BAD_UPSTREAM,
                                      f"the server of {target} is not a VNC server "
                                      "(no RFB greeting)")
            server_init = await login(reader, writer, greeting, creds, target)
    except TimeoutError:
        _close(writer)
        raise SecurityRefused(closecodes.UPSTREAM_TIMEOUT,
                              f"the VNC server of {target} did not complete the login within "
                              f"{limit:g}s") from None
    except asyncio.IncompleteReadError:
        _close(writer)
        raise SecurityRefused(closecodes.BAD_UPSTREAM, f"the server of {target} closed the "
                                                       "connection before greeting") from None
    except ConnectionRefusedError:
        raise SecurityRefused(closecodes.BAD_UPSTREAM,
                              f"the VNC server of {target} refused the connection; is it "
                              "running?") from None
    except OSError as exc:
        _close(writer)
        raise SecurityRefused(closecodes.BAD_UPSTREAM,
                              f"cannot reach the VNC server of {target}: "
                              f"{exc.strerror or exc}") from None
    except BaseException:
        _close(writer)
        raise
    transport = writer.transport
    # Bytes the stream already read past ServerInit (a private attribute: streams offer no
    # peek, and waiting for more could block on a server that rightly says nothing).
    leftover = bytes(getattr(reader, "_buffer", b""))
    return LoggedIn(transport=transport, greeting=greeting,  # type: ignore[arg-type]
                    server_init=server_init, leftover=leftover, writer=writer)


def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        writer.transport.abort()
