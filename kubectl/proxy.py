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

When the relay refuses before the VNC server has said anything (no right to connect, an unknown
target, a server that cannot be reached) or cannot be reached at all, the proxy answers the
viewer's RFB handshake itself with a security failure that carries the reason (RFC 6143
7.1.2), so a viewer such as TigerVNC's vncviewer shows why instead of a dropped connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import struct
import sys
from collections.abc import Awaitable, Callable

import aiohttp

from vncgate.kubectl import localpeer, relaytoken

READ_SIZE = 64 * 1024
# How long a refused viewer may take to send its RFB version before it is dropped.
REFUSAL_TIMEOUT = 10.0
_RFB_38 = b"RFB 003.008\n"
_RFB_33 = b"RFB 003.003\n"


async def refuse_viewer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        reason: str) -> None:
    """Greet as an RFB 3.8 server, and answer the viewer's version with no security types and
    `reason` (RFB 3.3 viewers: security type 0 and the reason)."""
    message = reason.encode("utf-8", "replace")[:1024]
    try:
        writer.write(_RFB_38)
        await writer.drain()
        async with asyncio.timeout(REFUSAL_TIMEOUT):
            version = await reader.readexactly(12)
        count = struct.pack("!I", 0) if version == _RFB_33 else b"\x00"
        writer.write(count + struct.pack("!I", len(message)) + message)
        await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError):
        pass  # the viewer left first


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
            refusal = await self._session(who, reader, writer)
            if refusal:
                await refuse_viewer(reader, writer, refusal)
        finally:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()

    async def _session(self, who: str, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> str:
        """One viewer's session through the relay; why the viewer is refused ("" when the VNC
        server answered, or the viewer left first)."""
        try:
            authorization = await self.authorization()
        except relaytoken.Unreachable as exc:  # asked the relay which token it takes
            refusal = f"cannot reach the relay: {exc.reason}"
            self.report(f"{who}: {refusal}")
            return refusal
        except Exception as exc:  # the kubeconfig's exec plugin failed, a token expired
            self.report(f"{who}: no credentials for the relay: {exc}")
            return f"kubectl vnc proxy has no credentials for the relay: {exc}"
        try:
            async with self._client().ws_connect(
                    self.ws_url, protocols=("binary",), heartbeat=None, max_msg_size=0,
                    compress=0, ssl=self.ssl_context,
                    headers={"Authorization": authorization}) as ws:
                self.report(f"{who} connected")
                ending, relayed = await self._pump(reader, writer, ws)
                self.report(f"{who} disconnected" + (f": {ending}" if ending else ""))
                if not relayed and not reader.at_eof():  # the relay ended it, not the viewer
                    return f"the relay refused: {ending or 'no reason given'}"
                return ""
        except aiohttp.WSServerHandshakeError as exc:
            refusal = f"the relay refused the connection: HTTP {exc.status} {exc.message}"
        except aiohttp.ClientConnectorCertificateError as exc:
            refusal = (f"the relay's certificate is not trusted ({exc.certificate_error}): "
                       "give kubectl vnc proxy --certificate-authority FILE")
        except (aiohttp.ClientError, OSError) as exc:
            refusal = f"cannot reach the relay: {exc}"
        self.report(refusal)
        return refusal

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    ws: aiohttp.ClientWebSocketResponse) -> tuple[str, bool]:
        """Both directions until either side ends; the relay's close code and reason, and
        whether any byte of the server's reached the viewer."""
        ending: list[str] = []
        relayed = False

        async def to_relay() -> None:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    return
                await ws.send_bytes(data)  # awaits the transport: back-pressure

        async def to_viewer() -> None:
            nonlocal relayed
            while True:
                message = await ws.receive()
                if message.type == aiohttp.WSMsgType.BINARY:
                    relayed = True
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
        return (ending[0] if ending else ""), relayed


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
