"""The RFB probe: is there a VNC server at this host and port, and will it let a viewer in?

In RFB the server speaks first, with a 12-byte `RFB xxx.yyy\\n`. Reading it proves more than a
TCP connect (a web server or a database on the port fails it), but a probe that stops there is
not harmless: VNC servers that lock out an address count such connections.

- TigerVNC (1.12 to master, `common/rfb/Blacklist.cxx`) counts every accepted connection from an
  address as a mark, however it ends, and clears the marks only when a connection from that
  address authenticates (`VNCServerST::queryConnection`). With the defaults
  (`-BlacklistThreshold 5 -BlacklistTimeout 10`), five greeting-only probes blacklist the address
  and the server answers everyone from it with `RFB 003.003`, security type 0 and "Too many
  security failures", so viewers coming through a relay that shares the operator's source
  address (SNAT to the node's address) are refused too. Hanging up before choosing a security
  type does not help: the mark is taken on accept.
- libvncserver keeps no per-address count; it logs "client gone" for a connection that ends
  before choosing a security type, and most BMCs and other servers count only failed password
  checks.

So the probe completes the handshake as far as it can without a password and hangs up before
ClientInit (which is where a viewer would ask for a shared or exclusive session, so the probe
never disconnects anyone): it answers the server's version; when the server offers security
type None, it chooses None (RFB 3.8 then sends SecurityResult OK), which is a successful login
and clears TigerVNC's marks for this address; otherwise it hangs up before choosing a type
(reason SecurityTypesRead). Measured against Xvnc 1.12 at its defaults
(tests/operator/test_probes.py): a TCP connect alone, the greeting, the security types, each
left without a login, is one mark, and the sixth such connection in a row is refused; only a
successful login clears them. So a server that asks for a password is probed once per endpoint
(the operator keeps the verdict, see `SECURITY_TYPES_READ`): with no login possible, the only
probe that cannot lock a console out is one not made. A refusal (no security types, or a
failed SecurityResult, with the server's reason) is a verdict of its own: "Blacklisted" when the
server says it is blocking this address, "ServerRefused" otherwise; never Ready.

The probe reads into its own buffer (an asyncio Protocol, not a StreamReader): TigerVNC sends its
refusal and resets the connection at once, and a StreamReader raises the reset before handing
out the bytes that arrived ahead of it.
"""

from __future__ import annotations

import asyncio
import random
import re
import socket
import struct
from dataclasses import dataclass

from vncgate.common.addresses import host_port
from vncgate.common.rfb import parse_version

SECURITY_NONE = 1
# The Reachable reason of a server that asks for a password. The operator probes such a server
# once per endpoint (runtime.Runtime.evaluate_target): every connection that does not log in
# counts towards TigerVNC's blacklist, however it ends.
SECURITY_TYPES_READ = "SecurityTypesRead"
PROBED_ONCE = ("Not probed again while the endpoint stays the same: a connection that does not "
               "log in counts as a failed login on TigerVNC and BMCs (5 lock the address out), "
               "so open sessions and the relays' logins show its state from now on")
# The longest refusal reason the probe reads (a status message, not a document).
REASON_LIMIT = 512
# The most bytes the probe buffers before it stops reading (the handshake needs fewer than 300).
BUFFER_LIMIT = 4096
# The refusals that mean "this address is blocked" rather than "you may not": TigerVNC's "Too many
# security failures", libvncserver-based and other servers' "too many authentication failures",
# RealVNC's "... blacklisted" / "... try again later", BMCs' "locked" / "blocked".
_BLOCKED_RE = re.compile(r"too many|blacklist|black-list|blocked|lock(ed)? ?out|locked|"
                         r"try again later", re.IGNORECASE)
_SECURITY_NAMES = {1: "None", 2: "VncAuth", 5: "RA2", 6: "RA2ne", 16: "Tight", 18: "TLS",
                   19: "VeNCrypt", 22: "XVP", 30: "Apple", 113: "MSLogon", 129: "Unix Login"}


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    reason: str  # CamelCase, for the Reachable condition
    message: str
    server_version: str | None = None
    # The server refused this address as blocked (a lock-out after failed or unauthenticated
    # connections): the target is Unreachable, and a scheduler should probe it less, not more.
    blocked: bool = False
    # The probe logged in (security type None): the servers that count unauthenticated
    # connections counted none for this probe, and TigerVNC cleared its marks for the address.
    logged_in: bool = False
    security_types: tuple[int, ...] = ()


def proven_by_sessions(sessions: int, server_version: str | None) -> ProbeResult:
    """Reachable without a probe: `sessions` open through the relays reached the server (a
    probe would cost a connection, which some servers count as a failed login)."""
    return ProbeResult(True, "LiveSession",
                       f"{sessions} session{'s' if sessions != 1 else ''} open through the relays",
                       server_version)


class _HandshakeClosed(Exception):
    def __init__(self, received: int, error: BaseException | None) -> None:
        super().__init__(received, error)
        self.received = received
        self.error = error


class _Reader(asyncio.Protocol):
    """Buffers what the server sends; a read sees every byte that arrived before a close."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._data = bytearray()
        self._received = 0
        self._closed = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._data += data
        if len(self._data) > BUFFER_LIMIT and self.transport is not None:
            self.transport.pause_reading()  # a server that floods the probe is not read further
        self._wake()

    def eof_received(self) -> bool:
        self._closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self, n: int) -> bytes:
        while len(self._data) < n:
            if self._closed:
                raise _HandshakeClosed(self._received + len(self._data), self._error)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        out = bytes(self._data[:n])
        del self._data[:n]
        self._received += n
        return out

    async def read_u32(self) -> int:
        value: int = struct.unpack("!I", await self.read(4))[0]
        return value

    async def read_reason(self) -> str:
        length = await self.read_u32()
        raw = await self.read(min(length, REASON_LIMIT))
        return printable(raw.decode("utf-8", "replace"))

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


def printable(text: str) -> str:
    """A server's words made safe for a status message: no control characters, one line."""
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text)
    return " ".join(cleaned.split())


def security_names(types: tuple[int, ...]) -> str:
    return ", ".join(f"{_SECURITY_NAMES.get(t, 'type')}({t})" for t in types) or "none"


def client_version(major: int, minor: int) -> bytes:
    """The version the probe answers: the highest of 3.3, 3.7 and 3.8 the server accepts."""
    if major > 3 or minor >= 8:
        return b"RFB 003.008\n"
    return b"RFB 003.007\n" if minor == 7 else b"RFB 003.003\n"


def refusal(where: str, reason: str) -> ProbeResult:
    """The verdict on a server that refused the probe with `reason`, in its own words."""
    said = f"the server says {reason!r}" if reason else "the server gave no reason"
    if _BLOCKED_RE.search(reason):
        return ProbeResult(
            False, "Blacklisted",
            f"{where} is blocking connections from this address ({said}), after too many "
            "connections that did not log in, so viewers coming from the same address are "
            "refused too. It lifts after the server's lock-out time or a successful login from "
            "this address; look for clients connecting with a wrong password, and on TigerVNC "
            "see -BlacklistThreshold and -BlacklistTimeout",
            blocked=True)
    return ProbeResult(False, "ServerRefused",
                       f"{where} refused the connection during the RFB handshake ({said})")


async def _handshake(reader: _Reader, where: str, timeout: float) -> ProbeResult:  # noqa: ASYNC109
    """From the greeting to the point where the probe hangs up; see the module's docstring."""
    try:
        async with asyncio.timeout(timeout):
            greeting = await reader.read(12)
    except TimeoutError:
        return ProbeResult(False, "NoGreeting",
                           f"{where} accepted the connection but sent no RFB greeting within "
                           f"{timeout:g}s: it is probably not a VNC server")
    except _HandshakeClosed as exc:
        return ProbeResult(False, "ConnectionClosed",
                           f"{where} closed the connection after {exc.received} bytes instead "
                           "of an RFB greeting (too many clients, or not VNC)")
    parsed = parse_version(greeting)
    if parsed is None:
        return ProbeResult(False, "NotVNC",
                           f"{where} answered {greeting!r}, not an RFB greeting: this port is "
                           "not a VNC server")
    version = greeting.decode("ascii").strip()
    major, minor = parsed
    answer = client_version(major, minor)
    reader.write(answer)
    try:
        async with asyncio.timeout(timeout):
            if answer == b"RFB 003.003\n":
                chosen = await reader.read_u32()  # 3.3: the server chooses
                if chosen == 0:
                    return refusal(where, await reader.read_reason())
                types: tuple[int, ...] = (chosen,)
                # With None there is nothing more to say: the server has logged the probe in.
                logged_in = chosen == SECURITY_NONE
            else:
                count = (await reader.read(1))[0]
                if count == 0:
                    return refusal(where, await reader.read_reason())
                types = tuple(await reader.read(count))
                logged_in = False
                if SECURITY_NONE in types:
                    reader.write(bytes([SECURITY_NONE]))
                    # (3.7 sends no SecurityResult for None; 3.8 does, with a reason on failure.)
                    if answer == b"RFB 003.008\n" and await reader.read_u32() != 0:
                        return refusal(where, await reader.read_reason())
                    logged_in = True
    except TimeoutError:
        return ProbeResult(False, "HandshakeTimeout",
                           f"{where} answered {version} but then stalled in the RFB handshake "
                           f"for {timeout:g}s: the server is hung or overloaded")
    except _HandshakeClosed as exc:
        return ProbeResult(False, "ConnectionClosed",
                           f"{where} answered {version} but closed the connection during the "
                           f"RFB handshake" + (f": {exc.error}" if exc.error else "")
                           + " (a server that allows only one client, or one that refuses "
                             "this address)")
    if logged_in:
        return ProbeResult(True, "RFBGreeting",
                           f"{where} answered {version} and lets viewers in without a password "
                           "(probed: greeting read, security type None chosen, left before "
                           "ClientInit)", version, logged_in=True, security_types=types)
    return ProbeResult(True, SECURITY_TYPES_READ,
                       f"{where} answered {version} and asks for authentication "
                       f"({security_names(types)}) (probed: greeting and security types read, "
                       f"no login attempted). {PROBED_ONCE}", version, security_types=types)


async def probe_rfb(host: str, port: int, timeout: float) -> ProbeResult:  # noqa: ASYNC109
    # (A timeout per phase, connect, greeting and handshake, so that the reason names the phase.)
    """Connect, shake hands up to ClientInit, hang up; every failure becomes a verdict."""
    where = host_port(host, port)
    loop = asyncio.get_running_loop()
    reader: _Reader | None = None
    try:
        try:
            async with asyncio.timeout(timeout):
                _, reader = await loop.create_connection(_Reader, host, port)
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
        return await _handshake(reader, where, timeout)
    finally:
        if reader is not None and reader.transport is not None:
            reader.transport.close()


def next_probe_delay(interval: float, first: bool, rng: random.Random) -> float:
    """Seconds until a target's next probe, jittered so that probes spread over the interval.

    The first wait is anywhere in the interval: after an operator restart every target starts
    at once, and without this they would all probe in the same second.
    """
    if first:
        return rng.uniform(0.0, interval)
    return interval * rng.uniform(0.8, 1.2)
