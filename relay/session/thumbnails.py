"""Thumbnails for the console list: a small JPEG of a console's screen, made by the relay.

Opt-in per target (`spec.thumbnail.enabled`). The relay connects as one more shared viewer
(ClientInit shared, through the same address checks and the same login as a session), asks
for 32-bit true colour in Raw, reads one full-screen update, reduces it with Pillow and hangs
up. A thumbnail is kept 30 s: however many lists are open, a console is looked at at most twice
a minute, and only while someone lists it (thumbnails are made on request, never on a timer).
Never for exclusive consoles (an extra viewer on a console that promises one is not harmless)
nor KubeVirt consoles (KubeVirt keeps one VNC connection per VM: a second one would take it
from its viewer). VeNCrypt (`spec.tls`) consoles log in as a session does (`rfb.security.login`:
TLS with the target's CA and server name, then the update over it). A failure is kept 10 minutes: a
server that asks for a password the relay does not have counts each such connection towards
its lock-out (TigerVNC: five), so it is not asked again soon.
"""

from __future__ import annotations

import asyncio
import io
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from vncgate.common.model import Route
from vncgate.relay import closecodes
from vncgate.relay.rfb.security import SecurityRefused, UpstreamLogin, login, open_stream
from vncgate.relay.session.bridge import SessionRefused, tcp_dialer
from vncgate.relay.session.health import TargetHealth
from vncgate.relay.session.serversecrets import CredentialStore
from vncgate.relay.settings import RelaySettings

KEEP_SECONDS = 30.0
KEEP_FAILURE_SECONDS = 600.0
SIZE = (320, 240)
MAX_PIXELS = 4096 * 4096  # a larger screen is refused before its pixels are read
CONCURRENCY = 2
# SetPixelFormat: 32 bits per pixel, depth 24, little-endian, true colour, 8 bits per channel
# at shifts 16/8/0, so each pixel arrives as the bytes B, G, R, X.
SET_PIXEL_FORMAT = struct.pack(">B3xBBBBHHHBBB3x", 0, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
SET_ENCODINGS_RAW = struct.pack(">BxHi", 2, 1, 0)


class NoThumbnail(Exception):
    """Why a console has no thumbnail, in words for the list; `code`: the close code a session
    would have got, when the reason is about the server (the list's status learns from it)."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True, slots=True)
class Thumbnail:
    jpeg: bytes
    at: float
    width: int  # the screen's size
    height: int
    server_version: str = ""


def refusal(route: Route) -> str | None:
    """Why `route` never gets a thumbnail; None: it may."""
    if not route.thumbnail:
        return "thumbnails are off for this console (spec.thumbnail.enabled)"
    if route.kubevirt is not None:
        return "KubeVirt consoles take one viewer at a time: no thumbnail"
    if route.sessions.exclusive:
        return "an exclusive console gets no extra viewer: no thumbnail"
    return None


async def grab(route: Route, settings: RelaySettings, creds: UpstreamLogin) -> Thumbnail:
    """Connect, log in as a shared viewer, read one full Raw update, reduce it."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(settings.connect_timeout * 2):
            dial = await tcp_dialer(route, settings)
            reader, writer = await open_stream(dial)
            greeting = await reader.readexactly(12)
            if not greeting.startswith(b"RFB "):
                raise NoThumbnail("not a VNC server (no RFB greeting)")
            server_init = await login(reader, writer, greeting, creds, route.key)
            width, height = struct.unpack(">HH", server_init[:4])
            if not width or not height or width * height > MAX_PIXELS:
                raise NoThumbnail(f"the screen is {width}x{height}")
            writer.write(SET_PIXEL_FORMAT + SET_ENCODINGS_RAW +
                         struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))
            pixels = await _read_update(reader, width, height)
    except (SecurityRefused, SessionRefused) as exc:
        raise NoThumbnail(exc.reason, exc.code) from None
    except TimeoutError:
        raise NoThumbnail(f"the VNC server of {route.key} did not answer in time",
                          closecodes.UPSTREAM_TIMEOUT) from None
    except ConnectionRefusedError:
        raise NoThumbnail(f"the VNC server of {route.key} refused the connection; is it "
                          "running?", closecodes.BAD_UPSTREAM) from None
    except (OSError, asyncio.IncompleteReadError) as exc:
        raise NoThumbnail(f"the connection failed: {exc}") from None
    finally:
        if writer is not None:
            writer.transport.abort()
    jpeg = await asyncio.to_thread(_reduce, pixels, width, height)
    return Thumbnail(jpeg, time.time(), width, height,
                     greeting[:-1].decode("ascii", "replace"))


async def _read_update(reader: asyncio.StreamReader, width: int, height: int) -> bytearray:
    """The screen from the first FramebufferUpdate (other server messages are skipped)."""
    frame = bytearray(width * height * 4)
    while True:
        kind = (await reader.readexactly(1))[0]
        if kind == 0:
            break
        if kind == 1:  # SetColourMapEntries (not used in true colour, but legal)
            _, _, count = struct.unpack(">xHH", await reader.readexactly(5))
            await reader.readexactly(6 * count)
        elif kind == 2:  # Bell
            continue
        elif kind == 3:  # ServerCutText
            length = struct.unpack(">3xI", await reader.readexactly(7))[0]
            await reader.readexactly(min(length, 1 << 20))
        else:
            raise NoThumbnail(f"the server sent message type {kind} before the screen")
    rects = struct.unpack(">xH", await reader.readexactly(3))[0]
    for _ in range(rects):
        x, y, w, h, encoding = struct.unpack(">HHHHi", await reader.readexactly(12))
        if encoding != 0:
            raise NoThumbnail(f"the server answered Raw with encoding {encoding}")
        if x + w > width or y + h > height:
            raise NoThumbnail("the server sent a rectangle outside its screen")
        row = w * 4
        data = await reader.readexactly(row * h)
        for line in range(h):
            start = ((y + line) * width + x) * 4
            frame[start:start + row] = data[line * row:(line + 1) * row]
    return frame


def _reduce(pixels: bytearray, width: int, height: int) -> bytes:
    image = Image.frombuffer("RGB", (width, height), bytes(pixels), "raw", "BGRX", 0, 1)
    image.thumbnail(SIZE, Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=70)
    return out.getvalue()


class Thumbnails:
    """Thumbnails by target key: kept 30 s (failures 10 minutes), one grab per key at a time,
    at most two at once; forgotten when the route goes or changes."""

    def __init__(self, settings: RelaySettings, logins: CredentialStore,
                 health: TargetHealth | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.logins = logins
        self.health = health
        self.clock = clock
        self._kept: dict[str, tuple[float, Thumbnail | NoThumbnail]] = {}
        self._pending: dict[str, asyncio.Future[Thumbnail]] = {}
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self.grabs = 0

    def forget(self, key: str) -> None:
        self._kept.pop(key, None)

    async def get(self, route: Route) -> Thumbnail:
        """The route's thumbnail, or NoThumbnail saying why."""
        why = refusal(route)
        if why is not None:
            raise NoThumbnail(why)
        kept = self._kept.get(route.key)
        if kept is not None and kept[0] > self.clock():
            if isinstance(kept[1], NoThumbnail):
                raise kept[1]
            return kept[1]
        pending = self._pending.get(route.key)
        if pending is None:
            pending = asyncio.ensure_future(self._make(route))
            self._pending[route.key] = pending
            pending.add_done_callback(lambda _: self._pending.pop(route.key, None))
        return await asyncio.shield(pending)

    async def _make(self, route: Route) -> Thumbnail:
        async with self._slots:
            self.grabs += 1
            try:
                creds = (await self.logins.login_for(route)
                         if route.credentials is not None or route.tls is not None
                         else UpstreamLogin())
                thumbnail = await grab(route, self.settings, creds)
            except SecurityRefused as exc:  # the credential could not be read
                failure = NoThumbnail(exc.reason)
            except NoThumbnail as exc:
                failure = exc
            else:
                self._kept[route.key] = (self.clock() + KEEP_SECONDS, thumbnail)
                if self.health is not None:  # what the grab found is news for the status too
                    self.health.connected(route.key, thumbnail.server_version)
                return thumbnail
        self._kept[route.key] = (self.clock() + KEEP_FAILURE_SECONDS, failure)
        if self.health is not None and failure.code is not None:
            self.health.failed(route.key, failure.code, str(failure))
        raise failure
