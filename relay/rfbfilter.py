"""The viewer-to-server half of RFB, parsed just enough to drop input and notice activity.

Used only for sessions that need it (view-only, or an idle timeout): a view-only viewer's key,
pointer, clipboard, power (xvp) and resize messages are dropped here, at the protocol level, so
a modified client cannot type into a console the page shows as view-only. Whole messages are
dropped, never parts, so the stream the server sees stays well-formed. Nothing is buffered but
a message header of at most 9 bytes; message bodies pass through or are skipped as they come.

The handshake is followed for the security types whose client side is known: None (1) and VNC
authentication (2). Any other type (TLS, VeNCrypt, RA2...) would hide the messages, so a
filtered session refuses it rather than pretend (`FilterError`).

The filter must read the stream exactly as the server does, or input can ride inside what it
takes for another message. So it accepts only the three ProtocolVersion forms of RFC 6143
(`RFB 003.003\n`, `RFB 003.007\n`, `RFB 003.008\n`), byte for byte, and follows the version
the two sides settle on: the lower of the server's greeting and the viewer's answer (a server
that greets 3.3 picks the security type itself, whatever the viewer claims). Anything else,
including Apple's 3.889 and servers greeting another version, ends a filtered session.
"""

from __future__ import annotations

import time

# Client-to-server message types (RFC 6143 and the extensions noVNC sends).
SET_PIXEL_FORMAT = 0
SET_ENCODINGS = 2
FRAMEBUFFER_UPDATE_REQUEST = 3
KEY_EVENT = 4
POINTER_EVENT = 5
CLIENT_CUT_TEXT = 6
ENABLE_CONTINUOUS_UPDATES = 150
CLIENT_FENCE = 248
XVP = 250
SET_DESKTOP_SIZE = 251
QEMU = 255
QEMU_EXTENDED_KEY = 0
QEMU_AUDIO = 1

# Messages that act on the remote computer: dropped for view-only viewers, and what counts as
# activity for the idle timeout. (Update requests and fences flow all the time; they do not.)
INPUT_TYPES = frozenset({KEY_EVENT, POINTER_EVENT, CLIENT_CUT_TEXT, XVP, SET_DESKTOP_SIZE})

SECURITY_NONE = 1
SECURITY_VNC = 2
# The only ProtocolVersion messages a filtered session accepts, and the minor version of each.
VERSIONS = {b"RFB 003.003\n": 3, b"RFB 003.007\n": 7, b"RFB 003.008\n": 8}
_HANDSHAKE_LENGTHS = {"version": 12, "choice": 1, "vnc-auth": 16, "client-init": 1}


class FilterError(Exception):
    """The stream cannot be followed; the session must end (the message says why)."""


def message_length(header: bytes | bytearray) -> int | None:
    """Total length of the message starting with `header`; None while more header is needed."""
    kind = header[0]
    if kind == SET_PIXEL_FORMAT:
        return 20
    if kind in (FRAMEBUFFER_UPDATE_REQUEST, ENABLE_CONTINUOUS_UPDATES):
        return 10
    if kind == KEY_EVENT:
        return 8
    if kind == XVP:
        return 4
    if kind == POINTER_EVENT:  # the marker bit announces one more byte of buttons
        return None if len(header) < 2 else (7 if header[1] & 0x80 else 6)
    if kind == SET_ENCODINGS:
        return None if len(header) < 4 else 4 + 4 * int.from_bytes(header[2:4], "big")
    if kind == CLIENT_CUT_TEXT:  # a negative length is the extended clipboard's
        if len(header) < 8:
            return None
        return 8 + abs(int.from_bytes(header[4:8], "big", signed=True))
    if kind == CLIENT_FENCE:
        return None if len(header) < 9 else 9 + header[8]
    if kind == SET_DESKTOP_SIZE:
        return None if len(header) < 8 else 8 + 16 * header[6]
    if kind == QEMU:
        if len(header) < 2:
            return None
        if header[1] == QEMU_EXTENDED_KEY:
            return 12
        if header[1] == QEMU_AUDIO:
            if len(header) < 4:
                return None
            return 10 if int.from_bytes(header[2:4], "big") == 2 else 4
    raise FilterError(f"client message type {kind} is not one the relay can check")


def is_input(header: bytes | bytearray) -> bool:
    return header[0] in INPUT_TYPES or (header[0] == QEMU and header[1] == QEMU_EXTENDED_KEY)


class ClientFilter:
    """Feed it what the viewer sends; it returns what may go to the VNC server."""

    def __init__(self, view_only: bool) -> None:
        self.view_only = view_only
        self.last_input = time.monotonic()
        self.dropped = 0
        self._state = "version"
        self._minor = 8
        self._header = bytearray()
        self._remaining = 0
        self._forward = True
        self._server_type: int | None = None  # RFB 3.3: the server picks the security type
        self._server_bytes = bytearray()
        self._server_minor: int | None = None  # from the server's greeting (`server_greeting`)
        self._server_greeting = ""

    def server_greeting(self, greeting: bytes) -> None:
        """The server's 12-byte ProtocolVersion, before any of the viewer's bytes are fed."""
        self._server_minor = VERSIONS.get(greeting)
        self._server_greeting = greeting.decode("ascii", "replace").strip()

    @property
    def needs_server_bytes(self) -> bool:
        """RFB 3.3 only: the security type comes from the server, so peek at its stream."""
        return self._minor == 3 and self._server_type is None

    def server_data(self, data: bytes | memoryview) -> None:
        """Server-to-viewer bytes after the 12-byte greeting, while `needs_server_bytes`."""
        self._server_bytes += data[: 4 - len(self._server_bytes)]
        if len(self._server_bytes) == 4:
            self._server_type = int.from_bytes(self._server_bytes, "big")

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        view = memoryview(data)
        i, end = 0, len(data)
        while i < end:
            if self._remaining:
                n = min(self._remaining, end - i)
                if self._forward:
                    out += view[i:i + n]
                else:
                    self.dropped += n
                self._remaining -= n
                i += n
                continue
            self._header.append(data[i])
            i += 1
            if self._state != "messages":
                self._handshake_step(out)
                continue
            total = message_length(self._header)
            if total is None:
                continue
            header, self._header = self._header, bytearray()
            if is_input(header):
                self.last_input = time.monotonic()
                self._forward = not self.view_only
            else:
                self._forward = True
            if self._forward:
                out += header
            else:
                self.dropped += len(header)
            self._remaining = total - len(header)
        return bytes(out)

    def _handshake_step(self, out: bytearray) -> None:
        if self._state == "await-server":
            # RFB 3.3: the server announced the security type before the viewer could answer,
            # and the server pump has shown it to us by now.
            if self._server_type is None:
                raise FilterError("the viewer answered before the server chose security")
            self._after_security(self._server_type)
        if len(self._header) < _HANDSHAKE_LENGTHS[self._state]:
            return
        part, self._header = bytes(self._header), bytearray()
        out += part
        if self._state == "version":
            minor = VERSIONS.get(part)
            if minor is None:
                raise FilterError(
                    f"the viewer sent RFB version {part!r}; this relay accepts exactly "
                    "'RFB 003.003', 'RFB 003.007' or 'RFB 003.008' on this console")
            if self._server_minor is None:
                raise FilterError(
                    f"the VNC server greets with {self._server_greeting or 'no version'!r}; "
                    "view-only and idle timeouts need RFB 3.3, 3.7 or 3.8")
            self._minor = min(minor, self._server_minor)
            self._state = "await-server" if self._minor == 3 else "choice"
        elif self._state == "choice":
            self._after_security(part[0])
        elif self._state == "vnc-auth":
            self._state = "client-init"
        elif self._state == "client-init":
            self._state = "messages"

    def _after_security(self, security_type: int) -> None:
        if security_type == SECURITY_NONE:
            self._state = "client-init"
        elif security_type == SECURITY_VNC:
            self._state = "vnc-auth"
        else:
            raise FilterError(
                f"the VNC server uses security type {security_type}; view-only and idle "
                "timeouts need security None or VNC password, whose messages the relay can see")
