"""The event loop of the benchmark's own processes (clients, backends, pipe): uvloop when it is
installed, so that they cost less than the relays they measure; asyncio's otherwise."""

from __future__ import annotations

import asyncio


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
