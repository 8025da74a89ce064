"""`python -m bench.maskscan`: the cost of the unmasked-frame scanner (relay/web/websocket.py) per
frame, fed 64 KiB reads of masked frames of a few sizes; aiohttp's reader is left out."""

from __future__ import annotations

import time

from vncgate.relay.web.websocket import MaskedFramesOnly


def masked(payload: bytes) -> bytes:
    n = len(payload)
    head = bytes([0x82, 0x80 | n]) if n < 126 else (
        bytes([0x82, 0x80 | 126]) + n.to_bytes(2, "big") if n < 65536
        else bytes([0x82, 0x80 | 127]) + n.to_bytes(8, "big"))
    return head + b"\0\0\0\0" + payload


def main() -> None:
    print("frame payload | frames/read | ns per frame | MiB/s scanned")
    for size in (6, 100, 1000, 16384, 65536):
        one = masked(b"x" * size)
        data = one * max(1, 65536 // len(one))
        reads = [data[i:i + 65536] for i in range(0, len(data), 65536)]
        scanner = MaskedFramesOnly()
        rounds = max(50, 2_000_000 // (len(data) // len(one)) // 10)
        started = time.perf_counter()
        for _ in range(rounds):
            for read in reads:
                scanner.feed(read)
        elapsed = time.perf_counter() - started
        frames = rounds * (len(data) // len(one))
        print(f"{size:>13} | {len(data) // len(one):>11} | {elapsed / frames * 1e9:>12.0f} | "
              f"{rounds * len(data) / elapsed / 2**20:>13.0f}")


if __name__ == "__main__":
    main()
