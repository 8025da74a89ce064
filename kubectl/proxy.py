"""`kubectl vnc proxy`: a local port for native VNC viewers, tunnelled through the relay.

Each TCP connection to the local port (127.0.0.1 by default) becomes one WebSocket to the relay's
`/t/<ns>/<name>/websockify`, with the user's token: the relay treats it as any browser session
(session policy, view-only filtering, recording, `kubectl vnc kill`). Bytes go both ways as
they come, with back-pressure: a slow side slows the reads from the other (the WebSocket's and
the socket's flow control), so memory stays bounded. When the relay ends the session, its close
code and reason are printed and the viewer's connection is closed.

The local port is private to the user who runs the proxy: a connection is accepted only when
its other end is a socket of the same uid (kubectl/localpeer.py reads the owner from
/proc/net/tcp), since every session opens with that user's token and, with
`spec.credentials`, no VNC password stands in the way. Where the system cannot say (not
Linux), the proxy does not start unless told `--any-local-user`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import sys
from collections.abc import Awaitable, Callable

import aiohttp

from vncgate.kubectl import localpeer

READ_SIZE = 64 * 1024


def own_user_only(ours: tuple[str, int], peer: tuple[str, int]) -> str:
    """Why a connection is refused ("" when it is one of this user's own processes)."""
    uid = localpeer.peer_uid(ours, peer)
    if uid == os.getuid():
        return ""
    if uid is None:
        return (f"refused a connection from {peer[0]}:{peer[1]}: not from a process of this "
                "machine's user (the proxy lends your identity to its own user's viewers only)")
    return (f"refused a connection from {peer[0]}:{peer[1]}: it belongs to uid {uid}, not to "
            f"you (uid {os.getuid()}); the proxy lends your identity to your own viewers only")


class Tunnel:
    """`allowed(ours, peer)` says why a local connection is refused ("" to accept it):
    `own_user_only` by default, so that another user of the machine cannot open a console
    with this user's identity through the local port."""

    def __init__(self, ws_url: str, authorization: Callable[[], Awaitable[str]],
                 ssl_context: ssl.SSLContext | bool = True,
                 report: Callable[[str], None] | None = None,
                 allowed: Callable[[tuple[str, int], tuple[str, int]], str] | None
                 = own_user_only) -> None:
        self.ws_url = ws_url
        self.authorization = authorization
        self.ssl_context = ssl_context
        self.report = report or (lambda line: print(line, file=sys.stderr, flush=True))
        self.allowed = allowed
        self.sessions = 0
        self.refused = 0
        self._http: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        return self._http

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        who = f"viewer {peer[0]}:{peer[1]}"
        if self.allowed is not None:
            refusal = self.allowed(writer.get_extra_info("sockname"), peer)
            if refusal:
                self.refused += 1
                self.report(refusal)
                writer.close()
                with contextlib.suppress(OSError, ConnectionError):
                    await writer.wait_closed()
                return
        self.sessions += 1
        try:
            try:
                authorization = await self.authorization()
            except Exception as exc:  # the kubeconfig's exec plugin failed, a token expired
                self.report(f"{who}: no credentials for the relay: {exc}")
                return
            async with self._client().ws_connect(
                    self.ws_url, protocols=("binary",), heartbeat=None, max_msg_size=0,
                    compress=0, ssl=self.ssl_context,
                    headers={"Authorization": authorization}) as ws:
                self.report(f"{who} connected")
                ending = await self._pump(reader, writer, ws)
                self.report(f"{who} disconnected" + (f": {ending}" if ending else ""))
        except aiohttp.WSServerHandshakeError as exc:
            self.report(f"the relay refused the connection: HTTP {exc.status} {exc.message}")
        except (aiohttp.ClientError, OSError) as exc:
            self.report(f"cannot reach the relay: {exc}")
        finally:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    ws: aiohttp.ClientWebSocketResponse) -> str:
        """Both directions until either side ends; the relay's close code and reason."""
        ending: list[str] = []

        async def to_relay() -> None:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    return
                await ws.send_bytes(data)  # awaits the transport: back-pressure

        async def to_viewer() -> None:
            while True:
                message = await ws.receive()
                if message.type == aiohttp.WSMsgType.BINARY:
                    writer.write(message.data)
                    await writer.drain()  # a slow viewer slows the reads from the relay
                elif message.type == aiohttp.WSMsgType.CLOSE:
                    ending.append(f"{message.data} {message.extra or ''}".strip())
                    return
                elif message.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                                      aiohttp.WSMsgType.ERROR):
                    return

        tasks = [asyncio.create_task(to_relay()), asyncio.create_task(to_viewer())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                with contextlib.suppress(ConnectionError, OSError, aiohttp.ClientError):
                    task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await ws.close()
        return ending[0] if ending else ""


async def serve(tunnel: Tunnel, host: str, port: int,
                started: Callable[[int], None]) -> None:
    """Listen until cancelled (Ctrl-C, SIGTERM); `started` gets the bound port."""
    server = await asyncio.start_server(tunnel.handle, host, port, limit=READ_SIZE)
    try:
        started(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()
    finally:
        await tunnel.close()
