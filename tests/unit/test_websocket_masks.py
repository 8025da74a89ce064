"""The unmasked-frame scanner in front of aiohttp's reader, fed frames split at every point."""

from __future__ import annotations

import random

from harness.rawws import frame
from vncgate.relay.web.websocket import MaskedFramesOnly


def stream(rng: random.Random) -> bytes:
    sizes = [0, 1, 125, 126, 127, 65535, 65536, 70000]
    return b"".join(frame(bytes(rng.choice(sizes)), opcode=rng.choice((0x2, 0x9, 0xA)))
                    for _ in range(12))


def test_masked_frames_pass_whatever_the_read_sizes() -> None:
    rng = random.Random(18)  # noqa: S311 - reproducible splits, not secrets
    for _ in range(30):
        data = stream(rng)
        check, passed = MaskedFramesOnly(), bytearray()
        pos = 0
        while pos < len(data):
            step = rng.choice((1, 2, 3, 7, 13, 100, 4096, 65536))
            out, refused = check.feed(data[pos:pos + step])
            assert not refused
            passed += out
            pos += step
        assert bytes(passed) == data


def test_an_unmasked_frame_anywhere_fails_the_stream() -> None:
    rng = random.Random(6455)  # noqa: S311 - reproducible splits, not secrets
    for _ in range(30):
        good = stream(rng)
        bad = frame(bytes(rng.choice((0, 5, 200, 70000))), masked=False)
        data = good + bad + frame(b"after")
        check, passed = MaskedFramesOnly(), bytearray()
        pos, refused = 0, False
        while pos < len(data) and not refused:
            step = rng.choice((1, 5, 14, 1000, 65536))
            out, refused = check.feed(data[pos:pos + step])
            passed += out
            pos += step
        assert refused
        # Everything before the unmasked frame, and nothing of it, was passed on: aiohttp's
        # reader stands at a frame boundary when the stream is cut.
        assert bytes(passed) == good
        assert check.feed(frame(b"more")) == (b"", True)


def test_a_lone_first_header_byte_waits_for_its_mask_bit() -> None:
    check = MaskedFramesOnly()
    masked = frame(b"x")
    assert check.feed(masked[:1]) == (b"", False)
    assert check.feed(masked[1:]) == (masked, False)
    unmasked = frame(b"x", masked=False)
    assert check.feed(unmasked[:1]) == (b"", False)
    assert check.feed(unmasked[1:]) == (b"", True)
