"""The viewer-to-server half of RFB, parsed just enough to drop input and notice activity.

`ViewerStream` is the one parser of that stream: the handshake and where each message starts
and ends. The view-only filter (`ClientFilter`, here) and the recording tap
(relay/recording/capture.py) both read the viewer through it, so they cannot disagree.

The filter is used only for sessions that need it (view-only, or an idle timeout): a view-only
viewer's key, pointer, clipboard, power (xvp) and resize messages are dropped here, at the
protocol level, so a modified client cannot type into a console the page shows as view-only.
Whole messages are dropped, never parts, so the stream the server sees stays well-formed.
Nothing is buffered but a handshake part or message header of at most 16 bytes, and a
SetEncodings (at most 256 KiB) to remove ExtendedMouseButtons from it; other message bodies
pass through or are skipped as they come.

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
from collections.abc import Iterator

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
    if kind == POINTER_EVENT:
        # Always 6: a server reads a seventh byte of buttons (the 0x80 marker) only from a
        # viewer that announced the ExtendedMouseButtons pseudo-encoding (TigerVNC's
        # SMsgReader::readPointerEvent), and the relay removes that one from every SetEncodings
        # it follows (`without_extended_mouse`), so no server reads 7 where the relay reads 6.
        return 6
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


# The pseudo-encoding that makes a server read PointerEvents of 7 bytes when their button mask
# has the 0x80 marker (TigerVNC 1.15 and later; noVNC announces it).
EXTENDED_MOUSE_BUTTONS = -316


def without_extended_mouse(message: bytes | bytearray) -> bytes:
    """A whole SetEncodings message without ExtendedMouseButtons, in the viewer's order."""
    count = int.from_bytes(message[2:4], "big")
    kept = [message[4 + 4 * i:8 + 4 * i] for i in range(count)
            if int.from_bytes(message[4 + 4 * i:8 + 4 * i], "big", signed=True)
            != EXTENDED_MOUSE_BUTTONS]
    return bytes([SET_ENCODINGS, 0]) + len(kept).to_bytes(2, "big") + b"".join(kept)


def is_input(header: bytes | bytearray | memoryview) -> bool:
    return header[0] in INPUT_TYPES or (header[0] == QEMU and header[1] == QEMU_EXTENDED_KEY)


# What `ViewerStream.split` yields, in stream order: a whole handshake part (version, security
# choice, VNC-auth response, ClientInit), a message's whole header (with the message's total
# length), a slice of its body, and its end.
HANDSHAKE_PART, MESSAGE_HEADER, MESSAGE_BODY, MESSAGE_END = range(4)
Piece = tuple[int, bytes | bytearray | memoryview, int]


class ViewerStream:
    """The viewer-to-server stream cut where the server cuts it: the one parser of it.

    Every consumer that must know where the viewer's messages start (the view-only filter,
    the recording tap) reads them through this class, so no two copies of the handshake can
    fall out of step with the server or with each other. `needs` names the consumer in
    errors ("view-only and idle timeouts need").
    """

    def __init__(self, needs: str) -> None:
        self.needs = needs
        self.state = "version"
        self.minor = 8  # the version both sides settled on, once the viewer answered
        # The security type: the viewer's choice (3.7, 3.8) or the server's announcement (3.3).
        self.security: int | None = None
        self.server_minor: int | None = None  # from the server's greeting (`server_greeting`)
        self._server_greeting = ""
        self._server_bytes = bytearray()
        self._header = bytearray()
        self._remaining = 0

    def server_greeting(self, greeting: bytes) -> None:
        """The server's 12-byte ProtocolVersion, before any of the viewer's bytes are fed."""
        self.server_minor = VERSIONS.get(greeting)
        self._server_greeting = greeting.decode("ascii", "replace").strip()

    @property
    def needs_server_security(self) -> bool:
        """RFB 3.3 only: the security type comes from the server, not from the viewer."""
        return self.minor == 3 and self.security is None

    def server_security(self, data: bytes | memoryview) -> None:
        """RFB 3.3: server-to-viewer bytes after the greeting, while `needs_server_security`."""
        self._server_bytes += data[: 4 - len(self._server_bytes)]
        if len(self._server_bytes) == 4:
            self.security = int.from_bytes(self._server_bytes, "big")

    def split(self, data: bytes) -> Iterator[Piece]:
        """The pieces of `data`, whatever its split; raises FilterError where the stream
        cannot be followed. Nothing is buffered but a header of at most 16 bytes."""
        view = memoryview(data)
        i, end = 0, len(data)
        while i < end:
            if self._remaining:
                n = min(self._remaining, end - i)
                self._remaining -= n
                yield MESSAGE_BODY, view[i:i + n], 0
                i += n
                if not self._remaining:
                    yield MESSAGE_END, b"", 0
                continue
            self._header.append(data[i])
            i += 1
            if self.state != "messages":
                part = self._handshake_step()
                if part is not None:
                    yield HANDSHAKE_PART, part, len(part)
                continue
            total = message_length(self._header)
            if total is None:
                continue
            header, self._header = self._header, bytearray()
            self._remaining = total - len(header)
            yield MESSAGE_HEADER, header, total
            if not self._remaining:
                yield MESSAGE_END, b"", 0

    def _handshake_step(self) -> bytes | None:
        if self.state == "await-server":
            # RFB 3.3: the server announced the security type before the viewer could answer,
            # and the server pump has shown it to us by now.
            if self.security is None:
                raise FilterError("the viewer answered before the server chose security")
            self._after_security(self.security)
        if len(self._header) < _HANDSHAKE_LENGTHS[self.state]:
            return None
        part, self._header = bytes(self._header), bytearray()
        if self.state == "version":
            minor = VERSIONS.get(part)
            if minor is None:
                raise FilterError(
                    f"the viewer sent RFB version {part!r}; this relay accepts exactly "
                    "'RFB 003.003', 'RFB 003.007' or 'RFB 003.008' on this console")
            if self.server_minor is None:
                raise FilterError(
                    f"the VNC server greets with {self._server_greeting or 'no version'!r}; "
                    f"{self.needs} RFB 3.3, 3.7 or 3.8")
            self.minor = min(minor, self.server_minor)
            self.state = "await-server" if self.minor == 3 else "choice"
        elif self.state == "choice":
            self.security = part[0]
            self._after_security(part[0])
        elif self.state == "vnc-auth":
            self.state = "client-init"
        elif self.state == "client-init":
            self.state = "messages"
        return part

    def _after_security(self, security_type: int) -> None:
        if security_type == SECURITY_NONE:
            self.state = "client-init"
        elif security_type == SECURITY_VNC:
            self.state = "vnc-auth"
        else:
            raise FilterError(
                f"the VNC server uses security type {security_type}; {self.needs} security "
                "None or VNC password, whose messages the relay can see")


class ClientFilter:
    """Feed it what the viewer sends; it returns what may go to the VNC server."""

    def __init__(self, view_only: bool) -> None:
        self.view_only = view_only
        self.last_input = time.monotonic()
        self.dropped = 0
        self.stream = ViewerStream("view-only and idle timeouts need")
        self._forward = True
        self._encodings: bytearray | None = None  # a SetEncodings, kept whole to be rewritten

    def server_greeting(self, greeting: bytes) -> None:
        """The server's 12-byte ProtocolVersion, before any of the viewer's bytes are fed."""
        self.stream.server_greeting(greeting)

    @property
    def needs_server_bytes(self) -> bool:
        """RFB 3.3 only: the security type comes from the server, so peek at its stream."""
        return self.stream.needs_server_security

    def server_data(self, data: bytes | memoryview) -> None:
        """Server-to-viewer bytes after the 12-byte greeting, while `needs_server_bytes`."""
        self.stream.server_security(data)

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        for piece, chunk, _total in self.stream.split(data):
            if self._encodings is not None:
                if piece == MESSAGE_BODY:
                    self._encodings += chunk
                else:  # its end
                    out += without_extended_mouse(self._encodings)
                    self._encodings = None
                continue
            if piece == MESSAGE_HEADER and chunk[0] == SET_ENCODINGS:
                self._encodings = bytearray(chunk)
                continue
            if piece == MESSAGE_HEADER:
                if is_input(chunk):
                    self.last_input = time.monotonic()
                    self._forward = not self.view_only
                else:
                    self._forward = True
            elif piece == HANDSHAKE_PART:
                out += chunk
                continue
            elif piece == MESSAGE_END:
                continue
            if self._forward:
                out += chunk
            else:
                self.dropped += len(chunk)
        return bytes(out)
