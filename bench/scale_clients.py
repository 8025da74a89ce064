"""A child of `bench.scale`: viewers that open WebSocket sessions through one balancer and idle.

`python -m bench.scale_clients --port P --plan FILE --rate R --group G` reads its sessions from
FILE (a JSON list of `[path, user]`), then takes commands on stdin, one per line, and answers
each with one JSON line on stdout:

- `open`: opens every session at R per second, each the way a viewer does through an auth
  proxy (`X-Forwarded-User`, `X-Forwarded-Groups: G`): TCP to 127.0.0.1:P (HAProxy), the
  WebSocket upgrade, then RFB 3.8 with security None and ClientInit up to ServerInit; then the
  session idles (pings are answered). Answers at once (`{"ev": "opening"}`); `stats` follows it.
- `stats`: counts (alive, failed attempts and why, given up), set-up times of first opens.
- `times`: the outage of every session that was lost and came back: seconds from the loss to
  ServerInit again, and the monotonic time it came back (CLOCK_MONOTONIC: the parent's clock).
- `close` (or the end of stdin): aborts every connection and exits.

A session whose connection is lost after ServerInit (its relay was killed: HAProxy closes the
viewer's side) reconnects at once, through the same balancer, and after a failed attempt again
after 0.25 s, doubling to 4 s, at most ATTEMPTS times per outage: every session of a killed relay
comes back at the same moment, which is the storm. A first open that fails is retried the same
way. Everything is bounded: each attempt by HANDSHAKE_TIMEOUT, the attempts by ATTEMPTS, the
process by --deadline seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys
import time
from collections import Counter
from pathlib import Path

from bench.client import Conn
from bench.limits import raise_fd_limit
from bench.loops import new_event_loop
from bench.measure import percentile

HANDSHAKE_TIMEOUT = 30.0
ATTEMPTS = 40
FIRST_BACKOFF, MAX_BACKOFF = 0.25, 4.0


class Viewers:
    def __init__(self, port: int, plan: list[tuple[str, str]], rate: float, group: str,
                 deadline: float) -> None:
        self.port = port
        self.plan = plan
        self.rate = rate
        self.headers = [f"X-Forwarded-User: {user}\r\nX-Forwarded-Groups: {group}\r\n"
                        for _, user in plan]
        self.deadline = deadline
        self.conns: list[Conn | None] = [None] * len(plan)
        self.tasks: set[asyncio.Task[None]] = set()
        self.closing = False
        self.started = 0  # sessions whose first attempt began
        self.alive = 0
        self.gave_up = 0
        self.failures: Counter[str] = Counter()  # failed attempts by reason
        self.setup: list[float] = []  # first opens, seconds to ServerInit
        self.lost = 0
        self.outages: list[tuple[float, float]] = []  # (seconds down, monotonic back)
        self.retries_per_outage: list[int] = []

    async def handshake(self, index: int) -> Conn:
        """One attempt: connected, upgraded, RFB up to ServerInit."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            _, conn = await loop.create_connection(
                lambda: Conn(self.plan[index][0], f"127.0.0.1:{self.port}", 12,
                             self.headers[index]), "127.0.0.1", self.port)
            try:
                await conn.ready
                await conn.greeted
                for send, want in ((b"RFB 003.008\n", 2), (b"\x01", 4), (b"\x01", 24)):
                    got = conn.expect(want)
                    conn.send(send)
                    await got
                init = bytes(conn.collect)
                (name_length,) = struct.unpack_from("!I", init, 20)
                if len(init) < 24 + name_length:
                    await conn.expect(24 + name_length - len(init))
            except BaseException as exc:
                conn.abort()
                if conn.close_code is not None and isinstance(exc, ConnectionError):
                    raise ConnectionError(f"close {conn.close_code}") from None
                raise
        return conn

    @staticmethod
    def reason(exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return "timeout"
        text = str(exc)
        if text.startswith(("no upgrade", "close ")):
            return text[:40]
        return f"{type(exc).__name__}: {text[:40]}"

    async def attempt_until_up(self, index: int) -> int | None:
        """Attempts until ServerInit; the failed attempts before it, None if it gave up."""
        backoff = FIRST_BACKOFF
        for failed in range(ATTEMPTS):
            if self.closing or time.monotonic() > self.deadline:
                return None
            try:
                conn = await self.handshake(index)
            except (OSError, TimeoutError, ConnectionError) as exc:
                self.failures[self.reason(exc)] += 1
                await asyncio.sleep(backoff)
                backoff = min(MAX_BACKOFF, backoff * 2)
                continue
            self.conns[index] = conn
            self.alive += 1
            return failed
        return None

    async def keep(self, index: int) -> None:
        started = time.perf_counter()
        if await self.attempt_until_up(index) is None:
            self.gave_up += 1
            return
        self.setup.append(time.perf_counter() - started)
        while not self.closing:
            conn = self.conns[index]
            assert conn is not None
            await conn.closed
            if self.closing:
                return
            self.alive -= 1
            self.lost += 1
            self.conns[index] = None
            down = time.monotonic()
            retries = await self.attempt_until_up(index)
            if retries is None:
                self.gave_up += 1
                return
            back = time.monotonic()
            self.outages.append((back - down, back))
            self.retries_per_outage.append(retries)

    async def open_all(self) -> None:
        start = time.monotonic()
        for index in range(len(self.plan)):
            if self.closing or time.monotonic() > self.deadline:
                return
            delay = start + index / self.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.started += 1
            task = asyncio.create_task(self.keep(index))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def stats(self) -> dict[str, object]:
        setup = sorted(self.setup)
        return {"planned": len(self.plan), "started": self.started, "alive": self.alive,
                "gave_up": self.gave_up, "lost": self.lost, "back": len(self.outages),
                "failed_attempts": sum(self.failures.values()),
                "failures": dict(self.failures.most_common(8)),
                "setup_p50_ms": 1e3 * percentile(setup, 0.5) if setup else None,
                "setup_p99_ms": 1e3 * percentile(setup, 0.99) if setup else None,
                "opened": len(setup)}

    def times(self) -> dict[str, object]:
        return {"outages": [[round(down, 4), round(back, 4)] for down, back in self.outages],
                "retries": self.retries_per_outage}

    async def close(self) -> None:
        self.closing = True
        for conn in self.conns:
            if conn is not None:
                conn.abort()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def say(message: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def run(viewers: Viewers) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    opener: asyncio.Task[None] | None = None
    try:
        while time.monotonic() < viewers.deadline:
            try:
                async with asyncio.timeout(max(0.0, viewers.deadline - time.monotonic())):
                    line = await reader.readline()
            except TimeoutError:
                break
            command = line.strip().decode()
            if not line or command == "close":
                break
            if command == "open" and opener is None:
                opener = asyncio.create_task(viewers.open_all())
                say({"ev": "opening"})
            elif command == "stats":
                say({"ev": "stats", **viewers.stats()})
            elif command == "times":
                say({"ev": "times", **viewers.times()})
            else:
                say({"ev": "error", "unknown": command})
    finally:
        if opener is not None:
            opener.cancel()
        await viewers.close()
        say({"ev": "closed"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="the balancer's port")
    parser.add_argument("--plan", type=Path, required=True,
                        help="JSON list of [path, user], one per session")
    parser.add_argument("--rate", type=float, required=True, help="sessions opened per second")
    parser.add_argument("--group", default="vncgate-bench-viewers")
    parser.add_argument("--deadline", type=float, default=3600.0,
                        help="seconds; the process ends by then whatever it was doing")
    args = parser.parse_args()
    raise_fd_limit()
    plan = [(str(path), str(user)) for path, user in json.loads(args.plan.read_text())]
    viewers = Viewers(args.port, plan, args.rate, args.group, time.monotonic() + args.deadline)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(run(viewers))


if __name__ == "__main__":
    main()
