"""The view-only filter: input dropped whole, everything else passed, any split of the stream."""

from __future__ import annotations

import struct

import pytest

from vncgate.relay.rfb.viewerstream import ClientFilter, FilterError

HANDSHAKE = b"RFB 003.008\n" + b"\x01" + b"\x01"  # version, security None, ClientInit shared
SET_ENCODINGS = struct.pack("!BxH3i", 2, 3, 0, 7, -223)
UPDATE = struct.pack("!BBHHHH", 3, 1, 0, 0, 800, 600)
KEY = struct.pack("!BBxxI", 4, 1, 0x61)
POINTER = struct.pack("!BBHH", 5, 1, 100, 200)
# The 0x80 marker of ExtendedMouseButtons: still 6 bytes, as servers read it when the viewer did
# not announce that pseudo-encoding (the relay takes it out of every SetEncodings it follows).
POINTER_EXTENDED = struct.pack("!BBHH", 5, 0x81, 100, 200)
CUT = struct.pack("!Bxxxi", 6, 5) + b"hello"
CUT_EXTENDED = struct.pack("!Bxxxi", 6, -4) + b"\x01\x00\x00\x01"
FENCE = struct.pack("!BxxxIB", 248, 0, 3) + b"abc"
QEMU_KEY = struct.pack("!BBHII", 255, 0, 1, 0x61, 30)
XVP_REBOOT = struct.pack("!BxBB", 250, 1, 3)
RESIZE = struct.pack("!BxHHBx", 251, 1024, 768, 1) + bytes(16)
CONTINUOUS = struct.pack("!BBHHHH", 150, 1, 0, 0, 800, 600)
PIXEL_FORMAT = bytes([0]) + bytes(19)

PASSIVE = [SET_ENCODINGS, UPDATE, FENCE, CONTINUOUS, PIXEL_FORMAT]
INPUT = [KEY, POINTER, POINTER_EXTENDED, CUT, CUT_EXTENDED, QEMU_KEY, XVP_REBOOT, RESIZE]


def make(view_only: bool, greeting: bytes = b"RFB 003.008\n") -> ClientFilter:
    """A filter after the server's greeting, as the session makes it."""
    filt = ClientFilter(view_only=view_only)
    filt.server_greeting(greeting)
    return filt


def run(filt: ClientFilter, stream: bytes, chunk: int) -> bytes:
    return b"".join(filt.feed(stream[i:i + chunk]) for i in range(0, len(stream), chunk))


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_view_only_drops_every_input_message_and_nothing_else(chunk: int) -> None:
    stream = HANDSHAKE + b"".join(m for pair in zip(PASSIVE * 2, INPUT, strict=False)
                                  for m in pair)
    expected = HANDSHAKE + b"".join(PASSIVE * 2)[: len(b"".join(PASSIVE * 2))]
    filt = make(view_only=True)
    out = run(filt, stream, chunk)
    kept = [m for pair in zip(PASSIVE * 2, INPUT, strict=False) for m in pair if m in PASSIVE]
    assert out == HANDSHAKE + b"".join(kept)
    assert filt.dropped == len(stream) - len(out)
    assert expected.startswith(HANDSHAKE)


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_interactive_passes_everything_and_notes_input_time(chunk: int) -> None:
    stream = HANDSHAKE + b"".join(PASSIVE + INPUT)
    filt = make(view_only=False)
    before = filt.last_input
    assert run(filt, stream, chunk) == stream
    assert filt.last_input >= before


def test_update_requests_are_not_activity() -> None:
    filt = make(view_only=False)
    filt.feed(HANDSHAKE)
    filt.last_input = 0.0
    filt.feed(UPDATE * 10 + FENCE)
    assert filt.last_input == 0.0
    filt.feed(POINTER)
    assert filt.last_input > 0.0


def test_vnc_password_handshake_is_followed() -> None:
    filt = make(view_only=True)
    stream = b"RFB 003.008\n" + b"\x02" + bytes(16) + b"\x01" + KEY + UPDATE
    assert filt.feed(stream) == b"RFB 003.008\n" + b"\x02" + bytes(16) + b"\x01" + UPDATE


def test_rfb_33_takes_the_security_type_from_the_server() -> None:
    filt = make(view_only=True)
    assert filt.feed(b"RFB 003.003\n") == b"RFB 003.003\n"
    assert filt.needs_server_bytes
    filt.server_data(struct.pack("!I", 2) + bytes(16))  # VNC auth and its challenge
    assert not filt.needs_server_bytes
    assert filt.feed(bytes(16) + b"\x01" + KEY + UPDATE) == bytes(16) + b"\x01" + UPDATE


@pytest.mark.parametrize("security", [18, 19, 5, 16])
def test_security_types_that_hide_messages_are_refused(security: int) -> None:
    with pytest.raises(FilterError, match=f"security type {security}"):
        make(view_only=True).feed(b"RFB 003.008\n" + bytes([security]))


def test_unknown_message_types_end_the_session() -> None:
    filt = make(view_only=True)
    filt.feed(HANDSHAKE)
    with pytest.raises(FilterError, match="type 99"):
        filt.feed(b"\x63" + bytes(10))


@pytest.mark.parametrize("version", [b"RFB 003.3  \n", b"RFB 003.8\x00\x00\n", b"RFB 003.889\n",
                                     b"RFB 004.001\n", b"rfb 003.008\n", b"RFB 003.010\n"])
def test_only_the_exact_versions_are_accepted(version: bytes) -> None:
    with pytest.raises(FilterError, match="accepts exactly"):
        make(view_only=True).feed(version)


def test_a_server_greeting_33_decides_whatever_the_viewer_claims() -> None:
    filt = make(view_only=True, greeting=b"RFB 003.003\n")
    assert filt.feed(b"RFB 003.008\n") == b"RFB 003.008\n"
    assert filt.needs_server_bytes  # the server picks the security type
    filt.server_data(struct.pack("!I", 1))
    assert filt.feed(b"\x01" + KEY + UPDATE) == b"\x01" + UPDATE


@pytest.mark.parametrize("greeting", [b"RFB 003.889\n", b"RFB 003.005\n", b"RFB 004.000\n"])
def test_servers_of_other_versions_are_refused(greeting: bytes) -> None:
    with pytest.raises(FilterError, match=r"view-only and idle timeouts need RFB 3\.3"):
        make(view_only=True, greeting=greeting).feed(b"RFB 003.008\n")


def test_without_the_server_greeting_nothing_passes() -> None:
    with pytest.raises(FilterError):
        ClientFilter(view_only=True).feed(b"RFB 003.008\n")
