"""The unmasked-frame scanner in front of aiohttp's reader, fed frames split at every point."""

from __future__ import annotations

import random
from typing import Any

from harness.rawws import frame
from vncgate.relay.web.websocket import MaskedFramesOnly


class Reader:
    def __init__(self) -> None:
        self.data = bytearray()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.data += data
        return False, b""

    def feed_eof(self) -> None:
        pass


class Queue:
    def __init__(self) -> None:
        self.exception: BaseException | None = None

    def set_exception(self, exc: BaseException) -> None:
        self.exception = exc


class FakeWs:
    """Only the attribute the scanner fails: aiohttp's message queue."""

    def __init__(self) -> None:
        self._reader = Queue()


def scanner() -> tuple[MaskedFramesOnly, Reader, FakeWs]:
    reader, ws = Reader(), FakeWs()
    ws_any: Any = ws
    return MaskedFramesOnly(reader, ws_any), reader, ws


def stream(rng: random.Random) -> bytes:
    sizes = [0, 1, 125, 126, 127, 65535, 65536, 70000]
    return b"".join(frame(bytes(rng.choice(sizes)), opcode=rng.choice((0x2, 0x9, 0xA)))
                    for _ in range(12))


def test_masked_frames_pass_whatever_the_read_sizes() -> None:
    rng = random.Random(18)  # noqa: S311 - reproducible splits, not secrets
    for _ in range(30):
        data = stream(rng)
        check, reader, ws = scanner()
        pos = 0
        while pos < len(data):
            step = rng.choice((1, 2, 3, 7, 13, 100, 4096, 65536))
            assert check.feed_data(data[pos:pos + step]) == (False, b"")
            pos += step
        assert bytes(reader.data) == data
        assert ws._reader.exception is None


def test_an_unmasked_frame_anywhere_fails_the_reader() -> None:
    rng = random.Random(6455)  # noqa: S311 - reproducible splits, not secrets
    for _ in range(30):
        good = stream(rng)
        bad = frame(bytes(rng.choice((0, 5, 200, 70000))), masked=False)
        data = good + bad + frame(b"after")
        check, reader, ws = scanner()
        pos, failed = 0, False
        while pos < len(data) and not failed:
            step = rng.choice((1, 5, 14, 1000, 65536))
            failed = check.feed_data(data[pos:pos + step])[0]
            pos += step
        assert failed
        assert ws._reader.exception is not None
        assert "unmasked" in str(ws._reader.exception)
        assert len(reader.data) <= len(good)  # nothing of the unmasked frame was passed on
