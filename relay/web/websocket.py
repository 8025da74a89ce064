"""The relay's WebSocket: aiohttp's, plus the one rule of RFC 6455 that aiohttp does not enforce.

RFC 6455 section 5.1: a server MUST close the connection when a client sends an unmasked
frame (masking keeps a page's script from writing bytes of its choosing to intermediaries).
aiohttp 3.x reads the mask bit and unmasks when it is set, but accepts a frame without it, in
both of its readers (pure Python and Cython), and offers no hook to refuse one. So the relay
puts a small scanner in front of aiohttp's reader: it walks the frame headers of the bytes as
they arrive (O(1) per frame, payloads are skipped by length, never copied) and, at the first
unmasked frame, the stream is refused: aiohttp closes with 1002 and the session ends with that
code. How the scanner is put in front of aiohttp's reader (a private reach, with a public
fallback) is relay/internals.py's business.
"""

from __future__ import annotations

from typing import Any

from vncgate.relay.internals import GatedWebSocketResponse

UNMASKED = "the client sent an unmasked frame (RFC 6455 5.1)"


class MaskedFramesOnly:
    """Passes the client's bytes on unchanged while every frame is masked; refuses the stream
    at the first unmasked frame (the bytes before it pass)."""

    __slots__ = ("_failed", "_held", "_partial", "_skip")

    def __init__(self) -> None:
        self._skip = 0  # payload bytes of the current frame still to come
        # The start (2 to 13 bytes, passed on) of a masked frame's header split across reads.
        self._partial = b""
        # The first byte of a header that ended a read: held back until the byte with the mask
        # bit comes, so that every byte passed on belongs to a frame known to be masked.
        self._held = b""
        self._failed = False

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        if self._failed:
            return b"", True
        if self._held:
            data, self._held = self._held + data, b""
        unmasked = self._unmasked_at(data)
        if unmasked >= 0:
            self._failed = True
            return data[:unmasked], True
        if self._held:
            return data[:-1], False
        return data, False

    def _unmasked_at(self, data: bytes) -> int:
        """Walk the frame headers in `data`: where the first unmasked frame starts, else -1."""
        size = len(data)
        if self._skip >= size:
            self._skip -= size
            return -1
        pos = self._skip
        self._skip = 0
        if self._partial:
            # A header split across reads: complete it from the start of this read. Its mask
            # bit came with the part already seen (set: else it would have been refused).
            head = self._partial + data[:14]
            consumed = len(self._partial)
            self._partial = b""
            frame = _frame_size(head, 0)
            if frame == _INCOMPLETE:  # still incomplete (a read of a few bytes)
                self._partial = head
                return -1
            pos = frame - consumed
            if pos >= size:
                self._skip = pos - size
                return -1
        while pos < size:
            frame = _frame_size(data, pos)
            if frame == _UNMASKED:
                return pos
            if frame == _INCOMPLETE:
                if size - pos == 1:
                    self._held = data[pos:]
                else:
                    self._partial = data[pos:]
                return -1
            pos += frame
        self._skip = pos - size
        return -1


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


class RelayWebSocket(GatedWebSocketResponse):
    """aiohttp's WebSocketResponse that closes with 1002 on an unmasked client frame."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(gate=MaskedFramesOnly(), refusal=UNMASKED, **kwargs)
