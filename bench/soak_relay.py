"""The relay under tracemalloc, for `python -m bench.soak --tracemalloc`.

`python -X tracemalloc=25 -m bench.soak_relay --snapshot-dir DIR RELAY-FLAGS...`: runs the
relay as `vncgate-relay` would, and on each SIGUSR1 dumps a tracemalloc snapshot to
DIR/snapshot-N.pickle (the soak compares the first with the last).
"""

from __future__ import annotations

import gc
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType

from vncgate.relay.cli import main as relay_main


def main() -> int:
    args = sys.argv[1:]
    if len(args) < 2 or args[0] != "--snapshot-dir":
        print("usage: python -X tracemalloc=25 -m bench.soak_relay --snapshot-dir DIR ...",
              file=sys.stderr)
        return 2
    directory, relay_args = Path(args[1]), args[2:]
    if not tracemalloc.is_tracing():
        tracemalloc.start(25)
    taken = 0

    def dump(signum: int, frame: FrameType | None) -> None:
        nonlocal taken
        gc.collect()
        tracemalloc.take_snapshot().dump(str(directory / f"snapshot-{taken}.pickle"))
        taken += 1

    signal.signal(signal.SIGUSR1, dump)
    return relay_main(relay_args)


if __name__ == "__main__":
    raise SystemExit(main())
