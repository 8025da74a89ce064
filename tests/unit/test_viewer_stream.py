"""The view-only filter and the recording tap read the viewer's stream through one parser:
for the same bytes, split anywhere, they cut it into the same messages."""

from __future__ import annotations

import random
import struct

import pytest

from tests.unit.test_rfbfilter import (
    CONTINUOUS,
    CUT,
    CUT_EXTENDED,
    FENCE,
    KEY,
    PIXEL_FORMAT,
    POINTER,
    POINTER_EXTENDED,
    QEMU_KEY,
    RESIZE,
    SET_ENCODINGS,
    UPDATE,
    XVP_REBOOT,
)
from vncgate.relay.recording.capture import (
    CLIENT,
    STATELESS_ENCODINGS,
    RfbTap,
    restrict_encodings,
)
from vncgate.relay.rfb.viewerstream import ClientFilter, is_input

MESSAGES = [SET_ENCODINGS, UPDATE, KEY, POINTER, POINTER_EXTENDED, CUT, CUT_EXTENDED, FENCE,
            QEMU_KEY, XVP_REBOOT, RESIZE, CONTINUOUS, PIXEL_FORMAT]
RECORDED_INPUT = {KEY, POINTER, POINTER_EXTENDED, CUT, CUT_EXTENDED, QEMU_KEY}

WIDTH, HEIGHT = 64, 48
SERVER_INIT = struct.pack("!HH", WIDTH, HEIGHT) + bytes([32, 24, 0, 1]) + bytes(12) + bytes(4)
KEYFRAME_REQUEST = struct.pack("!BBHHHH", 3, 0, 0, 0, WIDTH, HEIGHT)

# (server greeting, viewer version, security): RFB 3.8 and 3.7 where the viewer chooses, 3.3
# where the server announces, None and VNC password.
HANDSHAKES = [(b"RFB 003.008\n", b"RFB 003.008\n", 1), (b"RFB 003.008\n", b"RFB 003.008\n", 2),
              (b"RFB 003.007\n", b"RFB 003.008\n", 1), (b"RFB 003.003\n", b"RFB 003.008\n", 2),
              (b"RFB 003.008\n", b"RFB 003.003\n", 1)]


def handshake(tap: RfbTap, filt: ClientFilter, greeting: bytes, version: bytes,
              security: int) -> bytes:
    """Both consumers through one handshake, the server's bytes between the viewer's as a real
    server sends them; returns the viewer's handshake bytes."""
    tap.server_greeting(greeting)
    filt.server_greeting(greeting)
    viewer = version
    assert tap.client_data(version) == filt.feed(version) == version
    minor = min(int(greeting[8:11]), int(version[8:11]))
    if minor == 3:
        announced = struct.pack("!I", security) + (bytes(16) if security == 2 else b"")
        tap.server_data(announced)
        filt.server_data(announced)
        parts = [(bytes(16) if security == 2 else b"") + b"\x01"]
        result = b"\0\0\0\0" if security == 2 else b""
    else:
        tap.server_data(bytes([1, security]))
        parts = [bytes([security])]
        if security == 2:
            parts.append(bytes(16) + b"\x01")  # the response, after the server's challenge
        else:
            parts[0] += b"\x01"
        result = b"\0\0\0\0" if security == 2 or minor == 8 else b""
    for n, part in enumerate(parts):
        if n:
            tap.server_data(bytes(16))  # the challenge
        viewer += part
        assert tap.client_data(part) == filt.feed(part) == part
    tap.server_data(result + SERVER_INIT)
    assert tap.recording and (tap.width, tap.height) == (WIDTH, HEIGHT)
    return viewer


@pytest.mark.parametrize("seed", range(40))
def test_filter_and_tap_cut_the_same_messages_at_any_split(seed: int) -> None:
    rng = random.Random(seed)  # noqa: S311 (reproducible splits, not secrets)
    greeting, version, security = HANDSHAKES[seed % len(HANDSHAKES)]
    messages = [rng.choice(MESSAGES) for _ in range(rng.randint(1, 60))]
    stream = b"".join(messages)
    cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 40))))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]

    records: list[bytes] = []
    # keyframe_interval 0: the tap asks for a keyframe at every boundary it sees, which shows
    # where it ends each message.
    tap = RfbTap(lambda kind, payload: records.append(payload) if kind == CLIENT else None,
                 record_input=True, keyframe_interval=0.0)
    view_only = ClientFilter(view_only=True)
    passing = ClientFilter(view_only=False)
    handshake(RfbTap(lambda kind, payload: None, record_input=False, keyframe_interval=0.0),
              passing, greeting, version, security)
    handshake(tap, view_only, greeting, version, security)

    tap_out = b"".join(tap.client_data(chunk) for chunk in chunks)
    dropping_out = b"".join(view_only.feed(chunk) for chunk in chunks)
    passing_out = b"".join(passing.feed(chunk) for chunk in chunks)

    # The tap: every message whole (SetEncodings restricted: the pixel formats here are not
    # the player's, so to the stateless encodings), a request after each one.
    assert tap_out == b"".join(
        (restrict_encodings(m, STATELESS_ENCODINGS) if m is SET_ENCODINGS else m)
        + KEYFRAME_REQUEST
        for m in messages)
    # The filters: input messages dropped whole, the rest passed whole.
    assert dropping_out == b"".join(m for m in messages if not is_input(m))
    assert view_only.dropped == sum(len(m) for m in messages if is_input(m))
    assert passing_out == stream
    # And they agree on what was input: the tap recorded exactly the dropped input it records.
    assert records == [m for m in messages if m in RECORDED_INPUT]
    assert all(is_input(m) for m in records)
