"""`python -m bench.listpage [--sizes 5000] [--requests 30] [--json PATH]`: the console list
(`GET /`) and its JSON (`GET /api/v1/consoles`) with thousands of targets.

A real relay (`RelayServer`, on 127.0.0.1) holds N routes in 20 namespaces; a tenth of them have
been seen Ready and a fiftieth Unreachable by the relay's own connections (recorded the way a
session records them). Each request is timed from the client's send to the last byte of the
answer, one request at a time, after a warm-up: the median and p95 in milliseconds, and the
answer's size. Two ways of signing in: `none` (everyone sees every target; no per-target check)
and `token` (a bearer token; every other route has an access list, so each request decides
N times who may open what, which is the list's O(N) part besides filtering).

`--thumbnails N`: the cost of one thumbnail (spec.thumbnail), made N times from a real Xvnc
the way the relay makes it, cache bypassed: wall time, the relay process's CPU time (the
Xvnc's own is not counted) and the JPEG's size. The screen is 1280x1024 of one colour: Raw
costs the same whatever it shows, a real screen's JPEG is larger.

Only 127.0.0.1 receives traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from harness.xvnc import XvncServer
from vncgate.common.model import Route
from vncgate.common.spec import Access
from vncgate.relay import closecodes
from vncgate.relay.access.identity import AuthMode
from vncgate.relay.access.users import User
from vncgate.relay.rfb.security import UpstreamLogin
from vncgate.relay.session.thumbnails import grab
from vncgate.relay.settings import Address, AuthSettings, RelaySettings
from vncgate.relay.web.server import RelayServer

TOKEN = secrets.token_hex(16)  # the bench user's bearer token, new each run
API_TOKEN = secrets.token_hex(16)
NAMESPACES = 20


def routes(count: int) -> list[Route]:
    table = []
    for i in range(count):
        access = Access(users=("bench",)) if i % 2 else None
        table.append(Route(f"team-{i % NAMESPACES:02}", f"console-{i:05}", "127.0.0.1", 5900,
                           display_name=f"Console {i}", access=access))
    return table


def settings(mode: str) -> RelaySettings:
    auth = AuthSettings()
    if mode == "token":
        users = {"bench": User("bench", "sha256$" + hashlib.sha256(TOKEN.encode()).hexdigest())}
        auth = AuthSettings(mode=AuthMode.TOKEN, users=users, session_secret=b"s" * 32)
    return RelaySettings(listen=Address("127.0.0.1", 0), internal_listen=Address("127.0.0.1", 0),
                         api_token=API_TOKEN, auth=auth)


async def timed(http: aiohttp.ClientSession, url: str, requests: int) -> dict[str, Any]:
    times, size = [], 0
    for n in range(requests + 3):
        started = time.perf_counter()
        async with http.get(url) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{url}: {resp.status} {body[:200]!r}")
        if n >= 3:  # warm-up: templates compiled, authorization answers cached
            times.append((time.perf_counter() - started) * 1000)
        size = len(body)
    times.sort()
    return {"median_ms": statistics.median(times),
            "p95_ms": times[min(len(times) - 1, int(len(times) * 0.95))],
            "bytes": size}


async def one_size(count: int, mode: str, requests: int) -> dict[str, Any]:
    table = routes(count)
    async with RelayServer(settings(mode), table) as relay:
        for i, route in enumerate(table):  # what sessions would have found
            if i % 10 == 0:
                relay.state.health.connected(route.key, "RFB 003.008")
            elif i % 50 == 1:
                relay.state.health.failed(route.key, closecodes.BAD_UPSTREAM,
                                          f"the VNC server of {route.key} refused the "
                                          "connection; is it running?")
        headers = {"Authorization": f"Bearer {TOKEN}"} if mode == "token" else {}
        base = relay.public_url
        pages = -(-count // 200)
        cases = {
            "page 1 (50 rows)": "/",
            "page 1 (200 rows)": "/?per=200",
            "last page (200 rows)": f"/?per=200&page={pages}",
            "search (few rows)": "/?q=console-0042",
            "filter phase=Unreachable": "/?phase=Unreachable",
            "filter namespace": "/?namespace=team-07",
            "JSON page 1 (50)": "/api/v1/consoles",
            "JSON page 1 (200)": "/api/v1/consoles?per=200",
        }
        figures = {}
        async with aiohttp.ClientSession(headers=headers) as http:
            for name, path in cases.items():
                figures[name] = await timed(http, base + path, requests)
        return figures


async def thumbnails(count: int) -> dict[str, Any]:
    with XvncServer(geometry="1280x1024", colour="#3366aa") as server:
        route = Route("lab", "desk", "127.0.0.1", server.port, thumbnail=True)
        walls, cpus, size = [], [], 0
        for n in range(count + 2):
            wall, cpu = time.perf_counter(), time.process_time()
            made = await grab(route, settings("none"), UpstreamLogin())
            if n >= 2:
                walls.append((time.perf_counter() - wall) * 1000)
                cpus.append((time.process_time() - cpu) * 1000)
            size = len(made.jpeg)
    return {"median_ms": statistics.median(walls), "cpu_ms": statistics.median(cpus),
            "jpeg_bytes": size, "screen": "1280x1024"}


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.listpage", description=__doc__)
    parser.add_argument("--sizes", type=int, action="append", help="targets (repeatable); "
                        "default 500 and 5000")
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--thumbnails", type=int, default=0, metavar="N",
                        help="also make N thumbnails from a real Xvnc and report their cost")
    parser.add_argument("--no-list", action="store_true", help="skip the list requests")
    args = parser.parse_args(argv)
    sizes = [] if args.no_list else (args.sizes or [500, 5000])
    results: dict[str, Any] = {}
    if args.thumbnails:
        figures = await thumbnails(args.thumbnails)
        results["thumbnail"] = figures
        print(f"one thumbnail of a {figures['screen']} screen: {figures['median_ms']:.1f} ms, "
              f"relay CPU {figures['cpu_ms']:.1f} ms, {figures['jpeg_bytes']} bytes of JPEG")
    for mode in ("none", "token") if sizes else ():
        for count in sizes:
            figures = await one_size(count, mode, args.requests)
            results[f"{mode}/{count}"] = figures
            print(f"\n{count} targets, --auth {mode}:")
            print(f"  {'request':28} {'median ms':>10} {'p95 ms':>9} {'bytes':>9}")
            for name, f in figures.items():
                print(f"  {name:28} {f['median_ms']:10.1f} {f['p95_ms']:9.1f} {f['bytes']:9}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
