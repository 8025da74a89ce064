"""The WebSocket-to-VNC bridge: one `Session` per viewer connection.

A session dials the route's VNC server on demand, insists on the RFB greeting, then runs two
pumps: server -> browser and browser -> server. Each pump awaits its peer's drain, so a slow side
slows the other and memory per session stays bounded by the chunk size and the transports' high
water marks. The first pump to finish ends the session; `run`'s `finally` closes both sides.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from aiohttp import WebSocketError, WSMsgType, web

from relay import closecodes
from relay.auth import address_in
from relay.metrics import RelayMetrics
from relay.model import Route
from relay.rfb import GREETING_LENGTH, parse_greeting
from relay.rfbfilter import ClientFilter, FilterError
from relay.settings import RelaySettings

log = logging.getLogger("vncgate.session")

# How long a closing handshake may take before the relay drops the connection: a browser that
# stopped reading must not hold a session (and its memory) open.
CLOSE_TIMEOUT = 2.0

_HEADER_SHORT, _HEADER_16, _HEADER_64 = (struct.Struct(f).pack for f in ("!BB", "!BBH", "!BBQ"))


def binary_frame_header(length: int) -> bytes:
    """The header of a final, unmasked, binary WebSocket frame (RFC 6455 section 5.2)."""
    if length < 126:
        return _HEADER_SHORT(0x82, length)
    if length < 65536:
        return _HEADER_16(0x82, 126, length)
    return _HEADER_64(0x82, 127, length)


class SessionRefused(Exception):
    """The VNC side could not be set up; carries the close code and a reason for the user."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(eq=False, slots=True)
class Session:
    route: Route
    ws: web.WebSocketResponse
    client: str
    settings: RelaySettings
    metrics: RelayMetrics
    user: str = ""
    view_only: bool = False
    # The route's idle timeout applies to sessions that may type (watchers hold nothing).
    idle_timeout: int | None = None
    max_duration: int | None = None
    session_id: str = field(default_factory=lambda: secrets.token_hex(8))
    started: float = field(default_factory=time.monotonic)
    started_at: float = field(default_factory=time.time)
    to_server: int = 0
    to_client: int = 0
    server_version: str = ""
    code: int | None = None
    reason: str = ""
    _pumps: tuple[asyncio.Task[None], ...] = ()
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    # Parses the viewer's RFB messages; only for view-only sessions and idle timeouts.
    filter: ClientFilter | None = None
    # The WebSocket's HTTP request: server -> browser frames go to its transport directly.
    request: web.BaseRequest | None = None
    _timers: list[asyncio.TimerHandle] = field(default_factory=list)

    def stop(self, code: int, reason: str) -> None:
        """End the session from outside (shutdown, route removed); the first reason wins."""
        if self.code is None:
            self.code, self.reason = code, reason
        for pump in self._pumps:
            pump.cancel()

    async def run(self) -> None:
        writer: asyncio.StreamWriter | None = None
        if self.view_only or self.idle_timeout:
            self.filter = ClientFilter(view_only=self.view_only)
        loop = asyncio.get_running_loop()
        if self.max_duration:
            self._timers.append(loop.call_later(
                self.max_duration, self.stop, closecodes.IDLE_TIMEOUT,
                f"the session reached its longest allowed time ({_duration(self.max_duration)})"))
        if self.idle_timeout:
            self._timers.append(loop.call_later(self.idle_timeout, self._check_idle))
        try:
            reader, writer, greeting = await self._connect()
            if self.code is None:  # not stopped while connecting
                await self.ws.send_bytes(greeting)
                self.to_client += len(greeting)
                await self._pump(reader, writer)
        except SessionRefused as refused:
            self._finish(refused.code, refused.reason)
        except ConnectionError:  # sending the greeting: connect errors are SessionRefused
            self._finish(closecodes.ABNORMAL, "the viewer's connection was lost")
        except Exception:
            log.exception("session %s failed", self.route.key)
            self._finish(closecodes.INTERNAL_ERROR, "internal error in the relay; see its log")
        finally:
            for timer in self._timers:
                timer.cancel()
            if writer is not None:
                writer.transport.abort()  # nothing useful is left to flush to the server
            self.upstream = None
            await self._close_ws()
            self.metrics.bytes_relayed.labels("to_server").inc(self.to_server)
            self.metrics.bytes_relayed.labels("to_client").inc(self.to_client)

    def _check_idle(self) -> None:
        """Runs at most once per idle timeout: O(1) per session, no per-message timer work."""
        if self.idle_timeout is None or self.filter is None:
            return
        idle_for = time.monotonic() - self.filter.last_input
        if idle_for >= self.idle_timeout:
            self.stop(closecodes.IDLE_TIMEOUT,
                      f"no keyboard or mouse input for {_duration(self.idle_timeout)}; "
                      "the console was freed")
        else:
            self._timers.append(asyncio.get_running_loop().call_later(
                self.idle_timeout - idle_for, self._check_idle))

    def _finish(self, code: int, reason: str) -> None:
        if self.code is None:
            self.code, self.reason = code, reason

    async def _allowed_address(self) -> str:
        """Resolve the route's host and refuse if any address is in a denied range.

        The operator judges a DNS name as written; what it resolves to is known only here, at
        dial time (a name can be rebound to a metadata or loopback address). The relay then
        dials the address it checked, not the name again.
        """
        infos = await asyncio.get_running_loop().getaddrinfo(
            self.route.host, self.route.port, type=socket.SOCK_STREAM)
        addresses = [str(info[4][0]) for info in infos]
        for address in addresses:
            if address_in(address, self.settings.deny_networks):
                raise SessionRefused(
                    closecodes.FORBIDDEN,
                    f"{self.route.key} resolves to {address}, which this relay may not reach")
        return addresses[0]

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
        route, started = self.route, time.monotonic()
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                host = await self._allowed_address() if self.settings.deny_networks \
                    else route.host
                reader, writer = await asyncio.open_connection(
                    host, route.port, limit=self.settings.read_chunk)
                try:
                    greeting = await reader.readexactly(GREETING_LENGTH)
                except BaseException:
                    writer.transport.abort()
                    raise
        except TimeoutError:
            raise SessionRefused(
                closecodes.UPSTREAM_TIMEOUT,
                f"the VNC server of {route.key} did not answer within "
                f"{self.settings.connect_timeout:g}s; is it running?") from None
        except ConnectionRefusedError:
            raise SessionRefused(
                closecodes.BAD_UPSTREAM,
                f"the VNC server of {route.key} refused the connection; is it running?") from None
        except socket.gaierror:
            raise SessionRefused(
                closecodes.BAD_UPSTREAM,
                f"the host of {route.key} cannot be resolved; check its endpoint") from None
        except asyncio.IncompleteReadError:
            raise SessionRefused(
                closecodes.BAD_UPSTREAM,
                f"the server of {route.key} closed the connection before greeting") from None
        except OSError as exc:
            raise SessionRefused(
                closecodes.BAD_UPSTREAM,
                f"cannot reach the VNC server of {route.key}: {exc.strerror or exc}") from None
        self.metrics.connect_seconds.observe(time.monotonic() - started)
        version = parse_greeting(greeting)
        if version is None:
            writer.transport.abort()
            raise SessionRefused(
                closecodes.BAD_UPSTREAM,
                f"the server of {route.key} is not a VNC server (no RFB greeting)")
        self.server_version = version
        self.upstream = (reader, writer)
        return reader, writer, greeting

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        to_client = asyncio.create_task(self._server_to_client(reader))
        to_server = asyncio.create_task(self._client_to_server(writer))
        self._pumps = (to_client, to_server)
        try:
            await asyncio.wait(self._pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in self._pumps:
                pump.cancel()
            await asyncio.wait(self._pumps)
            self._pumps = ()
        for pump in (to_client, to_server):
            if not pump.cancelled() and (exc := pump.exception()) is not None:
                raise exc

    async def _server_to_client(self, reader: asyncio.StreamReader) -> None:
        read, chunk = reader.read, self.settings.read_chunk
        send: Callable[[bytes], Awaitable[None]] = self.ws.send_bytes
        if self.request is not None:
            send = self._frame_sender(self.request)
        while True:
            try:
                data = await read(chunk)
            except OSError as exc:
                self._finish(closecodes.BAD_UPSTREAM, f"connection to the VNC server lost: {exc}")
                return
            if not data:
                self._finish(closecodes.NORMAL, "the VNC server closed the connection")
                return
            if self.filter is not None and self.filter.needs_server_bytes:
                self.filter.server_data(data)
            try:
                await send(data)  # waits while the browser's transport is over its high water
            except ConnectionError:
                self._finish(closecodes.ABNORMAL, "the viewer's connection was lost")
                return
            self.to_client += len(data)

    def _frame_sender(self, request: web.BaseRequest) -> Callable[[bytes], Awaitable[None]]:
        """`send_bytes` in one write: header and payload together, then the viewer's drain.

        aiohttp writes a payload over 16 KiB apart from its header: two sends per message, the
        costliest line of the server -> browser loop (docs/PERFORMANCE.md has the profile).
        A frame is written whole and synchronously, so aiohttp's own pings and close frame
        never land inside one; after the close frame nothing more is sent.
        """
        transport, drain, ws = request.transport, request.writer.drain, self.ws

        async def send(data: bytes) -> None:
            if transport is None or transport.is_closing() or ws.closed:
                raise ConnectionResetError("Cannot write to closing transport")
            transport.write(binary_frame_header(len(data)) + data)
            await drain()  # waits while the browser's transport is over its high water

        return send

    async def _client_to_server(self, writer: asyncio.StreamWriter) -> None:
        receive, write, drain = self.ws.receive, writer.write, writer.drain
        while True:
            msg = await receive()
            if msg.type is WSMsgType.BINARY:
                data = msg.data
                if self.filter is not None:
                    try:
                        data = self.filter.feed(data)
                    except FilterError as exc:
                        self._finish(closecodes.UNSUPPORTED_DATA, str(exc))
                        return
                try:
                    write(data)
                    await drain()  # waits while the VNC server's transport is over its high water
                except OSError as exc:
                    self._finish(closecodes.BAD_UPSTREAM,
                                 f"connection to the VNC server lost: {exc}")
                    return
                self.to_server += len(data)
            elif msg.type is WSMsgType.TEXT:
                self._finish(closecodes.UNSUPPORTED_DATA,
                             "this relay speaks the binary subprotocol only; update the client")
                return
            elif msg.type is WSMsgType.ERROR:
                # aiohttp has already closed the WebSocket with the error's code (1009 too big).
                error = msg.data
                code = closecodes.PROTOCOL_ERROR
                if isinstance(error, WebSocketError):
                    code = int(error.code)
                self._finish(code, f"WebSocket error: {error}")
                return
            else:  # CLOSE, CLOSING, CLOSED: the browser went away
                peer_code = self.ws.close_code
                self._finish(peer_code if peer_code is not None else closecodes.NO_STATUS,
                             "the viewer closed the connection")
                return

    async def _close_ws(self) -> None:
        code = self.code if self.code is not None else closecodes.INTERNAL_ERROR
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.ws.close(code=code, message=closecodes.clip_reason(self.reason).encode())
        except TimeoutError:
            pass  # aiohttp closed the transport when the timeout cancelled it


def _duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


class Sessions:
    """Every open session of this relay, by target, for limits, shutdown and the table's counts."""

    def __init__(self) -> None:
        self._by_target: dict[str, set[Session]] = {}
        self.count = 0

    def add(self, session: Session) -> None:
        self._by_target.setdefault(session.route.key, set()).add(session)
        self.count += 1

    def remove(self, session: Session) -> None:
        group = self._by_target.get(session.route.key)
        if group is not None and session in group:
            group.discard(session)
            self.count -= 1
            if not group:
                del self._by_target[session.route.key]

    def count_for(self, key: str) -> int:
        group = self._by_target.get(key)
        return len(group) if group else 0

    def for_target(self, key: str) -> list[Session]:
        return list(self._by_target.get(key, ()))

    def find(self, key: str, session_id: str) -> Session | None:
        for session in self._by_target.get(key, ()):
            if session.session_id == session_id:
                return session
        return None

    def __iter__(self) -> Iterator[Session]:
        for group in list(self._by_target.values()):
            yield from list(group)
