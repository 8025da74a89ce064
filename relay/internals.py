"""Every reach of the relay into aiohttp's and asyncio's private parts, behind this one door.

Each reach has a measured reason (docs/PERFORMANCE.md) and a way out (docs/ARCHITECTURE.md,
"Private internals"); tests/relay/test_internals.py checks the behaviour each relies on against
the installed aiohttp, and that the relay still relays, and still refuses unmasked frames,
through the public fallback.

- **The client's bytes pass a gate before aiohttp's WebSocket reader** (`GatedWebSocketResponse`):
  the relay refuses unmasked client frames (RFC 6455 5.1), which aiohttp accepts. Private:
  `WebSocketResponse._post_start` is overridden to put the gate in `RequestHandler._payload_parser`
  and to gate `_message_tail` (bytes that came with the upgrade request), and the reader's queue
  `WebSocketResponse._reader` is failed with 1002. Public fallback: the gate sits between the
  connection's transport and aiohttp's protocol (`transport.set_protocol`), and a refused stream
  is cut with a frame aiohttp itself must refuse (reserved bits set), so aiohttp closes with
  1002. What the fallback cannot check: bytes sent in the same packets as the upgrade request,
  before the relay's 101 (aiohttp has read them already; a browser never sends any).
- **Frames to the browser in one write** (`viewer_link`): the header and payload of each binary
  frame go to the connection's transport in one `write`, its pings too; `writing_paused` of
  aiohttp's protocol says when to pause the VNC server; `request.writer.drain()` waits for the
  browser. It relies on aiohttp writing its own frames (pings, close) whole and synchronously to
  the same transport, never holding bytes back. Public fallback: `send_bytes` and `ping`, one
  message in flight at a time (reading from the VNC server pauses until each is sent).
- **The browser's binary messages straight to the session** (`viewer_input`): aiohttp's reader
  hands each message it parses to its message queue (`WebSocketDataQueue.feed_data`, a `cpdef`
  method in the compiled reader, which honours a Python subclass's override); the relay's
  WebSocket puts a queue of its own in that place (`_post_start`: `WebSocketResponse._reader`
  and `_parser` replaced by a `DirectQueue` and a `WebSocketReader` over it, before the reader
  has seen a byte). While the session's pump waits on the empty queue, a binary message goes to
  the session's sink in the callback that read it (no queue, no task wake-up); everything else
  (control frames, close, errors, text, a message while the pump holds one) goes through
  aiohttp's queue and `receive` as before. Private: the queue class, its `_buffer`, and the
  reader's constructor (`queue, max_msg_size, compress=, decode_text=`). Public fallback: the
  pump takes every message from `receive()` (one queue hop and task wake-up per message).
- **TLS started over a transport of the relay's own** (`start_tls_capable`): asyncio's
  `loop.start_tls` accepts only transports with `_start_tls_compatible`, and its TLS layer calls
  the private `_force_close(exc)` of the transport when TLS fails; the KubeVirt console's
  WebSocket transport gets both (VeNCrypt inside the console's WebSocket). No public fallback:
  without it a console that needs VeNCrypt is refused with a reason; plain consoles are
  unaffected.

The private paths are used when the installed aiohttp has every part they touch (checked at
import, by name); `public_api_only()` forces the fallback (tests; a relay on an aiohttp that
breaks a private contract in a way names cannot show).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

from aiohttp import WebSocketError, WSCloseCode, WSMessage, WSMsgType, web
from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_websocket import WebSocketWriter
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

log = logging.getLogger("vncgate.relay")

_T = TypeVar("_T")


def _missing_private_parts() -> list[str]:
    """The private aiohttp parts the fast paths touch that this aiohttp lacks."""
    slots = getattr(RequestHandler, "__slots__", ())
    missing = [f"RequestHandler.{name}" for name in ("_payload_parser", "_message_tail")
               if name not in slots]
    if not callable(getattr(web.WebSocketResponse, "_post_start", None)):
        missing.append("WebSocketResponse._post_start")
    if not isinstance(getattr(BaseProtocol, "writing_paused", None), property):
        missing.append("BaseProtocol.writing_paused")
    for name in ("_reader", "_parser"):
        if not hasattr(web.WebSocketResponse, name):
            missing.append(f"WebSocketResponse.{name}")
    if not callable(getattr(WebSocketDataQueue, "feed_data", None)) or \
            not callable(getattr(WebSocketReader, "feed_data", None)):
        missing.append("WebSocketDataQueue.feed_data")
    return missing


MISSING = _missing_private_parts()
if MISSING:  # pragma: no cover - depends on the installed aiohttp
    log.warning("this aiohttp lacks %s: the relay uses aiohttp's public API instead (slower; "
                "install the versions of constraints.txt)", ", ".join(MISSING))
_private = not MISSING


def private_in_use() -> bool:
    """Whether new WebSockets and sessions take the private (fast) paths."""
    return _private


@contextlib.contextmanager
def public_api_only() -> Iterator[None]:
    """WebSockets and sessions made inside take aiohttp's public API only."""
    global _private
    before, _private = _private, False
    try:
        yield
    finally:
        _private = before


# --- the client's bytes, through a gate -----------------------------------------------------


class Gate(Protocol):
    """Decides, read by read, which of the client's bytes may reach aiohttp's reader."""

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """The bytes of `data` that may pass (all of it, as a rule), and whether the stream is
        refused after them (then nothing more is fed)."""
        ...


# A frame aiohttp must refuse (RFC 6455 5.2: reserved bits set, no extension agreed): final,
# RSV1-3, binary, masked, empty. Fed at a frame boundary, it makes aiohttp close with 1002.
_REFUSED_FRAME = b"\xf2\x80\x00\x00\x00\x00"


class GatedWebSocketResponse(web.WebSocketResponse):
    """aiohttp's WebSocketResponse whose incoming bytes pass a `Gate` first; a refused stream
    ends in 1002 (`refusal` is the reason aiohttp's error carries on the private path)."""

    def __init__(self, *, gate: Gate, refusal: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._vncgate_gate = gate
        self._vncgate_refusal = refusal
        self._vncgate_private = _private
        self._vncgate_gated = False
        self._vncgate_refused = False

    async def prepare(self, request: BaseRequest) -> Any:
        if self.prepared:  # aiohttp prepares the handler's response again when it returns
            return await super().prepare(request)
        if not self._vncgate_private and self.can_prepare(request).ok:
            _interpose(request, self)
            self._vncgate_gated = True
        writer = await super().prepare(request)
        if not self._vncgate_gated:  # pragma: no cover - an aiohttp that skips _post_start
            log.warning("aiohttp did not call WebSocketResponse._post_start: the relay gates "
                        "this connection through the public API")
            _interpose(request, self)
            self._vncgate_gated = True
        return writer

    def _post_start(self, request: BaseRequest, protocol: str | None,
                    writer: WebSocketWriter) -> None:
        if not self._vncgate_private:
            super()._post_start(request, protocol, writer)
            return
        handler = request.protocol
        # Bytes that arrived with the upgrade request: aiohttp feeds them to its reader as it
        # installs it; hold them back so that they pass the gate first.
        tail = handler._message_tail
        handler._message_tail = b""
        super()._post_start(request, protocol, writer)
        inner = handler._payload_parser
        direct = _direct_reader(self)
        if direct is not None:
            inner = direct
        parser = _GatedParser(inner, self._vncgate_gate, self)
        handler._payload_parser = parser
        self._vncgate_gated = True
        if tail:
            eof, _ = parser.feed_data(tail)
            if eof:
                handler.close()

    @property
    def refusal(self) -> str | None:
        """Why the gate refused the client's stream; None: it has not."""
        return self._vncgate_refusal if self._vncgate_refused else None

    def _vncgate_fail(self) -> None:
        self._vncgate_refused = True
        reader = self._reader  # the queue aiohttp's receive() reads from
        if reader is not None:
            reader.set_exception(WebSocketError(WSCloseCode.PROTOCOL_ERROR,
                                                self._vncgate_refusal))


class _GatedParser:
    """In aiohttp's place for the connection's payload parser: the gate, then aiohttp's reader."""

    __slots__ = ("_gate", "_reader", "_refused", "_ws")

    def __init__(self, reader: Any, gate: Gate, ws: GatedWebSocketResponse) -> None:
        self._reader = reader
        self._gate = gate
        self._ws = ws
        self._refused = False

    def feed_eof(self) -> None:
        self._reader.feed_eof()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self._refused:
            return True, b""
        passed, refused = self._gate.feed(data)
        result: tuple[bool, bytes] = (False, b"")
        if passed:
            result = self._reader.feed_data(passed)
        if refused:
            self._refused = True
            self._ws._vncgate_fail()
            return True, b""
        return result if result[0] else (False, b"")


class _GateProtocol(asyncio.Protocol):
    """The public fallback: between the connection's transport and aiohttp's protocol."""

    def __init__(self, inner: asyncio.Protocol, ws: GatedWebSocketResponse) -> None:
        self._inner = inner
        self._gate = ws._vncgate_gate
        self._ws = ws
        self._refused = False

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        passed, refused = self._gate.feed(data)
        if passed:
            self._inner.data_received(passed)
        if refused:
            self._refused = True
            self._ws._vncgate_refused = True
            self._inner.data_received(_REFUSED_FRAME)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


def _interpose(request: BaseRequest, ws: GatedWebSocketResponse) -> None:
    transport = request.transport
    if transport is None:
        return
    inner = transport.get_protocol()
    assert isinstance(inner, asyncio.Protocol)
    transport.set_protocol(_GateProtocol(inner, ws))


def gate_refusal(ws: web.WebSocketResponse) -> str | None:
    """Why the gate of `ws` refused the client's stream (on either path); None: it has not,
    or `ws` has no gate."""
    return ws.refusal if isinstance(ws, GatedWebSocketResponse) else None


# --- the browser's messages, straight to the session -----------------------------------------

# What the pump's `receive()` returns when the sink asks it to look at the session (`wake`): a
# message type aiohttp's reader never produces (continuation frames are joined into messages).
WAKE = WSMessage(WSMsgType.CONTINUATION, None, None)


class DirectQueue(WebSocketDataQueue):
    """aiohttp's WebSocket message queue with a way round it for binary messages.

    `parked`: a reader (the session's pump, in `receive`) waits on the queue, which is empty,
    and nothing has been queued since it began to wait. Only then does a binary message go to
    the sink, in the reader's callback; the sink answers False to have it queued instead (the
    VNC server is not taking more: the pump waits for it). Every message that is queued ends
    `parked`, so a message never overtakes one queued or held before it.
    """

    __slots__ = ("parked", "sink")

    def __init__(self, protocol: BaseProtocol, limit: int, *,
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(protocol, limit, loop=loop)
        self.sink: Callable[[bytes], bool] | None = None
        self.parked = False

    def feed_data(self, data: Any, size: int) -> None:
        sink = self.sink
        if sink is not None and self.parked and data[0] is WSMsgType.BINARY and sink(data[1]):
            return
        self.parked = False
        WebSocketDataQueue.feed_data(self, data, size)

    async def read(self) -> Any:
        if self._buffer or self.is_eof():
            return await WebSocketDataQueue.read(self)
        self.parked = True
        try:
            return await WebSocketDataQueue.read(self)
        finally:
            self.parked = False

    def attach(self, sink: Callable[[bytes], bool]) -> None:
        """From now on, binary messages go to `sink` while the queue is parked."""
        self.sink = sink

    def detach(self) -> None:
        self.sink = None

    def wake(self) -> None:
        """Queue WAKE: the pump's `receive()` returns it (after any message queued before)."""
        self.parked = False
        WebSocketDataQueue.feed_data(self, WAKE, 0)

    @property
    def queued(self) -> int:
        """Bytes of messages in the queue (aiohttp's count: payloads plus 128 per message)."""
        return int(self._size)


def _direct_reader(ws: web.WebSocketResponse) -> WebSocketReader | None:
    """Put a DirectQueue, and a reader over it, in place of aiohttp's (in `_post_start`, before
    any byte was read); None, with a warning, if this aiohttp does not take it."""
    old = ws._reader
    try:
        if old is None or ws._loop is None or old._buffer:
            raise RuntimeError("aiohttp's reader is not fresh")
        queue = DirectQueue(old._protocol, old._limit // 2, loop=ws._loop)
        reader = WebSocketReader(queue, ws._max_msg_size, compress=bool(ws._compress),
                                 decode_text=ws._decode_text)
    except Exception:  # pragma: no cover - depends on the installed aiohttp
        log.warning("this aiohttp's WebSocket reader does not take the relay's queue: browser "
                    "messages go through aiohttp's queue (slower)", exc_info=True)
        return None
    ws._reader = queue
    ws._parser = reader
    return reader


def viewer_input(ws: web.WebSocketResponse) -> DirectQueue | None:
    """The queue through which `ws` hands binary messages straight to a sink; None: this
    WebSocket has aiohttp's own (the public fallback), and every message comes from `receive`."""
    reader = ws._reader
    return reader if isinstance(reader, DirectQueue) else None


# --- the browser's side of a session: frames out, flow control --------------------------------

_HEADER_SHORT, _HEADER_16, _HEADER_64 = (struct.Struct(f).pack for f in ("!BB", "!BBH", "!BBQ"))
_PING = b"\x89\x00"  # an empty WebSocket ping frame, server to client (unmasked)


def binary_frame_header(length: int) -> bytes:
    """The header of a final, unmasked, binary WebSocket frame (RFC 6455 section 5.2)."""
    if length < 126:
        return _HEADER_SHORT(0x82, length)
    if length < 65536:
        return _HEADER_16(0x82, 126, length)
    return _HEADER_64(0x82, 127, length)


class ViewerLink(Protocol):
    """How a session writes to the browser's WebSocket from the VNC server's read callback."""

    def write(self, data: bytes | memoryview) -> None:
        """One binary frame; ConnectionResetError once the connection is closed."""
        ...

    @property
    def paused(self) -> bool:
        """Whether to stop reading from the VNC server until `drain` returns."""
        ...

    async def drain(self) -> None:
        """Until the browser has taken what was written (ConnectionError: it is gone)."""
        ...

    def ping(self) -> None:
        """An empty ping, to draw an RST from a closed socket."""
        ...

    def close(self) -> None:
        """Nothing more is written."""
        ...


def viewer_link(request: BaseRequest, ws: web.WebSocketResponse) -> ViewerLink:
    if _private:
        return _TransportLink(request, ws)
    return _MessageLink(ws)


class _TransportLink:
    """Frames straight to the transport: header and payload in one write, written whole and
    synchronously, so aiohttp's own pings and close frame never land inside one."""

    __slots__ = ("_request", "_ws")

    def __init__(self, request: BaseRequest, ws: web.WebSocketResponse) -> None:
        self._request = request
        self._ws = ws

    def write(self, data: bytes | memoryview) -> None:
        transport = self._request.transport
        if transport is None or transport.is_closing() or self._ws.closed:
            raise ConnectionResetError("the viewer's connection is closed")
        transport.write(binary_frame_header(len(data)) + data)

    @property
    def paused(self) -> bool:
        protocol = self._request.protocol
        return protocol is not None and protocol.writing_paused

    async def drain(self) -> None:
        await self._request.writer.drain()

    def ping(self) -> None:
        transport = self._request.transport
        if transport is not None and not transport.is_closing():
            transport.write(_PING)

    def close(self) -> None:
        pass


class _MessageLink:
    """The public fallback: `send_bytes` (and `ping`) from one task, one message in flight; the
    VNC server waits while any is unsent."""

    __slots__ = ("_error", "_queue", "_sender", "_ws")

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self._ws = ws
        self._queue: list[bytes | None] = []  # None: a ping
        self._sender: asyncio.Task[None] | None = None
        self._error: BaseException | None = None

    def write(self, data: bytes | memoryview) -> None:
        if self._ws.closed or self._error is not None:
            raise ConnectionResetError("the viewer's connection is closed")
        self._enqueue(bytes(data))  # a copy: the read buffer is reused

    def ping(self) -> None:
        if not self._ws.closed and (not self._queue or self._queue[-1] is not None):
            self._enqueue(None)

    def _enqueue(self, item: bytes | None) -> None:
        self._queue.append(item)
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        try:
            while self._queue:
                item = self._queue.pop(0)
                if item is None:
                    await self._ws.ping()
                else:
                    await self._ws.send_bytes(item)
        except Exception as exc:  # the connection is gone: drain says so
            self._error = exc
        finally:
            self._sender = None

    @property
    def paused(self) -> bool:
        return self._sender is not None

    async def drain(self) -> None:
        sender = self._sender
        if sender is not None:
            await asyncio.shield(sender)
        if self._error is not None:
            raise ConnectionResetError(f"the viewer's connection failed: {self._error}")

    def close(self) -> None:
        self._queue.clear()
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.cancel()


# --- asyncio -----------------------------------------------------------------------------------


def start_tls_capable(cls: type[_T]) -> type[_T]:
    """Mark a transport class of the relay's own as one `loop.start_tls` may wrap: asyncio
    accepts only its own transports unless a class says `_start_tls_compatible`, and its TLS
    layer ends a failed connection with the transport's `_force_close(exc)` (here: `abort`)."""
    cls._start_tls_compatible = True  # type: ignore[attr-defined]
    if not hasattr(cls, "_force_close"):
        def _force_close(self: Any, exc: BaseException | None) -> None:
            self.abort()

        cls._force_close = _force_close  # type: ignore[attr-defined]
    return cls
