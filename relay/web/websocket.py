"""The relay's WebSocket: aiohttp's, plus the one rule of RFC 6455 that aiohttp does not enforce.

RFC 6455 section 5.1: a server MUST close the connection when a client sends an unmasked
frame (masking keeps a page's script from writing bytes of its choosing to intermediaries).
aiohttp 3.x reads the mask bit and unmasks when it is set, but accepts a frame without it, in
both of its readers (pure Python and Cython), and offers no hook to refuse one. So the relay
puts a small scanner in front of aiohttp's reader: it walks the frame headers of the bytes as
they arrive (O(1) per frame, payloads are skipped by length, never copied) and, at the first
unmasked frame, fails the reader the way aiohttp fails it on its own protocol errors. aiohttp
then closes with 1002 and the session ends with that code.

The scanner replaces the connection's payload parser right after aiohttp installs it, which
needs two private attributes of aiohttp's `RequestHandler` (`_payload_parser`,
`_message_tail`). Their presence is checked at import, so an aiohttp that renames them stops
the relay at start rather than silently accepting unmasked frames.
"""

from __future__ import annotations

from typing import Any

from aiohttp import WebSocketError, WSCloseCode, web
from aiohttp.http_websocket import WebSocketWriter
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

_HOOKS = ("_payload_parser", "_message_tail")
_missing = [name for name in _HOOKS if name not in getattr(RequestHandler, "__slots__", ())]
if _missing:  # pragma: no cover - depends on the installed aiohttp
    raise ImportError(
        f"this aiohttp's RequestHandler has no {', '.join(_missing)}: the relay cannot enforce "
        "masked client frames (RFC 6455 5.1); install an aiohttp version pyproject.toml allows")

_FAILED = (True, b"")
_OK = (False, b"")


class MaskedFramesOnly:
    """Sits between aiohttp's connection and its WebSocket reader; passes bytes on unchanged
    while every client frame is masked."""

    __slots__ = ("_failed", "_partial", "_reader", "_skip", "_ws")

    def __init__(self, reader: Any, ws: web.WebSocketResponse) -> None:
        self._reader = reader
        self._ws = ws
        self._skip = 0  # payload bytes of the current frame still to come
        self._partial = b""  # the start of a frame header split across reads (< 14 bytes)
        self._failed = False

    def feed_eof(self) -> None:
        self._reader.feed_eof()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self._failed:
            return _FAILED
        if not self._all_masked(data):
            self._failed = True
            error = WebSocketError(WSCloseCode.PROTOCOL_ERROR,
                                   "the client sent an unmasked frame (RFC 6455 5.1)")
            reader = self._ws._reader  # the queue aiohttp's receive() reads from
            if reader is not None:
                reader.set_exception(error)
            return _FAILED
        result: tuple[bool, bytes] = self._reader.feed_data(data)
        return result if result[0] else _OK

    def _all_masked(self, data: bytes) -> bool:
        """Walk the frame headers in `data`; False at the first unmasked one."""
        size = len(data)
        if self._skip >= size:
            self._skip -= size
            return True
        pos = self._skip
        self._skip = 0
        if self._partial:
            # A header split across reads: complete it from the start of this read.
            head = self._partial + data[:14]
            consumed = len(self._partial)
            self._partial = b""
            frame = _frame_size(head, 0)
            if frame == _INCOMPLETE:  # still incomplete (a read of a few bytes)
                self._partial = head
                return True
            if frame == _UNMASKED:
                return False
            pos = frame - consumed
            if pos >= size:
                self._skip = pos - size
                return True
        while pos < size:
            frame = _frame_size(data, pos)
            if frame == _INCOMPLETE:
                self._partial = data[pos:]
                return True
            if frame == _UNMASKED:
                return False
            pos += frame
        self._skip = pos - size
        return True


_INCOMPLETE = 0
_UNMASKED = -1


def _frame_size(data: bytes, pos: int) -> int:
    """Header plus payload length of the frame at `pos`; _INCOMPLETE: its header is not all
    there yet; _UNMASKED: the frame has no mask."""
    available = len(data) - pos
    if available < 2:
        return _INCOMPLETE
    second = data[pos + 1]
    if not second & 0x80:
        return _UNMASKED
    length = second & 0x7F
    if length == 126:
        if available < 8:
            return _INCOMPLETE
        return 8 + int.from_bytes(data[pos + 2:pos + 4], "big")
    if length == 127:
        if available < 14:
            return _INCOMPLETE
        return 14 + int.from_bytes(data[pos + 2:pos + 10], "big")
    if available < 6:
        return _INCOMPLETE
    return 6 + length


class RelayWebSocket(web.WebSocketResponse):
    """aiohttp's WebSocketResponse that closes with 1002 on an unmasked client frame."""

    def _post_start(self, request: BaseRequest, protocol: str | None,
                    writer: WebSocketWriter) -> None:
        handler = request.protocol
        # Bytes that arrived with the upgrade request: aiohttp feeds them to its reader as it
        # installs it; hold them back so that they pass the scanner first.
        tail = handler._message_tail
        handler._message_tail = b""
        super()._post_start(request, protocol, writer)
        reader = handler._payload_parser
        scanner = MaskedFramesOnly(reader, self)
        handler._payload_parser = scanner
        if tail:
            eof, _ = scanner.feed_data(tail)
            if eof:
                handler.close()
