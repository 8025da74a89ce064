"""`python -m bench.recording_encodings [--quick] [--rounds N] [--seconds S] [--json PATH]`:
what recording costs in bytes to the browser and in relay CPU, with the encodings the viewer
asked for.

A real Xvnc (800x600) whose screen a script changes at a fixed pace, the same script with the
same seed for every candidate: each step types a line of "text" (small black glyph-sized
rectangles on white, as a terminal) and puts a 160x120 photo-like patch (a gradient with
noise) somewhere on the right. A scripted viewer through a real relay (`vncgate-relay`, its own
process) does what noVNC does: its pixel format, noVNC 1.7's SetEncodings (Tight first, quality
6, compression 2), then asks for the next incremental update as soon as one is read whole. It
reads updates with the relay's own parser (relay/recording/capture.py), so it knows where they
end whatever the encoding.

Candidates, rounds interleaved:
- `off`: no recording;
- `on`: `--record-sessions` (the viewer keeps Tight, ZRLE...: this relay);
- `on, stateless`: recording, the viewer asking only for Raw, CopyRect, RRE and Hextile, which
  is what relays before this one forced on every recorded session (for comparison).

Per candidate: bytes to the browser (RFB bytes the viewer read; WebSocket framing not counted)
over the script, the relay process's CPU seconds over the same time, the CPU per GiB sent to the
browser, updates read, and the recording's size on disk. The machine's load average is printed
before and after (the machine is shared). Only 127.0.0.1 receives traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
from Xlib import X
from Xlib import display as xdisplay

from bench import measure
from bench.candidates import Vncgate
from harness.xvnc import XvncServer
from vncgate.relay.recording.capture import SUFFIX, RfbTap, replay_handshake

WIDTH, HEIGHT = 800, 600
PATCH = (160, 120)
NOVNC_FORMAT = struct.pack("!BBBBHHHBBBxxx", 32, 24, 0, 1, 255, 255, 255, 0, 8, 16)
# noVNC 1.7's SetEncodings at depth 24 without H.264 (core/rfb.js _sendEncodings): CopyRect,
# Tight, TightPNG, ZRLE, JPEG, Hextile, RRE, Zlib, Raw, quality 6, compression 2, then its
# pseudo-encodings, less those whose messages this viewer does not read (fence, continuous
# updates, xvp, QEMU LEDs, VMware cursor, extended mouse buttons; a recorded session drops them
# too): desktop size, last rect, QEMU keys, extended desktop size, desktop name, extended
# clipboard, cursor. The same list for `off` and `on`.
NOVNC_ENCODINGS = (1, 7, -260, 16, 21, 5, 2, 6, 0, -32 + 6, -256 + 2, -223, -224, -258, -308,
                   -307, 0xC0A1E5CE - (1 << 32), -239)
STATELESS_ENCODINGS = (1, 5, 2, 0, -223, -224, -239)

CANDIDATES = ("off", "on", "on, stateless")


def profile(quick: bool) -> dict[str, Any]:
    return {"rounds": 1 if quick else 3, "seconds": 6.0 if quick else 15.0, "steps_per_s": 10}


# --- the screen ---------------------------------------------------------------------------------

def patches(rng: random.Random, count: int = 8) -> list[bytes]:
    """Photo-like 160x120 images in the X server's 32-bit format (BGRX): a gradient and noise."""
    w, h = PATCH
    out = []
    for _ in range(count):
        r0, g0, b0 = rng.randrange(256), rng.randrange(256), rng.randrange(256)
        noise = rng.randbytes(w * h)
        data = bytearray(w * h * 4)
        for y in range(h):
            for x in range(w):
                n = noise[y * w + x] % 24
                i = (y * w + x) * 4
                data[i] = (b0 + x + n) & 0xFF
                data[i + 1] = (g0 + y + n) & 0xFF
                data[i + 2] = (r0 + (x + y) // 2 + n) & 0xFF
        out.append(bytes(data))
    return out


def run_script(display: int, seed: int, steps: int, interval: float,
               stop: threading.Event) -> None:
    """The screen's activity: `steps` steps, `interval` apart (paced on a clock, so a slow step
    is caught up, not stretched)."""
    rng = random.Random(seed)  # the same screen for every candidate
    images = patches(rng)
    conn = xdisplay.Display(f":{display}")
    try:
        screen = conn.screen()
        root = screen.root
        white = root.create_gc(foreground=screen.white_pixel)
        black = root.create_gc(foreground=screen.black_pixel)
        copy = root.create_gc(subwindow_mode=X.IncludeInferiors)
        root.fill_rectangle(white, 0, 0, WIDTH, HEIGHT)
        conn.sync()
        started = time.monotonic()
        for step in range(steps):
            if stop.is_set():
                break
            row = 4 + (step % 40) * 14  # a terminal of 40 lines, wrapping
            root.fill_rectangle(white, 0, row, 420, 14)
            glyphs = [(6 + 7 * i, row + 2, 5, 9) for i in range(58) if rng.random() > 0.18]
            root.poly_fill_rectangle(black, glyphs)
            image = images[rng.randrange(len(images))]
            x = 440 + rng.randrange(WIDTH - 440 - PATCH[0])
            y = rng.randrange(HEIGHT - PATCH[1])
            root.put_image(copy, x, y, PATCH[0], PATCH[1], X.ZPixmap, 24, 0, image)
            conn.sync()
            pause = started + (step + 1) * interval - time.monotonic()
            if pause > 0:
                stop.wait(pause)
    finally:
        conn.close()


# --- the viewer ---------------------------------------------------------------------------------

class Viewer:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.buffer = b""
        self.received = 0
        self.tap = RfbTap(lambda kind, payload: None, record_input=False,
                          keyframe_interval=1e9)

    async def read(self, count: int) -> bytes:
        while len(self.buffer) < count:
            data = await self.ws.receive_bytes(timeout=30)
            self.received += len(data)
            self.buffer += data
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    async def handshake(self, encodings: tuple[int, ...]) -> None:
        version = await self.read(12)
        await self.ws.send_bytes(version)
        count = (await self.read(1))[0]
        await self.read(count)
        await self.ws.send_bytes(b"\x01")
        await self.read(4)
        await self.ws.send_bytes(b"\x01")
        init = await self.read(24)
        name = await self.read(struct.unpack_from("!I", init, 20)[0])
        replay_handshake(self.tap, b"RFB 003.008\n\x01\x01", init + name)
        await self.ws.send_bytes(b"\x00\x00\x00\x00" + NOVNC_FORMAT + struct.pack(
            f"!BxH{len(encodings)}i", 2, len(encodings), *encodings))
        await self.update(incremental=False)

    async def update(self, incremental: bool = True) -> None:
        """Ask for the next update and read it whole (and whatever came before it)."""
        done = self.tap.updates
        await self.ws.send_bytes(struct.pack("!BBHHHH", 3, int(incremental), 0, 0, WIDTH,
                                             HEIGHT))
        while self.tap.updates == done:
            if not self.buffer:
                data = await self.ws.receive_bytes(timeout=30)
                self.received += len(data)
                self.buffer = data
            data, self.buffer = self.buffer, b""
            self.tap.server_data(data)


async def one(name: str, xvnc: XvncServer, workdir: Path, seed: int,
              p: dict[str, Any]) -> dict[str, Any]:
    candidate = Vncgate(recording=name != "off")
    await candidate.start({"xvnc": xvnc.port}, workdir)
    try:
        port, _ = candidate.endpoint("rfb")
        async with aiohttp.ClientSession() as http, http.ws_connect(
                f"http://127.0.0.1:{port}/t/bench/xvnc/websockify",
                protocols=("binary",), max_msg_size=0) as ws:
            viewer = Viewer(ws)
            await viewer.handshake(STATELESS_ENCODINGS if name == "on, stateless"
                                   else NOVNC_ENCODINGS)
            steps = int(p["seconds"] * p["steps_per_s"])
            stop = threading.Event()
            before_bytes, before, updates = viewer.received, measure.usage(candidate), \
                viewer.tap.updates
            started = time.perf_counter()
            script = asyncio.create_task(asyncio.to_thread(
                run_script, xvnc.display, seed, steps, 1 / p["steps_per_s"], stop))
            try:
                # Until the script ended and the server has nothing more to send (Xvnc answers
                # an incremental request only when something changed: a second without one).
                while True:
                    try:
                        await asyncio.wait_for(viewer.update(), 1.0)
                    except TimeoutError:
                        if script.done():
                            break
            finally:
                stop.set()
                await script
            elapsed = time.perf_counter() - started
            after = measure.usage(candidate)
            moved = viewer.received - before_bytes
            figures = {
                "browser_MiB": moved / 2**20, "relay_cpu_s": after.cpu - before.cpu,
                "cpu_s_per_GiB": (after.cpu - before.cpu) / (moved / 2**30),
                "updates": viewer.tap.updates - updates, "seconds": elapsed,
                "encodings": {str(k): v for k, v in sorted(viewer.tap.rectangles.items())},
            }
    finally:
        candidate.stop()
    directory = candidate.recording_dir
    files = sorted(directory.rglob(f"*{SUFFIX}")) if directory is not None else []
    figures["disk_MiB"] = sum(f.stat().st_size for f in files) / 2**20
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)
    return figures


ROWS = [("bytes to the browser, MiB", "browser_MiB"), ("relay CPU s", "relay_cpu_s"),
        ("relay CPU s per GiB to the browser", "cpu_s_per_GiB"), ("updates", "updates"),
        ("recording on disk, MiB", "disk_MiB")]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.__main__ import fmt, machine  # the one formatting and machine description

    p = profile(args.quick)
    if args.rounds:
        p["rounds"] = args.rounds
    if args.seconds:
        p["seconds"] = args.seconds
    load_before = os.getloadavg()
    print(f"bench.recording_encodings: {len(CANDIDATES)} candidates x {p['rounds']} rounds of "
          f"{p['seconds']:g} s; load average {load_before[0]:.2f}", file=sys.stderr, flush=True)
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vncgate-bench-") as tmp, \
            XvncServer(colour="#ffffff") as xvnc:
        for r in range(p["rounds"]):
            order = CANDIDATES[r % 3:] + CANDIDATES[:r % 3]
            rounds.append({name: await one(name, xvnc, Path(tmp), seed=r, p=p)
                           for name in order})
            print(f"round {r + 1}/{p['rounds']} done", file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    summary = {label: {name: statistics.median(rnd[name][key] for rnd in rounds)
                       for name in CANDIDATES} for label, key in ROWS}
    width = max(len(label) for label, _ in ROWS)
    print(f"{'':{width}}  {'off':>9}  {'on':>9}  {'on/off':>7}  {'on, stateless':>13}  "
          f"{'/off':>7}")
    for label, _ in ROWS:
        off, on, old = (summary[label][name] for name in CANDIDATES)
        print(f"{label:{width}}  {fmt(off):>9}  {fmt(on):>9}  "
              f"{(f'{on / off:.2f}x' if off else '—'):>7}  {fmt(old):>13}  "
              f"{(f'{old / off:.2f}x' if off else '—'):>7}")
    print(f"\nencodings of the rectangles (round 1): "
          f"{ {name: rounds[0][name]['encodings'] for name in CANDIDATES} }")
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}; "
          f"medians over {len(rounds)} rounds")
    return {"machine": machine(), "command": " ".join(sys.argv), "profile": p,
            "load_before": load_before, "load_after": load_after, "summary": summary,
            "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.recording_encodings",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round of 6 s")
    parser.add_argument("--rounds", type=int, help="rounds (default 3)")
    parser.add_argument("--seconds", type=float, help="script length (default 15)")
    parser.add_argument("--json", type=Path, help="where to write every figure")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
