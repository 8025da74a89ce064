"""Session recordings: the file format, the RFB tap that feeds it, and the disk writer.

A recorded session is one gzip file (docs/RECORDING.md has the format). Its records are the
server-to-viewer RFB stream from ServerInit on, with timestamps; the viewer's input messages
when the target asks for them; keyframe marks; a header (who, which target, when) and an end
record (close code and reason, complete or not).

The live session never waits for the disk. The event loop only appends records to a per-session
byte budget and hands them to one writer thread, which compresses and writes. When a session's
queued bytes pass the budget (the disk does not keep up) the session stops reading the server
and the viewer until the writer caught up, as for a slow browser: a viewer cannot switch its
recording off by asking for large updates. A disk that stalls for the stall timeout, or a write
error (a full disk), cuts the recording: it is marked incomplete, and an audit line and
`vncgate_recordings_incomplete` say so; the session goes on, or, with `required`, ends (4507).

Encodings and keyframes: the viewer keeps the encodings it asked for (Tight, ZRLE, zlib as well
as Raw, CopyRect, RRE and Hextile), so a recorded session costs no more bandwidth than another.
The relay follows the server's messages (it must, to know where a FramebufferUpdate starts:
Tight and ZRLE data carry their lengths, so it measures them without decoding) and marks each
update that repaints the whole screen without CopyRect as a keyframe, but only while the stream
is still stateless: the zlib streams of Tight, ZRLE and zlib run across the whole session, so
after the first rectangle that feeds one (`stateful`), no later update can be decoded on its
own, and the relay stops marking and asking for keyframes. A player then seeks by replaying
from the last keyframe before the stream turned stateful (or from the start), without drawing
delays (docs/ARCHITECTURE.md, "Recording"). While the stream is stateless the relay asks the
server for a whole screen every `keyframe_interval` (a non-incremental
FramebufferUpdateRequest). A viewer whose pixel format the player cannot show as it is (not
noVNC's) gets only the stateless encodings: the player converts Raw, RRE and Hextile pixels,
never compressed ones.

No secret reaches the file: server bytes are recorded from ServerInit on, after the security
handshake (a VNC password's challenge and response are 16 bytes each, before it), and the
viewer's messages only after ClientInit, and only input messages, only when asked. For a target
the relay logs in to (spec.credentials, spec.tls) the tap never sees the server's handshake at
all: it is given the None handshake the relay played toward the viewer (`replay_handshake`), so
the login, its challenge and response, and TLS stay between the relay and the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vncgate.relay.rfb.security import RELAY_GREETING
from vncgate.relay.rfb.viewerstream import (
    CLIENT_CUT_TEXT,
    KEY_EVENT,
    MESSAGE_BODY,
    MESSAGE_END,
    MESSAGE_HEADER,
    POINTER_EVENT,
    QEMU,
    QEMU_EXTENDED_KEY,
    SECURITY_NONE,
    SECURITY_VNC,
    SET_ENCODINGS,
    SET_PIXEL_FORMAT,
    VERSIONS,
    FilterError,
    ViewerStream,
)

log = logging.getLogger("vncgate.recording")
audit = logging.getLogger("vncgate.audit")

MAGIC = b"VNCGREC"
# 2: `P` records (the viewer's pixel format). Version 1 files (without them: noVNC's format)
# are still read and played.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
SUFFIX = ".vncrec"
_RECORD = struct.Struct("!cII")  # type, milliseconds since the start, payload length

HEADER, SERVER, CLIENT, KEYFRAME, END = b"H", b"S", b"C", b"K", b"E"
PIXEL_FORMAT = b"P"
# RFC 6143 7.4: the PIXEL_FORMAT of ServerInit and SetPixelFormat.
_PIXEL_FORMAT = struct.Struct("!BBBBHHHBBBxxx")

# Encodings a recorded session may negotiate: those whose data the relay can measure (the
# stateless ones, Tight, TightPNG, ZRLE and zlib) and pseudo-encodings whose data it can measure.
# Everything else is dropped from SetEncodings.
RAW, COPYRECT, RRE, HEXTILE = 0, 1, 2, 5
ZLIB, TIGHT, ZRLE, TIGHT_PNG = 6, 7, 16, -260
DESKTOP_SIZE, LAST_RECT, CURSOR = -223, -224, -239
EXTENDED_DESKTOP_SIZE, DESKTOP_NAME, QEMU_EXTENDED_KEY_ENCODING = -308, -307, -258
EXTENDED_CLIPBOARD = 0xC0A1E5CE - (1 << 32)
QUALITY_LEVELS = range(-32, -22)  # JPEG quality and compression level: no data of their own
COMPRESS_LEVELS = range(-256, -246)
# (ExtendedMouseButtons is not among them: with it, servers read 7-byte PointerEvents, which the
# relay's parser does not; relay/rfb/viewerstream.py.)
# Decoders without state across updates: the only ones for a viewer whose pixel format the player
# converts (relay/static/novnc/pixelformat.js rewrites Raw, RRE and Hextile pixels).
STATELESS_ENCODINGS = frozenset({RAW, COPYRECT, RRE, HEXTILE, DESKTOP_SIZE, LAST_RECT, CURSOR,
                                 EXTENDED_DESKTOP_SIZE, DESKTOP_NAME, QEMU_EXTENDED_KEY_ENCODING,
                                 EXTENDED_CLIPBOARD, *QUALITY_LEVELS, *COMPRESS_LEVELS})
ALLOWED_ENCODINGS = STATELESS_ENCODINGS | {ZLIB, TIGHT, ZRLE, TIGHT_PNG}
# noVNC's own pixel format (32 bits, depth 24, little-endian true colour, red in the lowest
# byte): what the player decodes without converting.
PLAYABLE_FORMAT = (32, 24, 0, 1, 255, 255, 255, 0, 8, 16)
_RECORDED_INPUT = frozenset({KEY_EVENT, POINTER_EVENT, CLIENT_CUT_TEXT})
_MAX_INPUT_RECORD = 64 * 1024  # a longer clipboard message is recorded cut to this


def pixel_format_json(pixel_format: bytes, offset: int) -> bytes:
    """The `P` record of a SetPixelFormat's 16-byte PIXEL_FORMAT: the server encodes every
    FramebufferUpdate that starts at or after `offset` of the recorded server stream with it
    (the player converts what is not noVNC's own format)."""
    (bits, depth, big_endian, true_colour, red_max, green_max, blue_max, red_shift,
     green_shift, blue_shift) = _PIXEL_FORMAT.unpack(pixel_format)
    return json.dumps({
        "offset": offset, "bitsPerPixel": bits, "depth": depth, "bigEndian": bool(big_endian),
        "trueColour": bool(true_colour), "redMax": red_max, "greenMax": green_max,
        "blueMax": blue_max, "redShift": red_shift, "greenShift": green_shift,
        "blueShift": blue_shift}).encode()


def encode_record(kind: bytes, millis: int, payload: bytes) -> bytes:
    return _RECORD.pack(kind, millis & 0xFFFFFFFF, len(payload)) + payload


@dataclass(frozen=True, slots=True)
class Record:
    kind: bytes
    millis: int
    payload: bytes

    def json(self) -> dict[str, Any]:
        value = json.loads(self.payload)
        if not isinstance(value, dict):
            raise ValueError("a JSON record must hold an object")
        return value


class FormatError(ValueError):
    """The file is not a recording this relay can read."""


# Reading is bounded whatever the file holds: a small file can inflate to gigabytes (a
# black screen in Raw is all zeros and compresses about 1000 to 1), so the file is inflated
# in steps of at most _INFLATE_STEP bytes, and a record longer than MAX_RECORD is damage.
# Records are at most one read from the server (relay/session/bridge.py), far below the cap.
MAX_RECORD = 16 << 20
_INFLATE_STEP = 1 << 20
_READ_STEP = 64 * 1024


def _inflate(path: Path) -> Iterator[bytes]:
    """The file's decompressed bytes, in pieces of at most _INFLATE_STEP (raises zlib.error)."""
    decompressor = zlib.decompressobj(wbits=31)
    with path.open("rb") as file:
        while not decompressor.eof:
            data = file.read(_READ_STEP)
            if not data:
                return
            while True:
                out = decompressor.decompress(data, _INFLATE_STEP)
                if out:
                    yield out
                data = decompressor.unconsumed_tail
                # A full step may leave output inside zlib even with no input left.
                if decompressor.eof or (not data and len(out) < _INFLATE_STEP):
                    break


def read_records(path: Path, kinds: frozenset[bytes] | None = None) -> Iterator[Record]:
    """The records of a recording file, in order; with `kinds`, only those (the others are
    skipped without being kept: listing a file needs its header, keyframes and end, never its
    screen). A file cut short (a crash, a full disk) yields the records before the cut: the
    writer flushes whole records. Memory stays bounded (MAX_RECORD plus one step) whatever the
    file inflates to."""
    buffer = bytearray()
    started = False
    skip = 0  # bytes of a skipped record's payload still to come
    try:
        for piece in _inflate(path):
            view = memoryview(piece)
            if skip:
                dropped = min(skip, len(view))
                skip -= dropped
                view = view[dropped:]
            buffer += view
            if not started:
                if len(buffer) < len(MAGIC) + 1:
                    continue
                if bytes(buffer[:len(MAGIC)]) != MAGIC:
                    raise FormatError(f"{path} is not a vncgate recording")
                if buffer[len(MAGIC)] not in READABLE_VERSIONS:
                    raise FormatError(f"{path} is recording format {buffer[len(MAGIC)]}; this "
                                      f"relay reads formats {READABLE_VERSIONS}")
                del buffer[:len(MAGIC) + 1]
                started = True
            offset = 0
            while len(buffer) - offset >= _RECORD.size:
                kind, millis, length = _RECORD.unpack_from(buffer, offset)
                if length > MAX_RECORD:
                    return  # damage, not a record: keep what was read
                end = offset + _RECORD.size + length
                if kinds is not None and kind not in kinds:
                    if end > len(buffer):
                        skip = end - len(buffer)
                        offset = len(buffer)
                        break
                    offset = end
                    continue
                if end > len(buffer):
                    break
                yield Record(kind, millis, bytes(buffer[offset + _RECORD.size:end]))
                offset = end
            del buffer[:offset]
    except zlib.error as exc:
        if not started:
            raise FormatError(f"{path} is not a vncgate recording") from exc
        return  # a damaged tail: keep what was read


# --- following the RFB stream ------------------------------------------------------------------

# The parser is a generator that yields how many bytes it needs next: n > 0 to read them, n < 0
# to skip -n bytes (pixel data: skipped in bulk, never copied).
_Parser = Generator[int, bytes, None]
_WAIT = 1 << 62  # resume when the next bytes arrive, not at once


class RfbTap:
    """Follows both directions of one session for its recording.

    `client_data` takes what goes to the server and returns it with SetEncodings restricted
    (and, when a keyframe is due, a full update request appended at a message boundary).
    `server_data` takes the server's bytes after the 12-byte greeting. Records go to `emit`.
    """

    def __init__(self, emit: Callable[[bytes, bytes], None], *, record_input: bool,
                 keyframe_interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._emit = emit
        self._record_input = record_input
        self._keyframe_interval = keyframe_interval
        self._clock = clock
        # client side: the viewer's handshake and message boundaries, as the view-only filter
        # reads them (one parser: relay/rfb/viewerstream.py)
        self.stream = ViewerStream("a recorded session needs")
        self._message: bytearray | None = None  # a message kept whole (SetEncodings, input)
        self._message_total = 0
        self._last_request = clock()
        # server side
        self.recording = False  # ServerInit seen: server bytes are recorded from there
        self.offset = 0  # bytes of the recorded server stream the parser has taken
        self.recorded = 0  # bytes of the recorded server stream written (SERVER records)
        self.width = 0
        self.height = 0
        self.bpp = 4
        self.depth = 24
        self.following = True  # False once the server sent something the parser cannot measure
        # True from the first rectangle that feeds a zlib stream (Tight, ZRLE, zlib): no update
        # after it decodes on its own, so no more keyframes are marked or asked for.
        self.stateful = False
        self.updates = 0  # FramebufferUpdates followed to their end
        self.rectangles: Counter[int] = Counter()  # by encoding
        # The viewer's last SetEncodings, and whether its pixel format plays without conversion
        # (else the server gets only the stateless encodings of it).
        self._wanted: bytes | None = None
        self._playable = False
        self._sent_encodings: bytes | None = None
        self._need = 0
        self._skip = 0
        self._buffer = bytearray()
        self._parser: _Parser | None = None
        self._waiting = False
        # Keyframes whose update ended in the bytes `server_data` is taking: written after
        # their SERVER record (see there).
        self._keyframes: list[bytes] = []

    @property
    def minor(self) -> int:
        return self.stream.minor

    @property
    def security(self) -> int | None:
        return self.stream.security

    def server_greeting(self, greeting: bytes) -> None:
        if greeting not in VERSIONS:
            raise FilterError(f"the VNC server greets with {greeting!r}; a recorded session "
                              "needs RFB 3.3, 3.7 or 3.8")
        self.stream.server_greeting(greeting)

    # --- viewer -> server ---

    def client_data(self, data: bytes) -> bytes:
        out = bytearray()
        for piece, chunk, total in self.stream.split(data):
            if piece == MESSAGE_BODY:
                if self._message is not None:
                    room = _MAX_INPUT_RECORD - len(self._message)
                    self._message += chunk[:max(room, 0)]
                else:
                    out += chunk
            elif piece == MESSAGE_HEADER:
                kind = chunk[0]
                keep = kind in (SET_ENCODINGS, SET_PIXEL_FORMAT) or (self._record_input and (
                    kind in _RECORDED_INPUT or (kind == QEMU and chunk[1] == QEMU_EXTENDED_KEY)))
                if keep:
                    self._message, self._message_total = bytearray(chunk), total
                else:
                    out += chunk
            elif piece == MESSAGE_END:
                if self._message is not None:
                    self._message_done(out)
                else:
                    self._at_boundary(out)
            else:  # a handshake part passes whole
                out += chunk
        return bytes(out)

    def _message_done(self, out: bytearray) -> None:
        message, self._message = self._message, None
        assert message is not None
        kind = message[0]
        if kind == SET_ENCODINGS:
            self._wanted = bytes(message)
            self._send_encodings(out, always=True)
        elif kind == SET_PIXEL_FORMAT:
            self.bpp = max(1, message[4] // 8)
            self.depth = message[5]
            self._playable = playable_format(bytes(message[4:20]))
            # The whole format, not only its size: a player must know how to read the pixels
            # (TigerVNC's vncviewer asks for blue in the lowest byte; noVNC for red).
            self._emit(PIXEL_FORMAT, pixel_format_json(bytes(message[4:20]), self.recorded))
            out += message
            if self._wanted is not None:  # the encodings the new format allows
                self._send_encodings(out)
        else:
            self._emit(CLIENT, bytes(message))
            if len(message) < self._message_total:  # cut: what passes must still be whole
                raise FilterError("an input message over 64 KiB cannot be recorded")
            out += message
        self._at_boundary(out)

    def _send_encodings(self, out: bytearray, *, always: bool = False) -> None:
        """The viewer's SetEncodings as the server gets it: what the tap can measure and the
        player decode in this pixel format (unless `always`, nothing when the server already
        has exactly it)."""
        assert self._wanted is not None
        message = restrict_encodings(self._wanted, ALLOWED_ENCODINGS if self._playable
                                     else STATELESS_ENCODINGS)
        if always or message != self._sent_encodings:
            self._sent_encodings = message
            out += message

    def _at_boundary(self, out: bytearray) -> None:
        """Between two of the viewer's messages: the place to ask for a keyframe (while the
        stream is stateless: a later one could not be decoded on its own)."""
        if (self.recording and self.following and not self.stateful and self.width
                and self._clock() - self._last_request >= self._keyframe_interval):
            self._last_request = self._clock()
            out += struct.pack("!BBHHHH", 3, 0, 0, 0, self.width, self.height)

    # --- server -> viewer ---

    def server_data(self, data: bytes | memoryview) -> None:
        """The server's bytes after the greeting; recorded from ServerInit on."""
        view = memoryview(data)
        if self._parser is None:  # the viewer's version is known by now: the server waited
            self._parser = self._server_messages()
            self._advance(None)
        start = 0 if self.recording else None
        i, end = 0, len(view)
        while i < end and (self._need or self._skip or self._waiting):
            if self._waiting:  # new bytes: what the parser waited for has happened
                self._waiting = False
                self._advance(b"")
            elif self._skip:
                n = min(self._skip, end - i)
                self._skip -= n
                i += n
                if self.recording:
                    self.offset += n
                if not self._skip:
                    self._advance(b"")
            else:
                take = min(self._need - len(self._buffer), end - i)
                self._buffer += view[i:i + take]
                i += take
                if len(self._buffer) == self._need:
                    value, self._buffer = bytes(self._buffer), bytearray()
                    if self.recording:
                        self.offset += len(value)
                    self._advance(value)
            if start is None and self.recording:
                start = i  # ServerInit begins at the next byte
        if start is not None and start < end:
            self._emit(SERVER, bytes(view[start:]))
            self.recorded += end - start
        # A keyframe goes after the SERVER record that holds its update's last byte, so it is
        # stamped no earlier: a player seeking to its time feeds the records stamped up to
        # then, and noVNC shows an update only once it has all of it. Written before that
        # record, it was stamped a millisecond earlier whenever the clock ticked in between,
        # and a seek to it showed a black screen.
        if self._keyframes:
            keyframes, self._keyframes = self._keyframes, []
            for keyframe in keyframes:
                self._emit(KEYFRAME, keyframe)

    def _advance(self, value: bytes | None) -> None:
        assert self._parser is not None
        try:
            need = self._parser.send(value) if value is not None else next(self._parser)
        except StopIteration:
            need = 0
        except FilterError as exc:
            if self.recording:
                log.warning("recording goes on without keyframes: the relay cannot measure %s",
                            exc)
            need = 0
        if need == _WAIT:
            self._waiting, need = True, 0
        elif not need:
            self.following = False
        self._skip, self._need = (-need, 0) if need < 0 else (0, need)

    def _server_messages(self) -> _Parser:
        # The handshake after the greeting (RFC 6143 7.1-7.3), as the server sends it.
        if self.minor == 3:
            (security,) = struct.unpack("!I", (yield 4))
            self.stream.security = security
        else:
            (count,) = (yield 1)
            if count == 0:
                return  # the server refused; it sends a reason and closes
            yield count  # the types offered
            yield _WAIT  # the server says more only after the viewer chose: resume then
            security = self.security if self.security is not None else -1
        if security == SECURITY_VNC:
            yield 16  # the challenge: never recorded
        if security == SECURITY_VNC or (security == SECURITY_NONE and self.minor >= 8):
            (result,) = struct.unpack("!I", (yield 4))
            if result != 0:
                return
        elif security != SECURITY_NONE:
            raise FilterError(f"security type {security}")
        self.recording = True  # ServerInit: recorded from its first byte on
        init = yield 24
        self.width, self.height = struct.unpack_from("!HH", init)
        self.bpp = max(1, init[4] // 8)
        self.depth = init[5]
        self._playable = playable_format(init[4:20])
        (name_length,) = struct.unpack_from("!I", init, 20)
        if name_length:
            yield -name_length
        while True:
            (kind,) = yield 1
            if kind == 0:
                yield from self._update(self.offset - 1)
            elif kind == 1:  # SetColourMapEntries
                head = yield 5
                yield -(6 * struct.unpack_from("!H", head, 3)[0])
            elif kind == 2:  # Bell
                pass
            elif kind == 3:  # ServerCutText (a negative length: the extended clipboard's)
                head = yield 7
                length = abs(struct.unpack_from("!i", head, 3)[0])
                if length:
                    yield -length
            elif kind == 250:  # XVP
                yield 3
            else:
                raise FilterError(f"server message type {kind}")

    def _update(self, start: int) -> _Parser:
        head = yield 3
        (count,) = struct.unpack_from("!H", head, 1)
        width, height = self.width, self.height
        painted, copies = 0, False
        done = 0
        while count == 0xFFFF or done < count:
            rect = yield 12
            _x, y, w, h, encoding = struct.unpack("!HHHHi", rect)
            done += 1
            self.rectangles[encoding] += 1
            if encoding == LAST_RECT:
                break
            size = 0
            if encoding == RAW:
                size = w * h * self.bpp
                painted += w * h
            elif encoding == COPYRECT:
                size, copies = 4, True
            elif encoding == RRE:
                sub = yield 4 + self.bpp
                size = struct.unpack_from("!I", sub)[0] * (self.bpp + 8)
                painted += w * h
            elif encoding == HEXTILE:
                yield from self._hextile(w, h)
                painted += w * h
            elif encoding in (TIGHT, TIGHT_PNG):
                if (yield from self._tight(w, h, png=encoding == TIGHT_PNG)):
                    self.stateful = True
                painted += w * h
            elif encoding in (ZRLE, ZLIB):
                length = yield 4
                size = struct.unpack("!I", length)[0]
                self.stateful = True
                painted += w * h
            elif encoding == CURSOR:
                size = w * h * self.bpp + (w + 7) // 8 * h
            elif encoding == DESKTOP_SIZE:
                self.width, self.height = w, h
            elif encoding == EXTENDED_DESKTOP_SIZE:
                screens = yield 4
                size = 16 * screens[0]
                if y == 0:  # status 0: the size changed
                    self.width, self.height = w, h
            elif encoding == DESKTOP_NAME:
                length = yield 4
                size = struct.unpack("!I", length)[0]
            elif encoding == QEMU_EXTENDED_KEY_ENCODING:
                pass
            else:
                raise FilterError(f"encoding {encoding} in an update")
            if size:
                yield -size
        self.updates += 1
        if painted >= width * height > 0 and not copies and not self.stateful:
            self._keyframes.append(json.dumps({"offset": start, "width": width,
                                               "height": height}).encode())

    def _tight(self, w: int, h: int, *, png: bool) -> Generator[int, bytes, bool]:
        """Skip one Tight (or TightPNG) rectangle (the RFB community wiki's "Tight Encoding",
        as noVNC's core/decoders/tight.js reads it); True when it fed a zlib stream."""
        (control,) = yield 1
        compression = control >> 4
        # TPIXEL: 3 bytes for 24-bit true colour in 32 bits, else a whole pixel
        tpixel = 3 if self.bpp == 4 and self.depth == 24 else self.bpp
        if compression == 8:  # fill
            yield -tpixel
            return False
        if compression == 9 or (compression == 10 and png):  # JPEG, PNG
            length = yield from self._compact_length()
            if length:
                yield -length
            return False
        if compression & 8:
            raise FilterError(f"Tight compression {compression}")
        pixels = w * h * tpixel  # the copy and gradient filters
        if compression & 4:
            (filter_id,) = yield 1
            if filter_id == 1:  # palette
                (count,) = yield 1
                colours = count + 1
                yield -(colours * tpixel)
                pixels = ((w + 7) // 8) * h if colours <= 2 else w * h
            elif filter_id not in (0, 2):
                raise FilterError(f"Tight filter {filter_id}")
        if pixels == 0:
            return False
        if pixels < 12:  # sent as they are, not through zlib
            yield -pixels
            return False
        length = yield from self._compact_length()
        if length:
            yield -length
        return True

    @staticmethod
    def _compact_length() -> Generator[int, bytes, int]:
        (byte,) = yield 1
        length = byte & 0x7F
        if byte & 0x80:
            (byte,) = yield 1
            length |= (byte & 0x7F) << 7
            if byte & 0x80:
                (byte,) = yield 1
                length |= byte << 14
        return length

    def _hextile(self, w: int, h: int) -> _Parser:
        bpp = self.bpp
        for ty in range(0, h, 16):
            th = min(16, h - ty)
            for tx in range(0, w, 16):
                tw = min(16, w - tx)
                (sub,) = yield 1
                if sub & 1:
                    yield -(tw * th * bpp)
                    continue
                size = (bpp if sub & 2 else 0) + (bpp if sub & 4 else 0)
                if sub & 8:
                    if size:
                        yield -size
                    (n,) = yield 1
                    size = n * ((bpp if sub & 16 else 0) + 2)
                if size:
                    yield -size


def replay_handshake(tap: RfbTap, viewer: bytes, server_init: bytes) -> None:
    """Give a tap the handshake a viewer had with the relay itself (a target the relay logs in
    to: relay/rfb/security.py `serve_browser`): RFB 3.8 offered, security None, then the
    server's ServerInit. `viewer` is the viewer's side of it (version, choice, ClientInit).
    The tap starts recording at ServerInit, as for any session; what the relay said to the
    server to log in (a password's challenge and response, TLS) never reaches it."""
    tap.server_greeting(RELAY_GREETING)
    tap.client_data(viewer[:12])
    rest = viewer[12:]
    if tap.minor == 3:
        tap.server_data(struct.pack("!I", SECURITY_NONE))
    else:
        tap.server_data(bytes([1, SECURITY_NONE]))
        tap.client_data(rest[:1])
        rest = rest[1:]
        if tap.minor == 8:
            tap.server_data(bytes(4))  # SecurityResult OK
    tap.client_data(rest)  # ClientInit
    tap.server_data(server_init)


def playable_format(pixel_format: bytes) -> bool:
    """Whether the player decodes a PIXEL_FORMAT (16 bytes) as it is: noVNC's own."""
    return _PIXEL_FORMAT.unpack(pixel_format[:16]) == PLAYABLE_FORMAT


def restrict_encodings(message: bytes, allowed: frozenset[int] = ALLOWED_ENCODINGS) -> bytes:
    """A SetEncodings message with only the encodings a recording can follow, in the viewer's
    order; Raw is always there (RFC 6143 requires servers to support it)."""
    count = struct.unpack_from("!H", message, 2)[0]
    wanted = struct.unpack_from(f"!{count}i", message, 4)
    kept = [e for e in wanted if e in allowed]
    if RAW not in kept:
        kept.append(RAW)
    return struct.pack(f"!BxH{len(kept)}i", SET_ENCODINGS, len(kept), *kept)


# --- writing to disk ---------------------------------------------------------------------------


@dataclass(eq=False)
class Recording:
    """One session's recording: the event loop adds records, the writer thread writes them.

    Over its budget of bytes waiting for the disk (`limit`) a recording is not cut: the session
    stops reading the VNC server (and the viewer) until the writer has caught up (`drained`),
    as it does for a browser that does not keep up. Otherwise a viewer could switch its own
    recording off by asking for large updates. Only a disk that stalls for the session's stall
    timeout, or a failed write, ends a recording early (`cut`).
    """

    writer: RecordingWriter
    path: Path
    limit: int  # bytes that may wait for the disk before the session waits for it
    started: float = field(default_factory=time.monotonic)
    pending: int = 0
    complete: bool = True
    stopped: bool = False  # nothing more is added (cut, failed or closed)
    failed: str = ""  # set by the writer thread: why writing stopped
    written: int = 0  # uncompressed bytes handed to the writer
    on_incomplete: Callable[[str], None] | None = None
    # What the summary beside the file says (kept by the writer thread as records pass).
    summary_header: bytes = b""
    summary_end: bytes = b""
    keyframes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _waiters: list[asyncio.Future[None]] = field(default_factory=list)

    @property
    def over_budget(self) -> bool:
        return not self.stopped and self.pending > self.limit

    def add(self, kind: bytes, payload: bytes) -> None:
        """Queue one record (event loop); never blocks, never raises. The caller holds its
        source back while `over_budget` (see `drained`)."""
        if self.stopped:
            return
        if self.failed:
            self.cut(f"writing failed: {self.failed}")
            return
        record = encode_record(kind, int((time.monotonic() - self.started) * 1000), payload)
        with self._lock:
            self.pending += len(record)
        self.written += len(record)
        self.writer.submit(self, record)

    def check(self) -> None:
        """Cut the recording now if the writer failed (event loop)."""
        if self.failed and not self.stopped:
            self.cut(f"writing failed: {self.failed}")

    async def drained(self) -> None:
        """Until the writer has brought the waiting bytes down to half the budget, or failed
        (event loop)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.pending <= self.limit // 2 or self.failed:
                return
            waiter = loop.create_future()
            self._waiters.append(waiter)
        try:
            await waiter
        finally:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def cut(self, why: str) -> None:
        self.stopped = True
        self.complete = False
        if self.on_incomplete is not None:
            self.on_incomplete(why)

    def close(self, code: int | None, reason: str) -> None:
        """The end record (exempt from the budget: it is small) and the file's end."""
        if self.failed and not self.stopped:
            self.cut(f"writing failed: {self.failed}")
        self.stopped = True
        end = {"code": code, "reason": reason, "complete": self.complete,
               "ended": _iso(time.time()),
               "durationMs": int((time.monotonic() - self.started) * 1000)}
        record = encode_record(END, int((time.monotonic() - self.started) * 1000),
                               json.dumps(end).encode())
        with self._lock:
            self.pending += len(record)
        self.writer.submit(self, record, last=True)

    def done_writing(self, size: int) -> None:
        """The writer thread wrote (or dropped) `size` bytes: wake a session that waits."""
        with self._lock:
            self.pending -= size
            if not self._waiters or (self.pending > self.limit // 2 and not self.failed):
                return
            waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                waiter.get_loop().call_soon_threadsafe(_wake, waiter)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class RecordingWriter:
    """One thread that compresses and writes every recording of the relay, in order.

    Per file it keeps a gzip stream; after each burst (when its queue runs empty) it flushes
    what it has (Z_SYNC_FLUSH), so a file cut by a crash or a full disk reads up to there.
    Any error writing a file ends that file only (`Recording.failed`); the thread goes on.
    """

    def __init__(self, on_failure: Callable[[Recording, str], None] | None = None) -> None:
        self._queue: queue.SimpleQueue[tuple[Recording, bytes, bool] | None] = queue.SimpleQueue()
        self._files: dict[Recording, tuple[Any, Any]] = {}  # open file, compressor
        self._dirty: set[Recording] = set()
        self._thread: threading.Thread | None = None
        self._on_failure = on_failure
        self.idle = threading.Event()
        self.idle.set()

    def submit(self, recording: Recording, record: bytes, last: bool = False) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vncgate-recording",
                                            daemon=True)
            self._thread.start()
        self.idle.clear()
        self._queue.put((recording, record, last))

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued and end the thread (at shutdown)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while True:
            if self._queue.empty():
                self._flush()
                self.idle.set()
            item = self._queue.get()
            if item is None:
                self._flush()
                for recording in list(self._files):
                    self._finish(recording)
                self.idle.set()
                return
            recording, record, last = item
            try:
                if not recording.failed:
                    self._write(recording, record, last)
            except Exception as exc:  # a full disk or any error ends one file only
                self._fail(recording, exc)
            finally:
                recording.done_writing(len(record))

    def _write(self, recording: Recording, record: bytes, last: bool) -> None:
        opened = self._files.get(recording)
        if opened is None:
            recording.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(recording.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         0o640)
            file = os.fdopen(fd, "wb", buffering=0)
            compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
            opened = self._files[recording] = (file, compressor)
            file.write(compressor.compress(MAGIC + bytes([FORMAT_VERSION])))
        file, compressor = opened
        out = compressor.compress(record)
        if out:
            file.write(out)
        kind = record[:1]
        if kind == HEADER:
            recording.summary_header = record[_RECORD.size:]
        elif kind == KEYFRAME:
            recording.keyframes += 1
        elif kind == END:
            recording.summary_end = record[_RECORD.size:]
        self._dirty.add(recording)
        if last:
            self._finish(recording)

    def _flush(self) -> None:
        for recording in list(self._dirty):
            opened = self._files.get(recording)
            if opened is not None:
                try:
                    opened[0].write(opened[1].flush(zlib.Z_SYNC_FLUSH))
                except Exception as exc:  # see _run
                    self._fail(recording, exc)
        self._dirty.clear()

    def _finish(self, recording: Recording) -> None:
        self._dirty.discard(recording)
        opened = self._files.pop(recording, None)
        if opened is None:
            return
        file, compressor = opened
        try:
            file.write(compressor.flush(zlib.Z_FINISH))
        finally:
            file.close()
        write_summary(recording)

    def _fail(self, recording: Recording, exc: Exception) -> None:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        recording.failed = why or type(exc).__name__
        self._dirty.discard(recording)
        opened = self._files.pop(recording, None)
        if opened is not None:
            with contextlib.suppress(Exception):
                opened[0].close()
        if self._on_failure is not None:
            with contextlib.suppress(Exception):
                self._on_failure(recording, recording.failed)


# Each finished recording's summary sits beside it (`<file>.summary.json`): listing
# recordings reads these few hundred bytes instead of inflating every file.
SUMMARY_SUFFIX = ".summary.json"
MAX_SUMMARY = 64 * 1024


def summary_path(path: Path) -> Path:
    return path.with_name(path.name + SUMMARY_SUFFIX)


def write_summary(recording: Recording) -> None:
    """The summary of a finished file (writer thread; a failure leaves none: the listing then
    reads the file itself, in bounded steps)."""
    path = recording.path
    target = summary_path(path)
    temporary = target.with_name(f".{target.name}.tmp")
    try:
        header = json.loads(recording.summary_header) if recording.summary_header else {}
        end = json.loads(recording.summary_end) if recording.summary_end else None
        body = json.dumps({"format": FORMAT_VERSION, "size": path.stat().st_size,
                           "header": header, "end": end,
                           "keyframes": recording.keyframes}).encode()
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o640)
        with os.fdopen(fd, "wb") as file:
            file.write(body)
        os.replace(temporary, target)
    except (OSError, ValueError) as exc:
        log.warning("could not write the summary of %s: %s", path, exc)
        with contextlib.suppress(OSError):
            temporary.unlink()


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def recording_path(directory: Path, namespace: str, name: str, started_at: float,
                   session_id: str) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started_at))
    return directory / namespace / name / f"{stamp}-{session_id}{SUFFIX}"
