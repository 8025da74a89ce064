"""KubeVirt consoles: the vnc subresource of a VirtualMachineInstance as an upstream byte stream.

KubeVirt serves a VM's VNC only through its API: `GET /apis/subresources.kubevirt.io/v1/
namespaces/{ns}/virtualmachineinstances/{name}/vnc` on the Kubernetes API server, upgraded to a
WebSocket with the subprotocol `plain.kubevirt.io`, whose binary messages carry the raw RFB
stream (virt-api proxies it to the VM's QEMU). RBAC decides: `get` on
`virtualmachineinstances/vnc` in group `subresources.kubevirt.io`, for the relay's own
ServiceAccount.

`dial` connects to the API server (its CA, the relay's token) and hands the caller's protocol a
`WebSocketTransport`: an asyncio transport whose writes become masked binary frames and whose
reads are the frames' payloads. So the bridge (relay.session.bridge) and the relay's own login
(relay.rfb.security) run over it unchanged: greeting check, session policy, view-only filter and
credentials work as for a TCP endpoint, and asyncio's TLS layer can start inside it (VeNCrypt).

The WebSocket itself (the upgrade request and its answer, framing, masking, the checks on what
the server sends) is the sans-I/O library wsproto; this module only moves its bytes over the
asyncio connection and turns its events into the transport's. wsproto hands on a frame's
payload in the pieces that arrive, so no frame is ever buffered whole, and flow control passes
straight through (pausing the reader pauses the API server's connection).

The path is built only from names the registry checked (Kubernetes names: no '/', no '..') and
quoted again here; nothing a viewer sends reaches it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import h11
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import ProtocolError

from vncgate.common.kube import KubeConfigError, KubeConnection
from vncgate.common.spec import check_name, check_namespace
from vncgate.relay import closecodes
from vncgate.relay.internals import start_tls_capable

SUBPROTOCOL = "plain.kubevirt.io"
GROUP = "subresources.kubevirt.io"
MAX_ERROR_BODY = 2048  # of a refusal's body, for its message
NORMAL_CLOSURE = 1000
# KubeVirt gives a VMI's console to the newest client and drops the one before, unless the new
# one asks to preserve the session: then KubeVirt refuses it (503) while another client (virtctl
# vnc, a web console) holds the console, instead of silently taking it from that person.
# KubeVirt versions before the option ignore it.
PRESERVE_SESSION = "preserveSession=true"
# The aggregation layer's own 503 when KubeVirt's API is not served (no virt-api endpoint).
_API_UNAVAILABLE = ("service unavailable", "currently unable to handle")


class DialRefused(Exception):
    """The console could not be opened; `code` (4xxx) and `reason` go to the viewer."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def vnc_path(namespace: str, name: str) -> str:
    """The subresource's path, from checked names only (ValueError for anything else)."""
    check_namespace(namespace, "namespace")
    check_name(name, "name")
    return (f"/apis/{GROUP}/v1/namespaces/{quote(namespace, safe='')}"
            f"/virtualmachineinstances/{quote(name, safe='')}/vnc")


def console_request(host: str, target: str, headers: Mapping[str, str]) -> Request:
    """The upgrade request for `target` on the API server at `host` (host[:port]), with the
    relay's credentials in `headers`, asking for KubeVirt's subprotocol."""
    extra = [(b"User-Agent", b"vncgate-relay")]
    extra += [(key.encode("latin-1"), value.encode("latin-1")) for key, value in headers.items()]
    return Request(host=host, target=target, subprotocols=[SUBPROTOCOL], extra_headers=extra)


def _refusal(status: int, body: str, namespace: str, name: str) -> DialRefused:
    # Close reasons are cut at 123 bytes: what to do comes first, the long names last.
    if status == 401:
        return DialRefused(closecodes.BAD_UPSTREAM,
                           "the Kubernetes API server did not accept the relay's credentials")
    if status == 403:
        return DialRefused(closecodes.FORBIDDEN,
                           "the relay may not get virtualmachineinstances/vnc (chart value "
                           f"kubevirt.enabled) in {namespace}")
    if status == 404:
        if "could not find the requested resource" in body:
            return DialRefused(closecodes.BAD_UPSTREAM,
                               f"KubeVirt is not installed in this cluster (no {GROUP} API)")
        return DialRefused(closecodes.BAD_UPSTREAM,
                           f"virtualmachineinstance {name} does not exist; is the VM running?")
    if status == 503:
        if not body.strip() or any(mark in body.lower() for mark in _API_UNAVAILABLE):
            return DialRefused(closecodes.BAD_UPSTREAM,
                               f"KubeVirt's API ({GROUP}) is not available now; try again later")
        # KubeVirt does not say who: the relay's own viewers of a VM are one exclusive session.
        return DialRefused(closecodes.CONFLICT,
                           f"in use by another console client (virtctl vnc or a web console) "
                           f"of VM {name}; KubeVirt keeps it for them")
    detail = " ".join(body.split())[:200]
    return DialRefused(closecodes.BAD_UPSTREAM,
                       f"KubeVirt refused the console of {name} (HTTP {status}"
                       + (f": {detail}" if detail else "") + ")")


# loop.start_tls accepts it (VeNCrypt over the WebSocket, relay.rfb.security).
@start_tls_capable
class WebSocketTransport(asyncio.Transport):
    """The inner protocol's view of the WebSocket: bytes in, bytes out."""

    def __init__(self, stream: KubeVirtStream) -> None:
        super().__init__()
        self._stream = stream

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            self._stream.send(data)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        self.close()

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self._stream.pause_reading()

    def resume_reading(self) -> None:
        self._stream.resume_reading()

    def is_reading(self) -> bool:
        return not self._stream.reading_paused

    def close(self) -> None:
        self._stream.close()

    def abort(self) -> None:
        self._stream.abort()

    def is_closing(self) -> bool:
        return self._stream.closing

    def get_write_buffer_size(self) -> int:
        return self._stream.write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._stream.write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._stream.set_write_buffer_limits(high, low)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._stream.inner = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._stream.inner

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "subprotocol":
            return SUBPROTOCOL
        return self._stream.extra_info(name, default)


class KubeVirtStream(asyncio.Protocol):
    """The API server's connection: the upgrade, then WebSocket messages both ways."""

    def __init__(self, inner: asyncio.BaseProtocol, request: Request,
                 namespace: str, name: str) -> None:
        loop = asyncio.get_running_loop()
        self.inner = inner
        self._ws = WSConnection(ConnectionType.CLIENT)
        # Built here, before any connection: a header the library refuses (a token with a
        # line break, say) fails the dial at once.
        self._request = self._ws.send(request)
        self._where = (namespace, name)
        self._refused_status: int | None = None  # a non-101 answer whose body is being read
        self._refusal_body = bytearray()
        self.upgraded: asyncio.Future[WebSocketTransport] = loop.create_future()
        self._transport: asyncio.Transport | None = None
        self._wrapper: WebSocketTransport | None = None
        self.reading_paused = False
        self.closing = False
        self._ended = False

    # -- the outer transport's events -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        assert self._transport is not None
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        if self._ended:
            return
        try:
            self._ws.receive_data(data)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        self._events()

    def eof_received(self) -> bool | None:
        if self._refused_status is not None and not self._ended:
            # A refusal's body may run to the end of the connection (no Content-Length).
            self._refused()
        self._end(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused_status is not None and not self._ended:
            self._refused()
        self._end(exc)

    # The API server's connection is over (or back under) its high-water mark: the inner
    # protocol's writes wait (the bridge's drain), as they would on a TCP transport.
    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # -- what the server sent -------------------------------------------------------------

    def _events(self) -> None:
        for event in self._ws.events():
            if self._ended:
                return
            if isinstance(event, BytesMessage):
                if event.data:
                    self._deliver(event.data)
            else:
                self._other(event)

    def _other(self, event: Event) -> None:
        if isinstance(event, Ping):
            self._write(self._ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            self._close_received(event)
        elif isinstance(event, TextMessage):
            self._end(ConnectionError("KubeVirt sent a text message; the console speaks binary"))
        elif isinstance(event, AcceptConnection):
            self._accepted(event)
        elif isinstance(event, RejectConnection):
            self._refused_status = event.status_code
            if not event.has_body:
                self._refused()
        elif isinstance(event, RejectData):
            room = MAX_ERROR_BODY - len(self._refusal_body)
            self._refusal_body += event.data[:max(room, 0)]
            if event.body_finished or len(self._refusal_body) >= MAX_ERROR_BODY:
                self._refused()
        # A Pong answers nothing the relay asked; nothing else reaches a client.

    def _close_received(self, event: CloseConnection) -> None:
        # wsproto reports a frame it cannot accept as a CloseConnection too (code 1002 or
        # 1007), without moving to a closing state: only a real close frame moves it.
        if self._ws.state not in (ConnectionState.REMOTE_CLOSING, ConnectionState.CLOSED):
            self._end(ConnectionError(f"the API server broke the WebSocket protocol: "
                                      f"{event.reason or 'no reason given'}"))
            return
        if self._ws.state is ConnectionState.REMOTE_CLOSING:
            self._write(self._ws.send(CloseConnection(code=event.code)))
        self.closing = True
        self._end(None, eof=True)  # the server closes: end like a TCP FIN

    # -- the upgrade ----------------------------------------------------------------------

    def _accepted(self, event: AcceptConnection) -> None:
        if event.subprotocol != SUBPROTOCOL:
            self._fail_upgrade(DialRefused(closecodes.BAD_UPSTREAM, "KubeVirt did not accept "
                                           f"the {SUBPROTOCOL} subprotocol"))
            return
        self._wrapper = WebSocketTransport(self)
        self.upgraded.set_result(self._wrapper)
        self.inner.connection_made(self._wrapper)

    def _refused(self) -> None:
        assert self._refused_status is not None
        body = bytes(self._refusal_body).decode("utf-8", "replace")
        self._fail_upgrade(_refusal(self._refused_status, body, *self._where))

    def _protocol_error(self, exc: ProtocolError) -> None:
        if self.upgraded.done():
            self._end(ConnectionError(f"the API server broke the WebSocket protocol: {exc}"))
            return
        # The library names what was wrong ("Bad accept token", "Missing header ..."); what
        # the HTTP parser said lies beneath ("Receive buffer too long", for a huge head).
        detail = f"{exc}" + (f" ({exc.__context__})" if exc.__context__ else "")
        self._fail_upgrade(DialRefused(closecodes.BAD_UPSTREAM,
                                       "the API server's answer to the console request is not a "
                                       f"WebSocket upgrade: {detail}"))

    def _fail_upgrade(self, refused: DialRefused) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(refused)
        self._ended = True
        self.abort()

    # -- handing on -------------------------------------------------------------------------

    def _deliver(self, data: bytes | bytearray) -> None:
        """Hand bytes to the inner protocol: a plain Protocol's data_received (the bridge's
        Upstream has one), or a BufferedProtocol's buffers (asyncio's TLS layer, when
        VeNCrypt starts TLS over this stream)."""
        inner = self.inner
        receive = getattr(inner, "data_received", None)
        if receive is not None:
            receive(data)
            return
        assert isinstance(inner, asyncio.BufferedProtocol)
        view = memoryview(data)
        while view:
            buffer = memoryview(inner.get_buffer(len(view))).cast("B")
            size = min(len(buffer), len(view))
            if not size:
                raise RuntimeError("the protocol offered an empty buffer")
            buffer[:size] = view[:size]
            inner.buffer_updated(size)
            view = view[size:]

    def _end(self, exc: Exception | None, *, eof: bool = False) -> None:
        if self._ended:
            return
        self._ended = True
        if not self.upgraded.done():
            self.upgraded.set_exception(DialRefused(
                closecodes.BAD_UPSTREAM,
                f"the API server closed the console request: {exc}" if exc else
                "the API server closed the console request"))
        elif self._wrapper is None:
            pass  # refused before the upgrade: the inner protocol never started
        elif eof and hasattr(self.inner, "eof_received"):
            self.inner.eof_received()
            self.inner.connection_lost(None)
        else:
            self.inner.connection_lost(exc)
        if self._transport is not None:
            if exc is not None:
                self._transport.abort()
            else:
                self._transport.close()

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and data and not transport.is_closing():
            transport.write(data)

    # -- what the wrapper asks ----------------------------------------------------------------

    def send(self, payload: bytes | bytearray | memoryview) -> None:
        if self._ended or self._ws.state is not ConnectionState.OPEN:
            return
        self._write(self._ws.send(BytesMessage(data=bytes(payload))))

    def pause_reading(self) -> None:
        if self._transport is not None and not self.reading_paused:
            self.reading_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and self.reading_paused:
            self.reading_paused = False
            self._transport.resume_reading()

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            if self._ws.state is ConnectionState.OPEN:
                self._write(self._ws.send(CloseConnection(code=NORMAL_CLOSURE)))
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self.closing = True
        if self._transport is not None:
            self._transport.abort()

    def write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() if self._transport is not None else 0

    def write_buffer_limits(self) -> tuple[int, int]:
        if self._transport is None:
            return (0, 0)
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None, low: int | None) -> None:
        if self._transport is not None:
            self._transport.set_write_buffer_limits(high, low)

    def extra_info(self, name: str, default: Any) -> Any:
        if self._transport is None:
            return default
        return self._transport.get_extra_info(name, default)


class KubeVirtDialer:
    """Opens consoles through the API server with the relay's Kubernetes credentials.

    The connection (kubeconfig, or the pod's ServiceAccount: token re-read at each dial) is
    loaded in a thread, at the relay's start when it has Kubernetes credentials (`warm`) or at
    the first dial: importing the kubernetes package takes seconds on a busy machine (measured:
    3.4 s on two loaded cores), which would stop the event loop and spend the first viewer's
    connect timeout. A relay without Kubernetes credentials never loads the package.
    """

    def __init__(self, load: Callable[[], KubeConnection]) -> None:
        self._load = load
        self._connection: KubeConnection | None = None
        self._loading: asyncio.Future[KubeConnection] | None = None

    def warm(self) -> None:
        """Start loading the connection in a thread, if that has not begun."""
        if self._connection is None and self._loading is None:
            self._loading = asyncio.ensure_future(asyncio.to_thread(self._load))
            # A failure is reported to the dial that awaits it; never "never retrieved".
            self._loading.add_done_callback(
                lambda done: None if done.cancelled() else done.exception())

    async def connection(self) -> KubeConnection:
        if self._connection is None:
            self.warm()
            assert self._loading is not None
            try:
                # Shielded: a viewer's timeout does not cancel the load the next one awaits.
                self._connection = await asyncio.shield(self._loading)
            except KubeConfigError as exc:
                self._loading = None  # the next dial tries again (a file fixed meanwhile)
                raise DialRefused(closecodes.INTERNAL_ERROR,
                                  "this relay has no Kubernetes credentials for KubeVirt "
                                  f"consoles ({exc}); run it in the cluster or give "
                                  "--kubeconfig") from None
        return self._connection

    async def dial(self, namespace: str, name: str,
                   factory: Callable[[], asyncio.BaseProtocol]) -> asyncio.Transport:
        """Open the console of VMI `namespace/name`; the caller bounds the time."""
        connection = await self.connection()
        url = urlsplit(connection.server)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise DialRefused(closecodes.INTERNAL_ERROR,
                              f"the relay's Kubernetes server URL {connection.server!r} is "
                              "not an http(s) URL")
        port = url.port or (443 if url.scheme == "https" else 80)
        host = url.hostname if ":" not in url.hostname else f"[{url.hostname}]"
        request = console_request(f"{host}:{port}",
                                  f"{url.path.rstrip('/')}{vnc_path(namespace, name)}"
                                  f"?{PRESERVE_SESSION}",
                                  connection.headers())
        inner = factory()
        try:
            stream = KubeVirtStream(inner, request, namespace, name)
        except h11.LocalProtocolError:
            # Never the library's message: it quotes the offending header, i.e. the token.
            raise DialRefused(closecodes.INTERNAL_ERROR,
                              "the relay's Kubernetes credentials cannot be sent as an HTTP "
                              "header (an illegal character in the token?); check its "
                              "kubeconfig or ServiceAccount token") from None
        loop = asyncio.get_running_loop()
        context = connection.ssl_context if url.scheme == "https" else None
        transport: asyncio.Transport | None = None
        try:
            transport, _ = await loop.create_connection(
                lambda: stream, url.hostname, port,
                ssl=context if context is not False else None,
                server_hostname=url.hostname if context else None)
            return await stream.upgraded
        except OSError as exc:
            if transport is not None:
                transport.abort()
            raise DialRefused(closecodes.BAD_UPSTREAM,
                              "cannot reach the Kubernetes API server for the console of "
                              f"virtualmachineinstance {namespace}/{name}: "
                              f"{exc.strerror or exc}") from None
        except BaseException:
            if transport is not None:
                transport.abort()
            raise
