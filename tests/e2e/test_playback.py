"""Playback in a real browser: a session recorded against Xvnc while its screen changes (red,
then green, then a drawn rectangle), replayed by noVNC from the file; seeking through keyframes;
recordings hidden from who may not see them."""

from __future__ import annotations

import asyncio
import gzip
import json
import struct
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Page
from Xlib import X
from Xlib import display as xdisplay

from harness.xvnc import XvncServer
from tests.conftest import ARTIFACTS, RelayFactory
from tests.e2e.test_viewer import wait_for_pixel
from tests.relay.test_upstream_security import PASSWORD as PASSWORD_OF_THE_SERVER
from tests.relay.test_upstream_security import (  # noqa: F401 - module-scoped fixtures
    secrets_dir,
    vncauth_xvnc,
)
from tests.support.rfbclient import WsStream, viewer_handshake
from vncgate.common.model import Route
from vncgate.common.spec import Access, Credentials, RecordingPolicy
from vncgate.relay.access.passwords import hash_secret
from vncgate.relay.access.users import User
from vncgate.relay.recording.capture import (
    END,
    HEADER,
    KEYFRAME,
    MAGIC,
    PIXEL_FORMAT,
    SERVER,
    Record,
    RfbTap,
    encode_record,
    read_records,
    replay_handshake,
)
from vncgate.relay.recording.store import RecordingSettings, list_recordings
from vncgate.relay.settings import AuthSettings

PASSWORD = "a browser-typed password"
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
RECT = (100, 100, 200, 150)  # x, y, width, height: away from the centre
IN_RECT = (200, 175)
TIGHT, ZRLE = 7, 16
VIEWER_HANDSHAKE = b"RFB 003.008\n\x01\x01"  # version, security None, ClientInit shared
# noVNC's pixel format: 32 bits, depth 24, little-endian true colour, red in the lowest byte
NOVNC_FORMAT = struct.pack("!BBBBHHHBBBxxx", 32, 24, 0, 1, 255, 255, 255, 0, 8, 16)

PIXEL_AT = """([x, y]) => {
  const canvas = document.querySelector('#screen canvas');
  if (!canvas || !canvas.width) return null;
  return Array.from(canvas.getContext('2d').getImageData(x, y, 1, 1).data.slice(0, 3));
}"""


def draw_rectangle(display: int) -> None:
    """A blue rectangle drawn on the root window with python-xlib (an application's window
    would do the same to the framebuffer)."""
    conn = xdisplay.Display(f":{display}")
    try:
        screen = conn.screen()
        colour = screen.default_colormap.alloc_color(0, 0, 65535)
        gc = screen.root.create_gc(foreground=colour.pixel, subwindow_mode=X.IncludeInferiors)
        screen.root.fill_rectangle(gc, *RECT)
        conn.sync()
    finally:
        conn.close()


def records(directory: Path) -> list[Record]:
    files = sorted(directory.rglob("*.vncrec"))
    return list(read_records(files[0])) if files else []


async def wait_records(directory: Path, done: Any, what: str, timeout: float = 30,
                       viewer: Page | None = None) -> list[Record]:
    """The records once `done(records)`. With `viewer`, its pointer moves meanwhile: the relay
    asks for a keyframe at a boundary between two viewer messages, and a still screen with a
    still viewer sends none (docs/RECORDING.md)."""
    until = time.monotonic() + timeout
    found: list[Record] = []
    step = 0
    while time.monotonic() < until:
        found = await asyncio.to_thread(records, directory)
        if found and done(found):
            return found
        if viewer is not None:
            step += 1
            await viewer.mouse.move(300 + 40 * (step % 2), 400)
        await asyncio.sleep(0.1)
    raise AssertionError(f"the recording never had {what}; it has "
                         f"{sorted({r.kind for r in found})}")


async def wait_pixel_at(page: Page, xy: tuple[int, int], rgb: tuple[int, int, int],
                        timeout: float = 60) -> None:
    last = None
    try:
        async with asyncio.timeout(timeout):
            while (last := await page.evaluate(PIXEL_AT, list(xy))) != list(rgb):
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"pixel {xy} is {last}, expected {list(rgb)}") from None


async def sign_in(page: Page, base: str, user: str, next_path: str) -> None:
    await page.goto(f"{base}/login?next={next_path}")
    await page.fill("input[name=user]", user)
    await page.fill("input[name=password]", PASSWORD)
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{base}/{next_path}", timeout=60_000)


async def seek(page: Page, millis: int) -> dict[str, Any]:
    await page.evaluate("(ms) => window.vncgatePlayback.seek(ms)", millis)
    stats: dict[str, Any] = await page.evaluate(
        "() => { const {seek, ...rest} = window.vncgatePlayback; return rest; }")
    return stats


def keyframe_ms(found: list[Record]) -> list[int]:
    return [r.millis for r in found if r.kind == KEYFRAME]


async def test_record_then_play_back_seek_and_hide_from_others(
        make_relay: RelayFactory, xvnc: XvncServer, browser: Browser, tmp_path: Path) -> None:
    routes = [Route("lab", "rec", "127.0.0.1", xvnc.port, access=Access(users=("alice",)),
                    recording=RecordingPolicy(enabled=True))]
    auth = AuthSettings(mode="token", session_secret=b"p" * 32,
                        users={"alice": User("alice", hash_secret(PASSWORD)),
                               "bob": User("bob", hash_secret(PASSWORD))})
    recording = RecordingSettings(directory=tmp_path, keyframe_interval=1.0)
    async with make_relay(routes=routes, auth=auth, recording=recording) as relay:
        base = relay.public_url
        alice = await browser.new_context()
        bob = await browser.new_context()
        try:
            # --- record: red, then green, then a rectangle, with keyframes in between ---
            xvnc.paint("#ff0000")
            live = await alice.new_page()
            await sign_in(live, base, "alice", "t/lab/rec/")
            await live.wait_for_selector("body[data-state=connected]", timeout=60_000)
            await wait_for_pixel(live, RED)
            # Every time below is read from the recording, in its own clock: the test's clock
            # and the recording's differ by however long the session took to start (seconds,
            # on a busy machine), so a time measured here could land before its first keyframe.
            # A keyframe on disk before the paint is red; one written after the viewer saw a
            # change shows it, since records are written in the order the relay passes them.
            found = await wait_records(tmp_path, lambda f: len(keyframe_ms(f)) >= 3,
                                       "three keyframes", viewer=live)
            before_green = keyframe_ms(found)[-1]
            # ... and the screen the keyframe asked for, before the screen changes.
            await wait_records(tmp_path, lambda f: any(
                r.kind == SERVER and r.millis > before_green for r in f),
                "the update after the keyframe", viewer=live)
            xvnc.paint("#00ff00")
            await wait_for_pixel(live, GREEN)
            seen = len(keyframe_ms(await asyncio.to_thread(records, tmp_path)))
            found = await wait_records(tmp_path, lambda f: len(keyframe_ms(f)) > seen,
                                       "a keyframe after the viewer saw green", viewer=live)
            green_seen = keyframe_ms(found)[seen]
            await asyncio.to_thread(draw_rectangle, xvnc.display)
            await wait_pixel_at(live, IN_RECT, BLUE)
            seen = len(keyframe_ms(await asyncio.to_thread(records, tmp_path)))
            await wait_records(tmp_path, lambda f: len(keyframe_ms(f)) >= seen + 2,
                               "two keyframes after the rectangle", viewer=live)
            await live.close()
            found = await wait_records(tmp_path, lambda f: f[-1].kind == END, "its end")
            header = found[0].json()
            recording_id = next(r["id"] for r in await asyncio.to_thread(
                lambda: [s.to_json() for s in list_recordings(tmp_path)])
                if r["user"] == header["user"])

            # --- the list and the player, as alice ---
            page = await alice.new_page()
            await page.goto(f"{base}/recordings/")
            await page.click(f"tr[data-id='{recording_id}'] a")
            await page.wait_for_url(f"{base}/recordings/{recording_id}/", timeout=60_000)
            await page.wait_for_function("() => window.vncgatePlayback?.ready", timeout=60_000)
            assert await page.text_content("#who") == "alice"
            stats = await seek(page, before_green)
            await wait_for_pixel(page, RED)
            assert stats["startedFrom"] == "keyframe"
            assert "/" in (await page.text_content("#time") or "")
            stats = await seek(page, green_seen)
            await wait_for_pixel(page, GREEN)
            assert stats["startedFrom"] == "keyframe"

            # Play from before the change at 8 times the speed: the screen turns green by itself.
            await seek(page, before_green)
            await wait_for_pixel(page, RED)
            await page.select_option("#speed", "8")
            await page.click("#play")
            await page.wait_for_selector("body[data-state=playing]", timeout=5_000)
            await wait_for_pixel(page, GREEN)
            # Pause, unless the player got to the end first (the rest of the recording is a
            # few seconds, under a second at x8: a busy machine's test may take longer); Play
            # after the end would start again from 0. One task of the page: the player's clock
            # cannot run between the look and the click.
            await page.evaluate("() => { if (document.body.dataset.state === 'playing') "
                                "document.getElementById('play').click(); }")
            await page.wait_for_selector("body[data-state=paused]", timeout=5_000)

            # Seek to the end: a fresh noVNC at the last keyframe, fed only what follows it.
            # From the start: play may have fed past that keyframe, and a seek forward over no
            # keyframe feeds on instead of starting afresh.
            await seek(page, 0)
            stats = await seek(page, stats["duration"])
            await wait_for_pixel(page, GREEN)
            await wait_pixel_at(page, IN_RECT, BLUE)
            server = [r for r in found if r.kind == SERVER]
            keyframes = [r.json() for r in found if r.kind == KEYFRAME]
            assert stats["startedFrom"] == "keyframe"
            assert stats["keyframe"] == len(keyframes) - 1 > 0
            assert stats["records"] == len(server)
            offset, ends = keyframes[-1]["offset"], 0
            expected = 0
            for record in server:
                ends += len(record.payload)
                expected += ends > offset
            assert stats["fed"] == expected < len(server)
            await page.screenshot(path=str(ARTIFACTS / "playback-end.png"))
            missing = await page.goto(f"{base}/recordings/lab/rec/20990101T000000Z-0a/")
            assert missing is not None and missing.status == 404

            # --- bob may not see alice's console, nor its recordings ---
            other = await bob.new_page()
            await sign_in(other, base, "bob", "recordings/")
            assert recording_id not in await other.content()
            assert "No recordings you may see" in await other.content()
            for suffix in ("/", "/file"):
                response = await other.goto(f"{base}/recordings/{recording_id}{suffix}")
                assert response is not None and response.status == 403
                assert "bob is not in the access list of lab/rec" in await response.text()
        finally:
            await alice.close()
            await bob.close()


# RFC 6143 7.4 PIXEL_FORMAT: 32 bits, depth 24, little-endian, true colour, 8 bits a channel,
# with red at `shifts[0]`: TigerVNC's vncviewer asks for red 16, green 8, blue 0 (its rgb888);
# noVNC for 0, 8, 16.
def set_pixel_format(shifts: tuple[int, int, int]) -> bytes:
    return struct.pack("!BxxxBBBBHHHBBBxxx", 0, 32, 24, 0, 1, 255, 255, 255, *shifts)


async def record_a_native_viewer(relay_url: str, directory: Path, xvnc: XvncServer,
                                 shifts: tuple[int, int, int]) -> bytes:
    """A scripted viewer through the relay: its SetPixelFormat, a whole screen of red in Raw,
    then of blue in Hextile (Xvnc sends solid tiles: one background pixel each); returns the
    centre pixel's 4 bytes of the red screen as the server sent them."""
    async with aiohttp.ClientSession() as http, http.ws_connect(
            f"{relay_url}/t/lab/native/websockify", protocols=("binary",)) as ws:
        stream, init = await viewer_handshake(ws)
        whole = struct.pack("!BBHHHH", 3, 0, 0, 0, init.width, init.height)
        await ws.send_bytes(set_pixel_format(shifts) + struct.pack("!BxHi", 2, 1, 0) + whole)
        kind, _, count = struct.unpack("!BBH", await stream.read(4))
        assert kind == 0
        cx, cy, centre = init.width // 2, init.height // 2, b""
        for _ in range(count):  # Raw rectangles (Xvnc sends the screen in several)
            x, y, w, h, encoding = struct.unpack("!HHHHi", await stream.read(12))
            assert encoding == 0
            pixels = await stream.read(w * h * 4)
            if x <= cx < x + w and y <= cy < y + h:
                at = ((cy - y) * w + cx - x) * 4
                centre = pixels[at:at + 4]
        await wait_records(directory, lambda f: len(keyframe_ms(f)) >= 1, "a red keyframe")
        xvnc.paint("#0000ff")
        await ws.send_bytes(struct.pack("!BxHi", 2, 1, 5) + whole)  # Hextile
        await wait_records(directory, lambda f: len(keyframe_ms(f)) >= 2, "a blue keyframe")
        return centre


def as_format_1(path: Path) -> None:
    """The file as a relay before pixel formats were recorded wrote it: version 1, no `P`."""
    kept = [r for r in read_records(path) if r.kind != PIXEL_FORMAT]
    header = {**kept[0].json(), "format": 1}
    kept[0] = Record(HEADER, kept[0].millis, json.dumps(header).encode())
    path.write_bytes(gzip.compress(MAGIC + bytes([1]) + b"".join(
        encode_record(r.kind, r.millis, r.payload) for r in kept)))


@pytest.mark.parametrize(("viewer", "shifts", "red_bytes"), [
    ("tigervnc", (16, 8, 0), b"\x00\x00\xff\x00"),
    ("novnc-format-1", (0, 8, 16), b"\xff\x00\x00\x00"),
])
async def test_a_recording_plays_in_the_colours_of_its_viewers_pixel_format(
        make_relay: RelayFactory, xvnc: XvncServer, browser: Browser, tmp_path: Path,
        viewer: str, shifts: tuple[int, int, int], red_bytes: bytes) -> None:
    """A native viewer's pixel format (TigerVNC's rgb888: blue in the lowest byte) is recorded
    and the player converts it: red plays red, blue blue, from Raw and from Hextile, from a
    keyframe. A file of format 1 (noVNC's format, nothing recorded about it) still plays."""
    xvnc.paint("#ff0000")
    route = Route("lab", "native", "127.0.0.1", xvnc.port,
                  recording=RecordingPolicy(enabled=True))
    try:
        async with make_relay(routes=[route],
                              recording=RecordingSettings(directory=tmp_path)) as relay:
            assert await record_a_native_viewer(relay.public_url, tmp_path, xvnc,
                                                shifts) == red_bytes
            found = await wait_records(tmp_path, lambda f: f[-1].kind == END, "its end")
            (pixel_format,) = [r.json() for r in found if r.kind == PIXEL_FORMAT]
            assert (pixel_format["redShift"], pixel_format["blueShift"]) == (shifts[0],
                                                                             shifts[2])
            red_at, blue_at = keyframe_ms(found)[:2]
            (path,) = await asyncio.to_thread(lambda: list(tmp_path.rglob("*.vncrec")))
            if viewer == "novnc-format-1":
                await asyncio.to_thread(as_format_1, path)
            (listed,) = await asyncio.to_thread(lambda: [s.to_json() for s in
                                                         list_recordings(tmp_path)])
            page = await browser.new_page()
            try:
                await page.goto(f"{relay.public_url}/recordings/{listed['id']}/")
                await page.wait_for_function("() => window.vncgatePlayback?.ready",
                                             timeout=60_000)
                stats = await seek(page, red_at)
                await wait_for_pixel(page, RED)
                stats = await seek(page, stats["duration"])
                await wait_for_pixel(page, BLUE)
                assert stats["startedFrom"] == "keyframe" and stats["keyframe"] >= 1, stats
                assert blue_at <= stats["position"]
                assert stats["converted"] is (viewer == "tigervnc"), stats
                assert stats["conversion"] == "", stats
                await page.screenshot(path=str(ARTIFACTS / f"playback-{viewer}.png"))
            finally:
                await page.close()
    finally:
        xvnc.paint("#ff0000")


def followed(found: list[Record]) -> RfbTap:
    """The recorded server stream read again by the relay's own parser (what encodings, how
    many updates)."""
    tap = RfbTap(lambda kind, payload: None, record_input=False, keyframe_interval=3600.0)
    replay_handshake(tap, VIEWER_HANDSHAKE, b"".join(r.payload for r in found
                                                     if r.kind == SERVER))
    return tap


async def open_player(page: Page, base: str, directory: Path) -> dict[str, Any]:
    (listed,) = await asyncio.to_thread(lambda: [s.to_json() for s in
                                                 list_recordings(directory)])
    await page.goto(f"{base}/recordings/{listed['id']}/")
    await page.wait_for_function("() => window.vncgatePlayback?.ready", timeout=60_000)
    return await seek(page, 0)


async def test_a_credentials_target_recorded_with_tight_plays_back_with_seek(
        make_relay: RelayFactory, vncauth_xvnc: XvncServer, secrets_dir: Path,  # noqa: F811
        browser: Browser, tmp_path: Path) -> None:
    """The relay logs in to a VncAuth Xvnc for noVNC, which asks for Tight as it always does;
    the session is recorded and plays back: a seek before the change shows red, the end
    green. The recording has Tight rectangles and no byte of the password."""
    route = Route("lab", "bmc", "127.0.0.1", vncauth_xvnc.port,
                  credentials=Credentials(password_file=str(secrets_dir / "password")),
                  recording=RecordingPolicy(enabled=True))
    recording = RecordingSettings(directory=tmp_path, keyframe_interval=1.0)
    vncauth_xvnc.paint("#ff0000")
    try:
        async with make_relay(routes=[route], recording=recording) as relay:
            live = await browser.new_page()
            try:
                await live.goto(f"{relay.public_url}/t/lab/bmc/")
                await live.wait_for_selector("body[data-state=connected]", timeout=60_000)
                await wait_for_pixel(live, RED)
                found = await wait_records(tmp_path, lambda f: len(keyframe_ms(f)) >= 2,
                                           "two keyframes", viewer=live)
                before_green = keyframe_ms(found)[-1]
                await wait_records(tmp_path, lambda f: any(
                    r.kind == SERVER and r.millis > before_green for r in f),
                    "the update after the keyframe", viewer=live)
                vncauth_xvnc.paint("#00ff00")
                await wait_for_pixel(live, GREEN)
                seen = len(keyframe_ms(await asyncio.to_thread(records, tmp_path)))
                await wait_records(tmp_path, lambda f: len(keyframe_ms(f)) > seen,
                                   "a keyframe after the viewer saw green", viewer=live)
            finally:
                await live.close()
            found = await wait_records(tmp_path, lambda f: f[-1].kind == END, "its end")
            assert TIGHT in followed(found).rectangles, followed(found).rectangles
            (path,) = await asyncio.to_thread(lambda: list(tmp_path.rglob("*.vncrec")))
            assert PASSWORD_OF_THE_SERVER[:8].encode() not in gzip.decompress(
                path.read_bytes())

            page = await browser.new_page()
            try:
                await open_player(page, relay.public_url, tmp_path)
                stats = await seek(page, before_green)
                await wait_for_pixel(page, RED)
                assert stats["startedFrom"] == "keyframe", stats
                stats = await seek(page, stats["duration"])
                await wait_for_pixel(page, GREEN)
                stats = await seek(page, before_green)  # and back
                await wait_for_pixel(page, RED)
                await page.screenshot(path=str(ARTIFACTS / "playback-credentials.png"))
            finally:
                await page.close()
    finally:
        vncauth_xvnc.paint("#ff0000")


async def zrle_viewer_update(ws: aiohttp.ClientWebSocketResponse, stream: WsStream,
                             tap: RfbTap, width: int, height: int) -> None:
    """Ask for the whole screen and read until the update is all there (followed by the
    relay's own parser: ZRLE is measured by its lengths)."""
    done = tap.updates
    await ws.send_bytes(struct.pack("!BBHHHH", 3, 0, 0, 0, width, height))
    while tap.updates == done:
        data, stream.buffer = stream.buffer, b""
        tap.server_data(data or await ws.receive_bytes(timeout=20))


async def test_a_zrle_recording_seeks_by_replaying_from_the_start(
        make_relay: RelayFactory, xvnc: XvncServer, browser: Browser, tmp_path: Path) -> None:
    """A viewer that asks for ZRLE only, in noVNC's pixel format: the relay keeps it, and marks
    no keyframe (ZRLE's zlib stream runs from the first rectangle). The player seeks anyway,
    by replaying from the start without delays: backward to red, forward to green."""
    route = Route("lab", "zrle", "127.0.0.1", xvnc.port, recording=RecordingPolicy(enabled=True))
    xvnc.paint("#ff0000")
    try:
        # (No keyframe request from the relay meanwhile: each update here is the one asked.)
        async with make_relay(routes=[route], recording=RecordingSettings(
                directory=tmp_path, keyframe_interval=3600.0)) as relay:
            async with aiohttp.ClientSession() as http, http.ws_connect(
                    f"{relay.public_url}/t/lab/zrle/websockify", protocols=("binary",)) as ws:
                stream, init = await viewer_handshake(ws)
                name = init.name.encode()
                tap = RfbTap(lambda kind, payload: None, record_input=False,
                             keyframe_interval=3600.0)
                replay_handshake(tap, VIEWER_HANDSHAKE, struct.pack(
                    "!HH", init.width, init.height) + NOVNC_FORMAT + struct.pack(
                    "!I", len(name)) + name)
                await ws.send_bytes(b"\x00\x00\x00\x00" + NOVNC_FORMAT
                                    + struct.pack("!BxHii", 2, 2, ZRLE, 0))
                await zrle_viewer_update(ws, stream, tap, init.width, init.height)
                red = await wait_records(tmp_path, lambda f: sum(
                    len(r.payload) for r in f if r.kind == SERVER) >= tap.offset,
                    "the red update")
                red_at = max(r.millis for r in red if r.kind == SERVER)
                xvnc.paint("#00ff00")
                await zrle_viewer_update(ws, stream, tap, init.width, init.height)
                assert set(tap.rectangles) == {ZRLE}, tap.rectangles
            found = await wait_records(tmp_path, lambda f: f[-1].kind == END, "its end")
            assert not keyframe_ms(found)
            assert set(followed(found).rectangles) == {ZRLE}

            page = await browser.new_page()
            try:
                stats = await open_player(page, relay.public_url, tmp_path)
                assert stats["keyframes"] == 0, stats
                stats = await seek(page, stats["duration"])
                await wait_for_pixel(page, GREEN)
                restarts = stats["restarts"]
                stats = await seek(page, red_at)  # backward: from the start, fed up to red_at
                await wait_for_pixel(page, RED)
                assert stats["startedFrom"] == "start" and stats["restarts"] == restarts + 1
                stats = await seek(page, stats["duration"])  # forward: fed on
                await wait_for_pixel(page, GREEN)
                assert stats["restarts"] == restarts + 1, stats
                await page.screenshot(path=str(ARTIFACTS / "playback-zrle.png"))
            finally:
                await page.close()
    finally:
        xvnc.paint("#ff0000")
