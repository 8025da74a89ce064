"""Recording sessions against a real Xvnc through the relay: header, keyframes, input, endings."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from Xlib import X
from Xlib import display as xdisplay

from harness.waiting import eventually
from harness.xvnc import XvncServer
from tests.conftest import RelayFactory
from tests.support.rfbclient import WsStream, viewer_handshake
from vncgate.common.model import Route
from vncgate.common.spec import RecordingPolicy
from vncgate.relay.recording.capture import (
    CLIENT,
    END,
    HEADER,
    KEYFRAME,
    SERVER,
    Record,
    RfbTap,
    read_records,
    replay_handshake,
)
from vncgate.relay.recording.capture import PIXEL_FORMAT as PIXEL_FORMAT_RECORD
from vncgate.relay.recording.store import RecordingSettings

KEY_A_DOWN = struct.pack("!BBxxI", 4, 1, 0x61)
KEY_A_UP = struct.pack("!BBxxI", 4, 0, 0x61)
TIGHT, ZRLE, RAW, COPYRECT, HEXTILE = 7, 16, 0, 1, 5
# TigerVNC vncviewer's pixel format: 32 bits per pixel, depth 24, little-endian true colour,
# blue in the lowest byte (noVNC's has red there).
PIXEL_FORMAT = struct.pack("!BxxxBBBBHHHBBBxxx", 0, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)


async def handshake(ws: aiohttp.ClientWebSocketResponse) -> WsStream:
    stream, _ = await viewer_handshake(ws)
    encodings = (TIGHT, ZRLE, HEXTILE, COPYRECT, RAW)
    await ws.send_bytes(PIXEL_FORMAT + struct.pack(f"!BxH{len(encodings)}i", 2, len(encodings),
                                                   *encodings)
                        + struct.pack("!BBHHHH", 3, 0, 0, 0, 800, 600))
    return stream


def records_of(directory: Path) -> tuple[Path, list[Record]]:
    files = sorted(directory.rglob("*.vncrec"))
    assert len(files) == 1, f"expected one recording, found {files}"
    return files[0], list(read_records(files[0]))


async def poll_records(directory: Path, kind: bytes, deadline: float = 10.0) -> list[Record]:
    """The records once one of `kind` is on disk (the writer flushes after each burst)."""
    async def found() -> list[Record] | None:
        records = await asyncio.to_thread(_first_records, directory)
        return records if any(r.kind == kind for r in records) else None
    return await eventually(found, f"a {kind!r} record in {directory}", timeout=deadline)


def _first_records(directory: Path) -> list[Record]:
    files = sorted(directory.rglob("*.vncrec"))
    return list(read_records(files[0])) if files else []


def stream_of(records: list[Record]) -> bytes:
    return b"".join(r.payload for r in records if r.kind == SERVER)


async def record_session(make_relay: RelayFactory, xvnc: XvncServer, directory: Path,
                         policy: RecordingPolicy) -> list[Record]:
    route = Route("lab", "xvnc", "127.0.0.1", xvnc.port, recording=policy)
    async with make_relay(routes=[route], recording=RecordingSettings(directory=directory)) \
            as relay, aiohttp.ClientSession() as http, \
            http.ws_connect(f"{relay.public_url}/t/lab/xvnc/websockify",
                            protocols=("binary",)) as ws:
        stream = await handshake(ws)
        await poll_records(directory, KEYFRAME)  # the full update of the first request
        await ws.send_bytes(KEY_A_DOWN + KEY_A_UP)
        await ws.send_bytes(struct.pack("!BBHH", 5, 0, 10, 20))
        await ws.send_bytes(struct.pack("!BBHHHH", 3, 1, 0, 0, 800, 600))
        await stream.ws.receive_bytes(timeout=5)  # the relay is still relaying
        await ws.close()
    _, records = records_of(directory)
    return records


async def test_recording_has_header_stream_keyframe_and_end_without_input(
        make_relay: RelayFactory, xvnc: XvncServer, tmp_path: Path) -> None:
    records = await record_session(make_relay, xvnc, tmp_path, RecordingPolicy(enabled=True))
    assert records[0].kind == HEADER
    header = records[0].json()
    assert header["namespace"] == "lab" and header["name"] == "xvnc"
    assert header["format"] == 2 and header["input"] is False
    assert header["serverVersion"] == "RFB 003.008" and header["started"]
    stream = stream_of(records)
    # Recorded from ServerInit: no greeting, no security handshake.
    assert struct.unpack_from("!HH", stream) == (800, 600)
    keyframes = [r.json() for r in records if r.kind == KEYFRAME]
    assert keyframes and keyframes[0]["width"] == 800
    assert stream[keyframes[0]["offset"]] == 0  # a FramebufferUpdate starts there
    # The viewer's whole pixel format, and where in the stream it took effect (before any
    # update: the viewer sent it before asking for one).
    (pixel_format,) = [r.json() for r in records if r.kind == PIXEL_FORMAT_RECORD]
    assert pixel_format == {
        "offset": 24 + struct.unpack_from("!I", stream, 20)[0], "bitsPerPixel": 32,
        "depth": 24, "bigEndian": False, "trueColour": True, "redMax": 255, "greenMax": 255,
        "blueMax": 255, "redShift": 16, "greenShift": 8, "blueShift": 0}
    # Input off: no client records, and the typed key is nowhere in the file.
    assert not [r for r in records if r.kind == CLIENT]
    assert KEY_A_DOWN not in b"".join(r.payload for r in records)
    assert records[-1].kind == END
    end = records[-1].json()
    assert end["complete"] is True and end["code"] in (1000, 1005)
    assert end["reason"] == "the viewer closed the connection"


async def test_recording_with_input_holds_the_typed_keys(
        make_relay: RelayFactory, xvnc: XvncServer, tmp_path: Path) -> None:
    records = await record_session(make_relay, xvnc, tmp_path,
                                   RecordingPolicy(enabled=True, input=True))
    assert records[0].json()["input"] is True
    client = [r.payload for r in records if r.kind == CLIENT]
    assert KEY_A_DOWN in client and KEY_A_UP in client
    assert struct.pack("!BBHH", 5, 0, 10, 20) in client
    # Update requests and encodings are not input: not recorded.
    assert all(payload[0] in (4, 5, 6) for payload in client)


async def test_a_viewer_in_a_converted_pixel_format_gets_only_stateless_encodings(
        make_relay: RelayFactory, xvnc: XvncServer, tmp_path: Path) -> None:
    """The viewer (TigerVNC's pixel format, not noVNC's) asked for Tight and ZRLE first; the
    player converts only Raw, RRE and Hextile pixels, so none came, and keyframes did."""
    records = await record_session(make_relay, xvnc, tmp_path, RecordingPolicy(enabled=True))
    keyframes = [r.json() for r in records if r.kind == KEYFRAME]
    assert keyframes
    encodings = rect_encodings(stream_of(records))
    assert encodings and encodings <= {RAW, COPYRECT, HEXTILE, 2}, encodings


def photo(width: int, height: int) -> bytes:
    """A gradient with noise, 32 bits a pixel (BGRX): what Tight compresses with zlib."""
    rng = random.Random(31)  # noqa: S311 - the same picture every run, not a secret
    return bytes(v for y in range(height) for x in range(width)
                 for v in ((x * 3 + rng.randrange(16)) & 0xFF, (y * 5) & 0xFF,
                           (x + y + rng.randrange(16)) & 0xFF, 0))


def put_photo(display: int) -> None:
    conn = xdisplay.Display(f":{display}")
    try:
        root = conn.screen().root
        gc = root.create_gc(subwindow_mode=X.IncludeInferiors)
        root.put_image(gc, 100, 100, 120, 90, X.ZPixmap, 24, 0, photo(120, 90))
        conn.sync()
    finally:
        conn.close()


async def test_a_novnc_viewer_keeps_tight_and_keyframes_stop_where_zlib_starts(
        make_relay: RelayFactory, tmp_path: Path) -> None:
    """noVNC's pixel format and Tight first: the relay keeps Tight. A solid screen comes as
    Tight fills, which need nothing earlier: keyframes, and the relay asks for more. A photo
    comes through Tight's zlib streams: from there no keyframe, and no more asked for."""
    novnc = struct.pack("!BxxxBBBBHHHBBBxxx", 0, 32, 24, 0, 1, 255, 255, 255, 0, 8, 16)
    with XvncServer(colour="#204080") as xvnc:
        route = Route("lab", "tight", "127.0.0.1", xvnc.port,
                      recording=RecordingPolicy(enabled=True))
        async with make_relay(routes=[route], recording=RecordingSettings(
                directory=tmp_path, keyframe_interval=0.2)) as relay, \
                aiohttp.ClientSession() as http, \
                http.ws_connect(f"{relay.public_url}/t/lab/tight/websockify",
                                protocols=("binary",)) as ws:
            await viewer_handshake(ws)
            encodings = (TIGHT, ZRLE, HEXTILE, COPYRECT, RAW)
            await ws.send_bytes(novnc + struct.pack(f"!BxH{len(encodings)}i", 2,
                                                    len(encodings), *encodings))

            async def keyframes(count: int) -> list[Record] | None:
                # an incremental request now and then: a boundary for the relay's own request
                await ws.send_bytes(struct.pack("!BBHHHH", 3, 1, 0, 0, 800, 600))
                found = await asyncio.to_thread(_first_records, tmp_path)
                return found if sum(r.kind == KEYFRAME for r in found) >= count else None
            await eventually(lambda: keyframes(2), "two keyframes of Tight fills", timeout=20)
            await asyncio.to_thread(put_photo, xvnc.display)

            async def stateful() -> list[Record] | None:
                await ws.send_bytes(struct.pack("!BBHHHH", 3, 1, 0, 0, 800, 600))
                found = await asyncio.to_thread(_first_records, tmp_path)
                tap = followed(found)
                return found if tap.stateful else None
            found = await eventually(stateful, "the photo's zlib-compressed rectangle",
                                     timeout=20)
            marked = sum(r.kind == KEYFRAME for r in found)
            updates = followed(found).updates
            # Requests go on (a boundary each), the screen changes no more: whole-screen
            # updates would come every 0.2 s if the relay still asked for them.
            for _ in range(10):
                await ws.send_bytes(struct.pack("!BBHHHH", 3, 1, 0, 0, 800, 600))
                await asyncio.sleep(0.1)
            await ws.close()
    _, records = records_of(tmp_path)
    tap = followed(records)
    assert set(tap.rectangles) - {-224, -239, -308, -258} == {TIGHT}, tap.rectangles
    assert tap.following and tap.stateful
    assert sum(r.kind == KEYFRAME for r in records) == marked
    assert tap.updates - updates <= 1, (tap.updates, updates)  # at most one asked before


def followed(records: list[Record]) -> RfbTap:
    """A recorded stream read again by the relay's own parser."""
    tap = RfbTap(lambda kind, payload: None, record_input=False, keyframe_interval=3600.0)
    replay_handshake(tap, b"RFB 003.008\n\x01\x01", stream_of(records))
    return tap


def rect_encodings(stream: bytes) -> set[int]:
    """The encodings of every rectangle in a recorded stream (32 bits per pixel)."""
    # Walk the stream: ServerInit, then messages (only FramebufferUpdates come in these tests).
    seen: set[int] = set()
    (name_length,) = struct.unpack_from("!I", stream, 20)
    i = 24 + name_length
    while i < len(stream):
        kind = stream[i]
        assert kind == 0, f"message type {kind} at {i}"
        (count,) = struct.unpack_from("!H", stream, i + 2)
        i += 4
        for _ in range(count):
            _x, _y, w, h, encoding = struct.unpack_from("!HHHHi", stream, i)
            i += 12
            seen.add(encoding)
            if encoding == RAW:
                i += w * h * 4
            elif encoding == COPYRECT:
                i += 4
            elif encoding == HEXTILE:
                i = skip_hextile(stream, i, w, h)
            else:
                return seen | {encoding}
    return seen


def skip_hextile(stream: bytes, i: int, w: int, h: int) -> int:
    for ty in range(0, h, 16):
        for tx in range(0, w, 16):
            tw, th = min(16, w - tx), min(16, h - ty)
            sub = stream[i]
            i += 1
            if sub & 1:
                i += tw * th * 4
                continue
            i += (4 if sub & 2 else 0) + (4 if sub & 4 else 0)
            if sub & 8:
                n = stream[i]
                i += 1 + n * ((4 if sub & 16 else 0) + 2)
    return i


def test_read_records_of_a_file_cut_short(tmp_path: Path) -> None:
    """A crash or a full disk cuts a file anywhere: the reader yields the whole records."""
    import zlib

    from vncgate.relay.recording.capture import FORMAT_VERSION, MAGIC, encode_record

    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    body = compressor.compress(MAGIC + bytes([FORMAT_VERSION]))
    body += compressor.compress(encode_record(HEADER, 0, json.dumps({"a": 1}).encode()))
    body += compressor.compress(encode_record(SERVER, 5, b"x" * 1000))
    body += compressor.flush(zlib.Z_SYNC_FLUSH)
    cut = len(body)
    body += compressor.compress(encode_record(SERVER, 9, b"y" * 5000))
    body += compressor.flush(zlib.Z_FINISH)
    path = tmp_path / "cut.vncrec"
    path.write_bytes(body[: cut + 20])
    records = list(read_records(path))
    assert [(r.kind, r.millis) for r in records] == [(HEADER, 0), (SERVER, 5)]
    path.write_bytes(body)
    assert [r.millis for r in read_records(path)] == [0, 5, 9]


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs, filled up: the next write on it fails with ENOSPC."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root: mounting a tmpfs must work")
        pytest.skip("mounting a tmpfs needs root; run as root to test a full disk")
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):
            for _ in range(1000):  # bounded: 64 KiB is full after 16 writes
                os.write(fd, b"\0" * 4096)
        os.close(fd)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_full_disk_cuts_the_recording_and_the_session_goes_on(
        make_relay: RelayFactory, xvnc: XvncServer, tiny_tmpfs: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    route = Route("lab", "xvnc", "127.0.0.1", xvnc.port, recording=RecordingPolicy(enabled=True))
    async with make_relay(routes=[route], recording=RecordingSettings(directory=tiny_tmpfs)) \
            as relay, aiohttp.ClientSession() as http:
        registry = relay.state.metrics.registry
        async with http.ws_connect(f"{relay.public_url}/t/lab/xvnc/websockify",
                                   protocols=("binary",)) as ws:
            stream = await handshake(ws)
            async def reported() -> bool:
                if registry.get_sample_value("vncgate_recordings_incomplete_total",
                                             {"reason": "error"}) == 1.0:
                    return True
                # Each request draws an update: records keep coming, the failure is seen.
                await ws.send_bytes(struct.pack("!BBHHHH", 3, 0, 0, 0, 800, 600))
                await stream.ws.receive_bytes(timeout=5)
                return False
            await eventually(reported, "the full disk reported", timeout=10, interval=0)
            # The session goes on: the server still answers through the relay.
            await ws.send_bytes(struct.pack("!BBHHHH", 3, 0, 0, 0, 8, 8))
            assert await stream.ws.receive_bytes(timeout=5)
        # And the relay takes new sessions.
        async with http.ws_connect(f"{relay.public_url}/t/lab/xvnc/websockify",
                                   protocols=("binary",)) as ws:
            assert await WsStream(ws).read(12) == b"RFB 003.008\n"
    lines = [r for r in caplog.records if r.getMessage() == "recording-incomplete"]
    assert lines, "no audit line for the cut recording"
    assert "No space left on device" in lines[0].fields["reason"]  # type: ignore[attr-defined]


async def test_a_disk_that_does_not_keep_up_holds_the_session_back_not_the_recording(
        make_relay: RelayFactory, xvnc: XvncServer, tmp_path: Path) -> None:
    """A writer that cannot keep up: a queue of 64 bytes is over at the first update. The
    session waits for the disk, as for a slow browser; the recording is whole."""
    route = Route("lab", "xvnc", "127.0.0.1", xvnc.port, recording=RecordingPolicy(enabled=True))
    async with make_relay(routes=[route], recording=RecordingSettings(
            directory=tmp_path, queue_bytes=64)) as relay, aiohttp.ClientSession() as http:
        registry = relay.state.metrics.registry
        async with http.ws_connect(f"{relay.public_url}/t/lab/xvnc/websockify",
                                   protocols=("binary",)) as ws:
            stream = await handshake(ws)
            await stream.ws.receive_bytes(timeout=5)
            await ws.send_bytes(struct.pack("!BBHHHH", 3, 0, 0, 0, 8, 8))
            assert await stream.ws.receive_bytes(timeout=5)
        assert not registry.get_sample_value("vncgate_recordings_incomplete_total",
                                             {"reason": "queue"})
    _, records = records_of(tmp_path)
    assert records[-1].kind == END and records[-1].json()["complete"] is True


async def test_recordings_command_lists_exports_and_deletes(
        make_relay: RelayFactory, xvnc: XvncServer, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from vncgate.relay.cli import main

    await record_session(make_relay, xvnc, tmp_path, RecordingPolicy(enabled=True))
    path, _ = records_of(tmp_path)
    assert main(["recordings", "--recording-dir", str(tmp_path), "list", "--json"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    listed = json.loads(line)
    assert listed["id"].startswith("lab/xvnc/") and listed["state"] == "complete"
    assert listed["keyframes"] >= 1 and listed["end"]["reason"]
    exported = tmp_path / "copy.vncrec"
    assert main(["recordings", "--recording-dir", str(tmp_path), "export", listed["id"],
                 "-o", str(exported)]) == 0
    assert exported.read_bytes() == path.read_bytes()
    with pytest.raises(SystemExit):  # not an id: no path tricks
        main(["recordings", "--recording-dir", str(tmp_path), "export", "../../etc/passwd"])
    assert main(["recordings", "--recording-dir", str(tmp_path), "delete", listed["id"]]) == 0
    assert not path.exists()
    assert main(["recordings", "--recording-dir", str(tmp_path), "delete", listed["id"]]) == 1


def test_retention_by_age_then_by_total_size(tmp_path: Path) -> None:
    from vncgate.relay.recording.store import apply_retention

    now = time.time()
    files = []
    for index, (age, size) in enumerate([(40 * 86400, 100), (3 * 86400, 300), (86400, 300),
                                         (60, 300)]):
        path = tmp_path / "lab" / "desk" / f"2025010{index}T000000Z-{index:02x}.vncrec"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * size)
        os.utime(path, (now - age, now - age))
        files.append(path)
    removed = apply_retention(tmp_path, max_age=30 * 86400, max_total=700, now=now,
                              keep=frozenset({files[1]}))
    # The 40-day-old one by age; then 900 bytes > 700: the oldest not being written goes.
    assert removed == [files[0], files[2]]
    assert files[1].exists() and files[3].exists()


async def test_summaries_are_read_once_per_version_of_a_file(
        make_relay: RelayFactory, xvnc: XvncServer, tmp_path: Path) -> None:
    """The recordings page summarizes every visible file; a file is read again only when its
    size or modification time changed, and forgotten when it is gone."""
    from vncgate.relay.recording.store import SummaryCache, summarize

    await record_session(make_relay, xvnc, tmp_path, RecordingPolicy(enabled=True))
    path, _ = records_of(tmp_path)
    cache = SummaryCache(max_entries=2)
    first = cache.summary(tmp_path, path)
    assert first == summarize(tmp_path, path) and first.state == "complete"
    assert cache.summary(tmp_path, path) is first and cache.reads == 1
    # A file that changed (here: a copy of its records, as a file being written grows).
    grown = path.with_name("20250101T000000Z-00.vncrec")
    grown.write_bytes(path.read_bytes()[:-40])
    assert cache.summary(tmp_path, grown).state == "open or cut"
    grown.write_bytes(path.read_bytes())
    assert cache.summary(tmp_path, grown).state == "complete" and cache.reads == 3
    # Bounded: a third file pushes out the one not looked at for longest.
    third = path.with_name("20250102T000000Z-00.vncrec")
    third.write_bytes(path.read_bytes())
    cache.summary(tmp_path, third)
    cache.summary(tmp_path, path)
    assert cache.reads == 5
    cache.keep_only([third])
    cache.summary(tmp_path, third)
    assert cache.reads == 5
    cache.summary(tmp_path, grown)
    assert cache.reads == 6
