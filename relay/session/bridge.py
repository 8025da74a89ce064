"""The WebSocket-to-VNC bridge: one `Session` per viewer connection.

A session dials the route's VNC server on demand and insists on the RFB greeting. Then bytes
flow both ways with back-pressure: server -> browser, each chunk the kernel delivers is written
to the browser as one frame, and reading from the server pauses while the browser's transport
is over its high-water mark; browser -> server, each binary message aiohttp's reader parses is
written to the server in the same callback while the server keeps up (`viewer_data`), and the
session's pump takes the rest: control frames, endings, and the waits for the server's drain
(aiohttp's WebSocket queue pauses reading from the browser meanwhile). Memory per session stays
bounded by one read, aiohttp's queue limit and the transports' high-water marks. Whichever side ends
first ends the session; `run`'s `finally` closes both.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

from aiohttp import WebSocketError, WSMessage, WSMsgType, web

from vncgate.common.model import Route
from vncgate.common.reach import ReachDenied
from vncgate.common.rfb import GREETING_LENGTH, parse_greeting
from vncgate.relay import closecodes
from vncgate.relay.access.proxies import UNSPECIFIED_NETWORKS, address_in
from vncgate.relay.internals import (
    WAKE,
    DirectQueue,
    ViewerLink,
    gate_refusal,
    viewer_input,
    viewer_link,
)
from vncgate.relay.metrics import RelayMetrics
from vncgate.relay.recording.service import SessionRecorder
from vncgate.relay.rfb import security as rfbsecurity
from vncgate.relay.rfb.security import Dial
from vncgate.relay.rfb.viewerstream import ClientFilter, FilterError
from vncgate.relay.session.health import TargetHealth
from vncgate.relay.session.serversecrets import CredentialStore
from vncgate.relay.session.vmconsole import DialRefused, KubeVirtDialer
from vncgate.relay.settings import RelaySettings

log = logging.getLogger("vncgate.session")

# How long a closing handshake may take before the relay drops the connection: a browser that
# stopped reading must not hold a session (and its memory) open.
CLOSE_TIMEOUT = 2.0
BROWSER_HIGH_WATER = 512 * 1024
# While the VNC server is not reading, how often to check that the browser is still there.
VIEWER_PROBE = 1.0
_TCP_ESTABLISHED = 1  # tcp_info.tcpi_state (Linux include/net/tcp_states.h)
_READ_BUFFER = memoryview(bytearray(64 * 1024))


class SessionRefused(Exception):
    """The VNC side could not be set up; carries the close code and a reason for the user."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Upstream(asyncio.BufferedProtocol):
    """The VNC server's side of a session, as a bare protocol: no stream buffer, no task.

    Until the 12-byte greeting is complete it collects bytes for `greeted`; after that every
    chunk the kernel hands over goes straight to the session, which writes it to the browser as
    one frame. Writes to the server wait in `drain` while the transport is over its high water.

    Reads land in one 64 KiB buffer shared by every session of the process: each chunk is
    copied out into its frame before the next read can happen (the event loop runs one callback
    at a time), so sessions hold no read buffer, and no read allocates. (asyncio's plain
    Protocol reads 256 KiB at a time into a new bytes object: above glibc's mmap threshold,
    every read was an mmap and munmap, and the relay spent twice the CPU per GiB.)
    """

    __slots__ = ("_drain_waiter", "_greeting", "_held", "_session", "_write_paused",
                 "closed", "greeted", "transport")

    def __init__(self, session: Session) -> None:
        loop = asyncio.get_running_loop()
        self._session = session
        self._greeting = bytearray()
        self._held: list[bytes] | None = []  # bytes after the greeting, before relaying
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None
        self.greeted: asyncio.Future[bytes] = loop.create_future()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not subclass asyncio.Transport, hence no isinstance).
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(_READ_BUFFER[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if not self.greeted.done():
            missing = GREETING_LENGTH - len(self._greeting)
            self._greeting += data[:missing]
            data = data[missing:]
            if len(self._greeting) == GREETING_LENGTH:
                self.greeted.set_result(bytes(self._greeting))
            if not data:
                return
        if self._held is not None:
            # The server spoke before the greeting reached the browser: hold it (at most one
            # read) and stop reading until the session starts relaying.
            self._held.append(bytes(data))
            assert self.transport is not None
            self.transport.pause_reading()
            return
        self._session.server_data(data)

    def start_relaying(self) -> None:
        held, self._held = self._held or [], None
        for data in held:
            self._session.server_data(data)
        if held and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        self._lost(None)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)

    def _lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.greeted.done():
            self.greeted.set_exception(exc or asyncio.IncompleteReadError(
                bytes(self._greeting), GREETING_LENGTH))
        self._wake_writer()
        if self.greeted.done() and not self.greeted.cancelled():
            self._session.server_closed(exc)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writer()

    def _wake_writer(self) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def write_paused(self) -> bool:
        return self._write_paused

    def drained(self) -> asyncio.Future[None]:
        """A future done once the server has taken the bytes over the high-water mark (or the
        connection ended: check `closed` after it)."""
        waiter = self._drain_waiter
        if waiter is None or waiter.done():
            waiter = self._drain_waiter = asyncio.get_running_loop().create_future()
            if self.closed or not self._write_paused:
                waiter.set_result(None)
        return waiter

    def buffered(self) -> int:
        """Bytes this side holds in the relay: held after the greeting, and unsent to the server."""
        held = sum(len(d) for d in self._held) if self._held else 0
        return held + (self.transport.get_write_buffer_size() if self.transport else 0)


# Renews an expiring credential (an OpenID sign-in with a refresh token): its new expiry, or
# the code and reason to end the session with (refused, or no longer allowed this console).
Renew = Callable[[], Awaitable["float | tuple[int, str]"]]


class Phase(enum.Enum):
    """Where a session is in its life; every ending goes RELAYING -> CLOSING -> CLOSED."""

    CONNECTING = "connecting"
    RELAYING = "relaying"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(eq=False, slots=True)
class Session:
    """One viewer's connection to one VNC server.

    One task per session, aiohttp's request handler: it connects, then pumps browser -> server.
    Server -> browser needs none: `Upstream` hands each chunk to `server_data`, which writes it
    to the browser's transport at once, and pauses reading from the server while the browser's
    transport is over its high-water mark. Nor, while the server keeps up, do the browser's
    binary messages: aiohttp's reader hands them to `viewer_data` as it parses them, and the
    pump only waits (relay/internals.py, DirectQueue).

    Every ending goes through `stop` (or `_finish` + return inside the pump): the first code and
    reason are kept, the server's transport is aborted, and the handler task is cancelled out of
    whatever it awaits (connecting, the browser's next message, the server's drain), so no wait
    depends on a peer that has stopped reading. `run`'s `finally` then closes the WebSocket with
    the code, bounded in time, and aborts the browser's transport if a close cannot reach it.
    Endings: either side closes, resets or errs; a side accepts nothing for `stall_timeout`;
    the browser misses its heartbeat; the idle timeout or longest duration; a takeover; the
    route changed or was removed; shutdown.
    """

    route: Route
    ws: web.WebSocketResponse
    client: str
    settings: RelaySettings
    metrics: RelayMetrics
    # The WebSocket's HTTP request: server -> browser frames go to its transport directly.
    request: web.BaseRequest
    user: str = ""
    view_only: bool = False
    # The route's idle timeout applies to sessions that may type (watchers hold nothing).
    idle_timeout: int | None = None
    max_duration: int | None = None
    session_id: str = field(default_factory=lambda: secrets.token_hex(8))
    # The credential it was opened with: its expiry (epoch seconds; the session ends then, with
    # `expiry_code` and `expiry_reason`) and its id (signing out ends the session).
    expires_at: float | None = None
    expiry_code: int = closecodes.UNAUTHENTICATED
    expiry_reason: str = ""
    credential_id: str = ""
    # Renews the credential at `expires_at` instead of ending the session (None: it ends).
    renew: Renew | None = None
    # The users-file entry it was opened as ("" for other sign-ins).
    account: str = ""
    started: float = field(default_factory=time.monotonic)
    started_at: float = field(default_factory=time.time)
    to_server: int = 0
    to_client: int = 0
    server_version: str = ""
    code: int | None = None
    reason: str = ""
    phase: Phase = Phase.CONNECTING
    upstream: Upstream | None = None
    # Parses the viewer's RFB messages; only for view-only sessions and idle timeouts.
    filter: ClientFilter | None = None
    # Writes the session to a recording file (relay/recording/service.py); None: not recorded.
    recorder: SessionRecorder | None = None
    _task: asyncio.Task[Any] | None = None
    _cancelled: bool = False  # `_end` cancelled the handler task (and nobody else did)
    _abort_viewer: bool = False  # a close frame cannot reach the browser: drop its connection
    _browser_drain: asyncio.Task[None] | None = None
    # How frames reach the browser (relay/internals.py); set when the session runs.
    _viewer: ViewerLink | None = None
    # How the browser's binary messages reach `viewer_data` (relay/internals.py); None: the
    # pump takes them all from `receive`.
    _direct: DirectQueue | None = None
    _recording_drain: asyncio.Task[None] | None = None
    _timers: list[asyncio.TimerHandle] = field(default_factory=list)
    _renewal: asyncio.Task[None] | None = None
    # Loads what the relay answers the server's security with (routes with credentials/tls).
    logins: CredentialStore | None = None
    # Opens endpoint.kubevirt consoles through the Kubernetes API (relay.kubevirt).
    kubevirt: KubeVirtDialer | None = None
    # What connecting found (the console list's status); None: not kept.
    health: TargetHealth | None = None

    def stop(self, code: int, reason: str, *, abort_viewer: bool = False) -> None:
        """End the session from anywhere (shutdown, route removed, a stall); the first reason
        wins. `abort_viewer`: the browser is not reading, so drop its connection without
        waiting for the close handshake."""
        self._finish(code, reason)
        self._abort_viewer = self._abort_viewer or abort_viewer
        self._end()

    def _end(self) -> None:
        """Drop the server side and wake the handler out of whatever it awaits."""
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.abort()
        task = self._task
        if (task is not None and not self._cancelled and self.phase in (
                Phase.CONNECTING, Phase.RELAYING) and task is not asyncio.current_task()):
            self._cancelled = True
            task.cancel()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._viewer = viewer_link(self.request, self.ws)
        if self.view_only or self.idle_timeout:
            self.filter = ClientFilter(view_only=self.view_only)
        if self.max_duration:
            self._timers.append(loop.call_later(
                self.max_duration, self.stop, closecodes.IDLE_TIMEOUT,
                f"the session reached its longest allowed time ({_duration(self.max_duration)})"))
        if self.idle_timeout:
            self._timers.append(loop.call_later(self.idle_timeout, self._check_idle))
        if self.expires_at is not None:
            self._timers.append(loop.call_later(
                max(0.0, self.expires_at - time.time()), self._expired))
        try:
            try:
                if self.code is None:  # not stopped before it began
                    await self._relay()
            except asyncio.CancelledError:
                # Ours (an ending from outside), unless someone else also cancelled the task.
                if not self._cancelled or (self._task is not None and self._task.uncancel() > 0):
                    self._finish(closecodes.GOING_AWAY, "the relay is shutting down")
                    self._abort_viewer = True
                    raise
            except SessionRefused as refused:
                self._finish(refused.code, refused.reason)
                if self.health is not None:
                    self.health.failed(self.route.key, refused.code, refused.reason)
            except ConnectionError:  # writing to the browser: connect errors are SessionRefused
                self._finish(closecodes.ABNORMAL, "the viewer's connection was lost")
            except Exception:
                log.exception("session %s failed", self.route.key)
                self._finish(closecodes.INTERNAL_ERROR, "internal error in the relay; see its log")
            self._shut()
            await self._close_ws()
        finally:
            self._ended()

    def _expired(self) -> None:
        """The credential's expiry: renew it if it can be, else end the session."""
        if self.renew is None:
            self.stop(self.expiry_code, self.expiry_reason or "your sign-in expired; sign in again")
        elif self._renewal is None and self.phase in (Phase.CONNECTING, Phase.RELAYING):
            self._renewal = asyncio.ensure_future(self._renewing(self.renew))

    async def _renewing(self, renew: Renew) -> None:
        try:
            outcome = await renew()
        except Exception:
            log.exception("renewing the sign-in of a session on %s failed", self.route.key)
            outcome = (self.expiry_code, "your sign-in expired; sign in again")
        finally:
            self._renewal = None
        if self.phase not in (Phase.CONNECTING, Phase.RELAYING):
            return
        if isinstance(outcome, tuple):
            self.stop(*outcome)
        elif outcome <= time.time():
            self.stop(self.expiry_code, self.expiry_reason or "your sign-in expired; sign in again")
        else:
            self.expires_at = outcome
            self._timers.append(asyncio.get_running_loop().call_later(
                outcome - time.time(), self._expired))

    def _ended(self) -> None:
        """The steps every ending takes, whatever went before (a cancelled handler, a close
        that failed): nothing is relayed any more, the recording is closed with the code and
        reason, and the session's bytes are counted. Each step runs even if one before fails."""
        try:
            self._shut()
        finally:
            self.phase = Phase.CLOSED
            try:
                if self.recorder is not None:
                    self.recorder.close(self.code, self.reason)
            finally:
                self.metrics.bytes_relayed.labels("to_server").inc(self.to_server)
                self.metrics.bytes_relayed.labels("to_client").inc(self.to_client)

    def _shut(self) -> None:
        """Past this point nothing is relayed and nothing cancels the handler."""
        self.phase = Phase.CLOSING
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        if self._renewal is not None:
            self._renewal.cancel()
            self._renewal = None
        for drain in (self._browser_drain, self._recording_drain):
            if drain is not None:
                drain.cancel()
        self._browser_drain = self._recording_drain = None
        if self._viewer is not None:
            self._viewer.close()
        upstream, self.upstream = self.upstream, None
        if upstream is not None and upstream.transport is not None:
            upstream.transport.abort()  # nothing useful is left for the server

    async def _relay(self) -> None:
        if self.route.credentials is not None or self.route.tls is not None:
            await self._relay_logged_in()
            return
        greeting = await self._connect()
        if self.health is not None:
            self.health.connected(self.route.key, self.server_version)
        if self.filter is not None:  # it follows the version the server greets with
            self.filter.server_greeting(greeting)
        if self.recorder is not None:
            try:
                self.recorder.start(greeting, self.server_version)
            except FilterError as exc:
                raise SessionRefused(closecodes.BAD_UPSTREAM, str(exc)) from None
        transport = self.request.transport
        if transport is not None:
            # Room for a few full reads before the server is paused for the browser:
            # pausing after every read costs more than the 512 KiB it saves.
            transport.set_write_buffer_limits(high=BROWSER_HIGH_WATER)
        self._write_frame(greeting)
        self.to_client += len(greeting)
        upstream = self.upstream
        assert upstream is not None
        self.phase = Phase.RELAYING
        upstream.start_relaying()
        if self.code is None:
            await self._client_to_server(upstream)

    async def _relay_logged_in(self) -> None:
        """The relay answers the server's security itself and offers the browser only None
        (relay.rfbsecurity); relaying starts after ServerInit, in plaintext both ways."""
        route, started = self.route, time.monotonic()
        if self.logins is None:
            raise SessionRefused(closecodes.INTERNAL_ERROR, "this relay cannot log in to servers")
        try:
            login = await self.logins.login_for(route)
            dial = await self._dialer()
            opened = await rfbsecurity.open_logged_in(dial, login, route.key,
                                                      self.settings.connect_timeout)
        except DialRefused as refused:
            raise self._dial_refused(refused) from None
        except rfbsecurity.SecurityRefused as refused:
            self.logins.login_failed(route.key, refused)
            raise SessionRefused(refused.code, refused.reason) from None
        except TimeoutError:
            raise SessionRefused(closecodes.UPSTREAM_TIMEOUT,
                                 f"the host of {route.key} did not resolve in time") from None
        except socket.gaierror:
            raise SessionRefused(closecodes.BAD_UPSTREAM, f"the host of {route.key} cannot be "
                                 "resolved; check its endpoint") from None
        self.logins.logged_in(route.key)
        self.metrics.connect_seconds.observe(time.monotonic() - started)
        self.server_version = opened.greeting[:-1].decode("ascii", "replace")
        if self.health is not None:
            self.health.connected(route.key, self.server_version)
        upstream = self.upstream = Upstream(self)
        upstream.greeted.set_result(opened.greeting)
        opened.transport.set_protocol(upstream)
        upstream.connection_made(opened.transport)
        if opened.leftover:
            upstream.data_received(opened.leftover)
        try:
            handshake = await rfbsecurity.serve_browser(self.ws, opened.server_init, self.filter)
        except rfbsecurity.SecurityRefused as refused:
            raise SessionRefused(refused.code, refused.reason) from None
        extra = handshake.rest
        if self.recorder is not None:
            # Recorded is what the viewer saw: its None handshake with the relay, then the
            # server's ServerInit and messages; the login stayed between relay and server.
            try:
                self.recorder.start_logged_in(handshake.viewer, opened.server_init,
                                              self.server_version)
                extra = self.recorder.client_data(extra) if extra else extra
            except FilterError as exc:
                raise SessionRefused(closecodes.BAD_UPSTREAM, str(exc)) from None
        if self.request.transport is not None:
            self.request.transport.set_write_buffer_limits(high=BROWSER_HIGH_WATER)
        self.to_client += len(opened.server_init)
        self.phase = Phase.RELAYING
        upstream.start_relaying()
        if extra and upstream.transport is not None and not upstream.closed:
            upstream.transport.write(extra)
            self.to_server += len(extra)
        if self.code is None:
            await self._client_to_server(upstream)

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

    # --- server -> browser ------------------------------------------------------------------

    def _write_frame(self, data: bytes | memoryview) -> None:
        """One binary frame to the browser, written at once (relay/internals.py: header and
        payload in one write to the transport; aiohttp's send_bytes writes a payload over 16 KiB
        apart from its header, two sends per message, docs/PERFORMANCE.md)."""
        if self._viewer is None:
            raise ConnectionResetError("the viewer's connection is closed")
        self._viewer.write(data)

    def server_data(self, data: bytes | memoryview) -> None:
        """A chunk from the VNC server (called by Upstream)."""
        if self.recorder is not None:
            self.recorder.server_data(data)
            if self.code is not None:  # a required recording stopped: nothing more goes on
                return
        if self.filter is not None and self.filter.needs_server_bytes:
            self.filter.server_data(data)
        try:
            self._write_frame(data)
        except ConnectionError:
            self.stop(closecodes.ABNORMAL, "the viewer's connection was lost")
            return
        self.to_client += len(data)
        viewer = self._viewer
        upstream = self.upstream
        if upstream is None or upstream.transport is None:
            return
        if viewer is not None and viewer.paused and self._browser_drain is None:
            # The browser is not keeping up: stop reading the server until it has drained.
            upstream.transport.pause_reading()
            self._browser_drain = asyncio.create_task(self._wait_for_browser(upstream))
        if self.recorder is not None and self.recorder.over_budget and \
                self._recording_drain is None:
            # Nor is the recording's disk: the same, so that no update (however large the
            # viewer asked for) goes unrecorded.
            upstream.transport.pause_reading()
            self._recording_drain = asyncio.create_task(self._wait_for_recording(upstream))

    async def _wait_for_recording(self, upstream: Upstream) -> None:
        assert self.recorder is not None
        await self.recorder.caught_up(self.settings.stall_timeout)  # or cut: see there
        self._recording_drain = None
        self._resume_server(upstream)

    def _resume_server(self, upstream: Upstream) -> None:
        """Read the server again once neither the browser nor the recording holds it back."""
        if self._browser_drain is None and self._recording_drain is None and \
                upstream.transport is not None and not upstream.closed:
            upstream.transport.resume_reading()

    async def _wait_for_browser(self, upstream: Upstream) -> None:
        stall = self.settings.stall_timeout
        try:
            async with asyncio.timeout(stall):
                if self._viewer is not None:
                    await self._viewer.drain()
        except TimeoutError:
            self._browser_drain = None
            self.stop(closecodes.IDLE_TIMEOUT,
                      f"the viewer accepted no data for {stall:g}s; it stopped reading",
                      abort_viewer=True)
            return
        except ConnectionError:
            self._browser_drain = None
            self.stop(closecodes.ABNORMAL, "the viewer's connection was lost")
            return
        self._browser_drain = None
        self._resume_server(upstream)

    def server_closed(self, exc: Exception | None) -> None:
        """The VNC server ended the connection (called by Upstream)."""
        if exc is None:
            self.stop(closecodes.NORMAL, "the VNC server closed the connection")
        else:
            self.stop(closecodes.BAD_UPSTREAM, f"connection to the VNC server lost: {exc}")

    # --- connecting -------------------------------------------------------------------------

    async def _dialer(self) -> Dial:
        """How this route's upstream byte stream is opened: the one place the endpoint kinds
        differ. A TCP connection to the checked address of host:port, or a KubeVirt VMI's vnc
        subresource through the API server (relay.kubevirt). Whatever is dialled, the caller's
        protocol sees a plain stream transport."""
        route = self.route
        if route.kubevirt is not None:
            kubevirt = self.kubevirt
            if kubevirt is None:
                raise SessionRefused(closecodes.INTERNAL_ERROR,
                                     "this relay cannot open KubeVirt consoles")
            return functools.partial(kubevirt.dial, route.namespace, route.kubevirt)
        return await tcp_dialer(route, self.settings)

    def _dial_refused(self, refused: DialRefused) -> SessionRefused:
        """The viewer's ending for a console KubeVirt did not open; one it keeps for another
        client (preserveSession) is reported to the operator's status as well."""
        if refused.code == closecodes.CONFLICT and self.logins is not None:
            self.logins.console_held(self.route.key, refused.reason)
        return SessionRefused(refused.code, refused.reason)

    async def _connect(self) -> bytes:
        route, started = self.route, time.monotonic()
        upstream = Upstream(self)
        try:
            if route.kubevirt is not None and self.kubevirt is not None:
                # The relay's credentials, loaded once (in a thread) before the clock starts:
                # the connect timeout is the API server's and KubeVirt's time to answer.
                await self.kubevirt.connection()
            async with asyncio.timeout(self.settings.connect_timeout):
                dial = await self._dialer()
                await dial(lambda: upstream)
                self.upstream = upstream
                greeting = await upstream.greeted
        except DialRefused as refused:
            raise self._dial_refused(refused) from None
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
        if route.kubevirt is not None and self.logins is not None:
            self.logins.logged_in(route.key)  # the console opened: a `held` before is over
        version = parse_greeting(greeting)
        if version is None:
            raise SessionRefused(
                closecodes.BAD_UPSTREAM,
                f"the server of {route.key} is not a VNC server (no RFB greeting)")
        self.server_version = version
        return greeting

    # --- browser -> server ------------------------------------------------------------------

    async def _client_to_server(self, upstream: Upstream) -> None:
        """Browser -> server: the session's pump. On the private path (relay/internals.py) the
        pump only waits: while it does, each binary message goes from aiohttp's reader straight
        to `viewer_data`, written to the server in the callback that read it. The pump handles
        what comes through aiohttp's queue: every other message (text, close, errors), a binary
        message while it is busy, and WAKE, by which `viewer_data` hands it the waits (the server
        or the recording behind) and the session's ending. On the public path every message
        comes this way."""
        assert upstream.transport is not None
        receive = self.ws.receive
        direct = viewer_input(self.ws)
        # The browser's next message, read while waiting for the server to drain: that is how
        # a browser that leaves (close frame, FIN, RST, a missed heartbeat) is seen while the
        # server is not reading. At most one message is held this way.
        ahead: asyncio.Task[WSMessage] | None = None
        if direct is not None:
            self._direct = direct
            direct.attach(self.viewer_data)
        try:
            while True:
                if ahead is not None:
                    # Done, or waiting on an empty queue (the server drained first): nothing
                    # of the browser's is held back meanwhile.
                    msg, ahead = await ahead, None
                else:
                    msg = await receive()
                if msg.type is WSMsgType.BINARY:
                    if not self._to_server(msg.data, upstream):
                        return
                elif msg is WAKE:  # viewer_data wrote; the session waits, or ends
                    if self.code is not None:
                        return
                elif msg.type is WSMsgType.TEXT:
                    self._finish(closecodes.UNSUPPORTED_DATA,
                                 "this relay speaks the binary subprotocol only; update the client")
                    return
                elif msg.type is WSMsgType.ERROR:
                    self._finish(*self._error_ending(msg.data, upstream))
                    return
                else:  # CLOSE, CLOSING, CLOSED: the browser went away
                    peer_code = self.ws.close_code
                    if msg.type is WSMsgType.CLOSE:  # with a close frame
                        self._finish(peer_code if peer_code is not None
                                     else closecodes.NO_STATUS,
                                     "the viewer closed the connection")
                    else:  # its connection ended (an RST, or a FIN before any close frame)
                        self._finish(peer_code if peer_code is not None
                                     else closecodes.ABNORMAL,
                                     "the viewer left without closing the connection")
                    return
                if self.recorder is not None and self.recorder.over_budget:
                    # The viewer waits for the recording's disk too.
                    await self.recorder.caught_up(self.settings.stall_timeout)
                    if self.code is not None:
                        return
                if upstream.write_paused:
                    ahead = asyncio.ensure_future(receive())
                    if not await self._server_drained(upstream, ahead):
                        return
        finally:
            if direct is not None:
                direct.detach()
            if ahead is not None and not ahead.done():
                ahead.cancel()
                with contextlib.suppress(BaseException):
                    await ahead  # let aiohttp's receive unwind before the close

    def _to_server(self, data: bytes, upstream: Upstream) -> bool:
        """One binary message from the browser: the viewer-stream checks, the recording, the
        write to the server, the count. False: the session ends (its code is set)."""
        if self.filter is not None:
            try:
                data = self.filter.feed(data)
            except FilterError as exc:
                self._finish(closecodes.UNSUPPORTED_DATA, str(exc))
                return False
        if self.recorder is not None:
            try:
                data = self.recorder.client_data(data)
            except FilterError as exc:
                self._finish(closecodes.UNSUPPORTED_DATA, str(exc))
                return False
            if self.code is not None:  # a required recording stopped
                return False
        if upstream.closed or upstream.transport is None:
            self._finish(closecodes.BAD_UPSTREAM, "connection to the VNC server lost")
            return False
        upstream.transport.write(data)
        self.to_server += len(data)
        return True

    def viewer_data(self, data: bytes) -> bool:
        """A binary message from the browser, handed over by aiohttp's reader as it parsed it,
        while the pump waits with nothing held (relay/internals.py, DirectQueue). True: taken
        (written to the server, or the session ends); False: not now, queue it for the pump
        (the server or the recording is behind, or the session is ending). A write that leaves
        the server over its high-water mark, or the recording over its budget, wakes the pump
        to wait for them: messages after it queue behind WAKE, and aiohttp's queue stops
        reading from the browser when it is full."""
        upstream = self.upstream
        direct = self._direct
        if upstream is None or direct is None or self.code is not None or \
                self.phase is not Phase.RELAYING or self._behind(upstream):
            return False
        try:
            taken = self._to_server(data, upstream)
        except Exception:
            log.exception("session %s failed", self.route.key)
            self._finish(closecodes.INTERNAL_ERROR, "internal error in the relay; see its log")
            taken = False
        if not taken or self._behind(upstream):
            direct.wake()
        return True

    def _behind(self, upstream: Upstream) -> bool:
        """The VNC server is over its high-water mark, or the recording over its budget: the
        browser's messages wait for the pump."""
        return upstream.write_paused or (self.recorder is not None
                                         and self.recorder.over_budget)

    async def _server_drained(self, upstream: Upstream, ahead: asyncio.Task[WSMessage]) -> bool:
        """Wait until the VNC server takes the bytes over its high-water mark, the browser's
        next message is not data (it left: the pump handles that message next), or the stall
        limit passes. False: the session ends (code recorded)."""
        stall = self.settings.stall_timeout
        try:
            async with asyncio.timeout(stall):
                drained = upstream.drained()
                waits: set[asyncio.Future[Any]] = {drained, ahead}
                while not drained.done():
                    await asyncio.wait(waits, timeout=VIEWER_PROBE,
                                       return_when=asyncio.FIRST_COMPLETED)
                    if ahead in waits and ahead.done():
                        if ahead.result().type is not WSMsgType.BINARY:
                            return True  # the browser is gone: handle its ending now
                        waits.discard(ahead)  # hold that one message until the server drains
                    elif not drained.done() and self._viewer_gone():
                        if isinstance(self.ws.exception(), TimeoutError):
                            # aiohttp gave up on the heartbeat: the pong was not read
                            self._finish(*self._error_ending(self.ws.exception(), upstream))
                        else:
                            self._finish(closecodes.ABNORMAL, "the viewer left while the VNC "
                                         "server was not reading")
                        return False
        except TimeoutError:
            self._finish(closecodes.UPSTREAM_TIMEOUT,
                         f"the VNC server of {self.route.key} accepted no data for {stall:g}s; "
                         "is it hung?")
            return False
        if upstream.closed:
            self._finish(closecodes.BAD_UPSTREAM, "connection to the VNC server lost")
            return False
        return True

    def _viewer_gone(self) -> bool:
        """Whether the browser's TCP connection has ended, seen without reading from it.

        While the VNC server does not read, the relay stops reading from the browser, so a
        close frame, FIN or RST from a browser that leaves waits unread behind its data. Its
        kernel still answers: a ping to a closed socket draws an RST. So each probe reads the
        connection's TCP state (Linux TCP_INFO) and, while it is established and nothing else
        is queued, sends a WebSocket ping (whose pong is read whenever reading resumes).
        """
        transport = self.request.transport
        if transport is None or transport.is_closing():
            return True
        sock = transport.get_extra_info("socket")
        if sock is None or not hasattr(socket, "TCP_INFO"):
            return False
        try:
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        except OSError:
            return True
        if state != _TCP_ESTABLISHED:
            return True
        if transport.get_write_buffer_size() == 0 and not self.ws.closed and \
                self._viewer is not None:
            self._viewer.ping()
        return False

    def _error_ending(self, error: object, upstream: Upstream) -> tuple[int, str]:
        if isinstance(error, WebSocketError):
            # aiohttp has already closed the WebSocket with the error's code (1002, 1009).
            return int(error.code), f"WebSocket error: {gate_refusal(self.ws) or error}"
        if isinstance(error, TimeoutError):  # aiohttp's heartbeat: no pong in time
            if upstream.write_paused:
                # The relay was not reading from the browser (so not its pong either) because
                # the VNC server was not taking its bytes: the server is what stalled.
                return (closecodes.UPSTREAM_TIMEOUT,
                        f"the VNC server of {self.route.key} stopped accepting data")
            return closecodes.ABNORMAL, "the viewer did not answer the heartbeat; it is gone"
        return closecodes.ABNORMAL, f"the viewer's connection failed: {error}"

    async def _close_ws(self) -> None:
        """Close the WebSocket with the recorded code, within CLOSE_TIMEOUT; a browser that
        stopped reading cannot hold it: its connection is aborted instead."""
        code = self.code if self.code is not None else closecodes.INTERNAL_ERROR
        transport = self.request.transport
        if self._abort_viewer and transport is not None:
            transport.abort()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.ws.close(code=code, message=closecodes.clip_reason(self.reason).encode())
        except (TimeoutError, ConnectionError):
            pass  # the browser is gone or not reading: its connection is dropped below
        transport = self.request.transport
        if transport is not None and _unsent_bytes(transport) > 0:
            # Unsent bytes after the close: a graceful close would wait for them forever.
            transport.abort()


def _unsent_bytes(transport: asyncio.BaseTransport) -> int:
    """What a transport still holds to send to its peer.

    asyncio's TLS transport lets go of its TLS protocol when it is closed a second time (the
    browser's close_notify and aiohttp's own close race at the end of a session), and then
    fails on every question but `is_closing` and `abort`: such a transport has nothing left to
    send.
    """
    try:
        return cast(asyncio.WriteTransport, transport).get_write_buffer_size()
    except AttributeError:  # 'NoneType' object has no attribute '_get_write_buffer_size'
        if transport.is_closing():
            return 0
        raise


def _duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _literal_address(host: str) -> str | None:
    """`host` if it is an IP address written exactly as getaddrinfo gives it back (the C
    library's own formatting, inet_ntop); else None: a name, or a spelling (`127.1`, upper
    case, `::7f00:1`, a zone) that is the resolver's to read."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            packed = socket.inet_pton(family, host)
        except OSError:
            continue
        return host if socket.inet_ntop(family, packed) == host else None
    return None


async def allowed_address(route: Route, settings: RelaySettings) -> str:
    """Resolve the route's host and refuse if any address is in a denied range.

    The operator judges a DNS name as written; what it resolves to is known only here, at
    dial time (a name can be rebound to a metadata or loopback address). The relay then
    dials the address it checked, not the name again.
    """
    literal = _literal_address(route.host)
    if literal is not None:
        # An address needs no resolver: asyncio's getaddrinfo would run in a worker thread,
        # and the hop there and back was the longest wait of a session's set-up
        # (docs/PERFORMANCE.md). The checks below are the same for it.
        addresses = [literal]
    else:
        infos = await asyncio.get_running_loop().getaddrinfo(
            route.host, route.port, type=socket.SOCK_STREAM)
        addresses = [str(info[4][0]) for info in infos]
    # Every spelling of an address counts (address_in folds IPv4-mapped and -compatible
    # IPv6 forms); "this host" (0.0.0.0/8, ::) is never dialled, denied ranges or not.
    denied = settings.deny_networks + UNSPECIFIED_NETWORKS
    for address in addresses:
        if address_in(address, denied):
            raise SessionRefused(
                closecodes.FORBIDDEN,
                f"{route.key} resolves to {address}, which this relay may not reach")
    # The namespace's network-reach grant, again: the name was judged as written when the
    # target was admitted; what it resolves to now must lie in the grant's networks. (A
    # Service's own name needs no grant: the operator resolved it in the namespace.)
    try:
        if not route.service:
            settings.reach.check_resolved(route.namespace, route.host, route.port, addresses)
    except ReachDenied as exc:
        raise SessionRefused(closecodes.FORBIDDEN, str(exc)) from None
    return addresses[0]


async def tcp_dialer(route: Route, settings: RelaySettings) -> Dial:
    """A dial of the checked address of the route's host:port (every TCP upstream: sessions,
    thumbnails)."""
    async with asyncio.timeout(settings.connect_timeout):
        host = await allowed_address(route, settings)
    loop = asyncio.get_running_loop()

    async def dial_tcp(factory: Callable[[], asyncio.BaseProtocol]) -> asyncio.BaseTransport:
        transport, _ = await loop.create_connection(factory, host, route.port)
        return transport

    return dial_tcp


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

    def by_target(self) -> dict[str, list[Session]]:
        """The open sessions, by target; targets without sessions are absent."""
        return {key: list(group) for key, group in self._by_target.items()}

    def find(self, key: str, session_id: str) -> Session | None:
        for session in self._by_target.get(key, ()):
            if session.session_id == session_id:
                return session
        return None

    def __iter__(self) -> Iterator[Session]:
        for group in list(self._by_target.values()):
            yield from list(group)
