"""The recording tap on its own: the handshake of a target the relay logs in to, the encodings
the server gets for each pixel format, and Tight/ZRLE updates measured without decoding (with
keyframes only while the stream is stateless)."""

from __future__ import annotations

import json
import struct
import zlib

import pytest

from vncgate.relay.recording.capture import (
    KEYFRAME,
    SERVER,
    STATELESS_ENCODINGS,
    RfbTap,
    replay_handshake,
    restrict_encodings,
)

WIDTH, HEIGHT = 64, 48
# noVNC's pixel format (the player's) and TigerVNC vncviewer's (blue in the lowest byte).
NOVNC = struct.pack("!BBBBHHHBBBxxx", 32, 24, 0, 1, 255, 255, 255, 0, 8, 16)
TIGERVNC = struct.pack("!BBBBHHHBBBxxx", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
SERVER_INIT = struct.pack("!HH", WIDTH, HEIGHT) + TIGERVNC + struct.pack("!I", 4) + b"desk"
TIGHT, ZRLE, HEXTILE, RAW, COPYRECT, CURSOR = 7, 16, 5, 0, 1, -239
WANTED = (TIGHT, ZRLE, HEXTILE, COPYRECT, RAW, CURSOR)
SET_ENCODINGS = struct.pack(f"!BxH{len(WANTED)}i", 2, len(WANTED), *WANTED)
FULL_REQUEST = struct.pack("!BBHHHH", 3, 0, 0, 0, WIDTH, HEIGHT)


class Tap:
    def __init__(self, keyframe_interval: float = 3600.0) -> None:
        self.records: list[tuple[bytes, bytes]] = []
        self.tap = RfbTap(lambda kind, payload: self.records.append((kind, payload)),
                          record_input=False, keyframe_interval=keyframe_interval)

    def kinds(self, kind: bytes) -> list[bytes]:
        return [payload for k, payload in self.records if k == kind]


@pytest.mark.parametrize("version", [b"RFB 003.008\n", b"RFB 003.007\n", b"RFB 003.003\n"])
def test_a_logged_in_session_is_recorded_from_server_init_on(version: bytes) -> None:
    """The tap is given the None handshake the relay played toward the viewer: it records the
    ServerInit and what follows, and follows the viewer's messages from there."""
    t = Tap()
    choice = b"" if version.endswith(b"3\n") else b"\x01"
    replay_handshake(t.tap, version + choice + b"\x01", SERVER_INIT)
    assert t.tap.recording and (t.tap.width, t.tap.height) == (WIDTH, HEIGHT)
    assert b"".join(t.kinds(SERVER)) == SERVER_INIT
    # The viewer's messages are read as messages now (a SetEncodings is restricted).
    assert t.tap.client_data(SET_ENCODINGS) == restrict_encodings(SET_ENCODINGS,
                                                                  STATELESS_ENCODINGS)


def test_the_server_gets_compressed_encodings_only_in_the_players_pixel_format() -> None:
    t = Tap()
    replay_handshake(t.tap, b"RFB 003.008\n\x01\x01", SERVER_INIT)
    set_pixel_format = b"\x00\x00\x00\x00" + NOVNC
    out = t.tap.client_data(set_pixel_format + SET_ENCODINGS)
    assert out == set_pixel_format + SET_ENCODINGS  # noVNC's format: all of it
    # A viewer that changes to a format the player converts: the server is told at once to
    # use only what can be converted (Raw, RRE, Hextile...), and back again.
    to_tigervnc = b"\x00\x00\x00\x00" + TIGERVNC
    stateless = restrict_encodings(SET_ENCODINGS, STATELESS_ENCODINGS)
    assert struct.unpack_from("!H", stateless, 2)[0] == 4  # Tight and ZRLE gone
    assert t.tap.client_data(to_tigervnc) == to_tigervnc + stateless
    assert t.tap.client_data(set_pixel_format) == set_pixel_format + SET_ENCODINGS
    assert t.tap.client_data(set_pixel_format) == set_pixel_format  # nothing changed


def compact(length: int) -> bytes:
    out = bytearray([length & 0x7F])
    if length > 0x7F:
        out[0] |= 0x80
        out.append((length >> 7) & 0x7F)
        if length > 0x3FFF:
            out[1] |= 0x80
            out.append(length >> 14)
    return bytes(out)


def rect(x: int, y: int, w: int, h: int, encoding: int) -> bytes:
    return struct.pack("!HHHHi", x, y, w, h, encoding)


def update(*rects: bytes) -> bytes:
    return struct.pack("!BxH", 0, len(rects)) + b"".join(rects)


def tight_fill() -> bytes:
    return rect(0, 0, WIDTH, HEIGHT, TIGHT) + b"\x80" + b"\xff\x00\x00"


def tight_jpeg(size: int) -> bytes:
    return rect(0, 0, WIDTH, HEIGHT, TIGHT) + b"\x90" + compact(size) + bytes(size)


def tight_palette(compressed: int) -> bytes:
    """Two colours (1 bit a pixel), zlib stream 1, with a filter byte."""
    return (rect(0, 0, WIDTH, HEIGHT // 2, TIGHT) + bytes([0x40 | 0x01, 1, 1])
            + b"\x00\x00\x00\xff\xff\xff" + compact(compressed) + bytes(compressed))


def tight_tiny() -> bytes:
    """A 2x1 copy-filter rectangle: 6 bytes, under 12, sent without zlib."""
    return rect(0, HEIGHT // 2, 2, 1, TIGHT) + b"\x00" + bytes(6)


def zrle(size: int) -> bytes:
    return rect(0, HEIGHT // 2, WIDTH, HEIGHT // 2, ZRLE) + struct.pack("!I", size) + bytes(size)


def keyframes(t: Tap) -> list[int]:
    return [json.loads(k)["offset"] for k in t.kinds(KEYFRAME)]


def server_stream(t: Tap, *messages: bytes, split: int) -> list[int]:
    """Feed `messages` split every `split` bytes; the offsets where each starts."""
    starts, stream = [], b""
    base = len(b"".join(t.kinds(SERVER)))
    for message in messages:
        starts.append(base + len(stream))
        stream += message
    for i in range(0, len(stream), split):
        t.tap.server_data(stream[i:i + split])
    return starts


@pytest.mark.parametrize("split", [1, 7, 4096])
def test_tight_and_zrle_are_measured_and_keyframes_stop_where_zlib_state_starts(
        split: int) -> None:
    t = Tap(keyframe_interval=0.0)
    replay_handshake(t.tap, b"RFB 003.008\n\x01\x01", SERVER_INIT)
    t.tap.client_data(b"\x00\x00\x00\x00" + NOVNC + SET_ENCODINGS)
    # Fill and JPEG (with a two-byte and a three-byte length) carry no state: keyframes.
    starts = server_stream(t, update(tight_fill()), update(tight_jpeg(300)),
                           update(tight_jpeg(20000)), update(tight_tiny()), split=split)
    assert keyframes(t) == starts[:3] and t.tap.following and not t.tap.stateful
    # The keyframe request goes after the viewer's next message while stateless...
    assert t.tap.client_data(FULL_REQUEST) == FULL_REQUEST + FULL_REQUEST
    # ... and then a palette rectangle feeds zlib stream 1: whole screens after it are not
    # keyframes any more, nor asked for.
    server_stream(t, update(tight_palette(40), tight_fill()), b"\x02",  # and a Bell
                  update(tight_fill()), split=split)
    assert keyframes(t) == starts[:3] and t.tap.stateful and t.tap.following
    assert t.tap.client_data(FULL_REQUEST) == FULL_REQUEST


def test_zrle_is_stateful_from_its_first_rectangle() -> None:
    t = Tap()
    replay_handshake(t.tap, b"RFB 003.008\n\x01\x01", SERVER_INIT)
    t.tap.client_data(b"\x00\x00\x00\x00" + NOVNC + SET_ENCODINGS)
    server_stream(t, update(tight_fill()), update(
        rect(0, 0, WIDTH, HEIGHT // 2, ZRLE) + struct.pack("!I", 5) + zlib.compress(b"")[:5],
        zrle(1000)), update(tight_fill()), split=3)
    assert len(keyframes(t)) == 1 and t.tap.stateful and t.tap.following


@pytest.mark.parametrize("split", [1, 1000, WIDTH * HEIGHT * 4 + 100])
def test_a_keyframe_is_stamped_no_earlier_than_the_last_byte_of_its_update(split: int) -> None:
    """A player that seeks to a keyframe's time feeds the `S` records stamped at or before it
    (static/novnc/playback.js `feedUntil`), and noVNC shows an update only at its end. So the
    `K` record must follow the `S` record holding the update's last byte: a `K` written
    first, in the same read, was stamped a millisecond before that `S` whenever the clock
    ticked in between (a busy machine), and a seek to it showed a black screen. Here every
    record is stamped one millisecond after the one before, as on such a machine."""
    stamped: list[tuple[bytes, int, bytes]] = []
    tap = RfbTap(lambda kind, payload: stamped.append((kind, len(stamped), payload)),
                 record_input=False, keyframe_interval=3600.0)
    replay_handshake(tap, b"RFB 003.008\n\x01\x01", SERVER_INIT)
    tap.client_data(b"\x00\x00\x00\x00" + NOVNC + struct.pack("!BxHi", 2, 1, RAW))
    # Xvnc sends a whole screen in Raw as several rectangles.
    halves = [rect(0, y, WIDTH, HEIGHT // 2, RAW) + bytes([y]) * (WIDTH * HEIGHT // 2 * 4)
              for y in (0, HEIGHT // 2)]
    whole = update(*halves)
    for i in range(0, len(whole), split):
        tap.server_data(whole[i:i + split])
    (keyframe,) = [(millis, json.loads(p)) for kind, millis, p in stamped if kind == KEYFRAME]
    millis, frame = keyframe
    fed = b"".join(p for kind, t, p in stamped if kind == SERVER and t <= millis)
    assert fed[frame["offset"]:] == whole
