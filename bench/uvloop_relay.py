"""`python -m bench.uvloop_relay ARGS`: vncgate-relay with ARGS on uvloop instead of asyncio's
loop, to measure what uvloop would give the relay (the relay itself does not depend on it)."""

from __future__ import annotations

import sys

import uvloop

from vncgate.relay.cli import main

if __name__ == "__main__":
    uvloop.install()  # asyncio.run() in relay.cli then makes a uvloop loop
    sys.exit(main())
