"""KubeVirt consoles: the vnc subresource of a VirtualMachineInstance as an upstream byte stream.

KubeVirt serves a VM's VNC only through its API: `GET /apis/subresources.kubevirt.io/v1/
namespaces/{ns}/virtualmachineinstances/{name}/vnc` on the Kubernetes API server, upgraded to a
WebSocket with the subprotocol `plain.kubevirt.io`, whose binary messages carry the raw RFB
stream (virt-api proxies it to the VM's QEMU). RBAC decides: `get` on
`virtualmachineinstances/vnc` in group `subresources.kubevirt.io`, for the relay's own
ServiceAccount.

`dial` connects to the API server (its CA, the relay's token), makes the upgrade by hand and
hands the caller's protocol a `WebSocketTransport`: an asyncio transport whose writes become
masked binary frames and whose reads are the frames' payloads. So the bridge (relay.bridge) and
the relay's own login (relay.rfbsecurity) run over it unchanged: greeting check, session policy,
view-only filter and credentials work as for a TCP endpoint. Frames are decoded as they arrive,
payloads handed on in the pieces the TLS layer delivers: no frame is ever buffered whole, and
flow control passes straight through (pausing the reader pauses the API server's connection).

The path is built only from names the registry checked (Kubernetes names: no '/', no '..') and
quoted again here; nothing a viewer sends reaches it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

from vncgate.common.kube import KubeConfigError, KubeConnection
from vncgate.common.spec import check_name, check_namespace
from vncgate.relay import closecodes

SUBPROTOCOL = "plain.kubevirt.io"
GROUP = "subresources.kubevirt.io"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
MAX_RESPONSE_HEAD = 16 * 1024  # the upgrade response's status line and headers
MAX_ERROR_BODY = 2048  # of a refusal's body, for its message
MAX_CONTROL = 125  # RFC 6455 5.5: control frames carry at most 125 bytes
# KubeVirt gives a VMI's console to the newest client and drops the one before, unless the new
# one asks to preserve the session: then KubeVirt refuses it (503) while another client (virtctl
# vnc, a web console) holds the console, instead of silently taking it from that person.
# KubeVirt versions before the option ignore it.
PRESERVE_SESSION = "preserveSession=true"
# The aggregation layer's own 503 when KubeVirt's API is not served (no virt-api endpoint).
_API_UNAVAILABLE = ("service unavailable", "currently unable to handle")


class DialRefused(Exception):
    """The console could not be opened; `code` (4xxx) and `reason` go to the viewer."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def vnc_path(namespace: str, name: str) -> str:
    """The subresource's path, from checked names only (ValueError for anything else)."""
    check_namespace(namespace, "namespace")
    check_name(name, "name")
    return (f"/apis/{GROUP}/v1/namespaces/{quote(namespace, safe='')}"
            f"/virtualmachineinstances/{quote(name, safe='')}/vnc")


def mask(data: bytes | bytearray | memoryview, key: bytes) -> bytes:
    """XOR with the 4-byte masking key (RFC 6455 5.3), in one big-integer operation."""
    length = len(data)
    if not length:
        return b""
    pad = (key * (length // 4 + 1))[:length]
    return (int.from_bytes(data, "little") ^ int.from_bytes(pad, "little")).to_bytes(
        length, "little")


def client_frame(opcode: int, payload: bytes | bytearray | memoryview) -> bytes:
    """One final, masked frame, client to server."""
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    key = os.urandom(4)
    return head + key + mask(payload, key)


def _refusal(status: int, body: str, namespace: str, name: str) -> DialRefused:
    # Close reasons are cut at 123 bytes: what to do comes first, the long names last.
    if status == 401:
        return DialRefused(closecodes.BAD_UPSTREAM,
                           "the Kubernetes API server did not accept the relay's credentials")
    if status == 403:
        return DialRefused(closecodes.FORBIDDEN,
                           "the relay may not get virtualmachineinstances/vnc (chart value "
                           f"kubevirt.enabled) in {namespace}")
    if status == 404:
        if "could not find the requested resource" in body:
            return DialRefused(closecodes.BAD_UPSTREAM,
                               f"KubeVirt is not installed in this cluster (no {GROUP} API)")
        return DialRefused(closecodes.BAD_UPSTREAM,
                           f"virtualmachineinstance {name} does not exist; is the VM running?")
    if status == 503:
        if not body.strip() or any(mark in body.lower() for mark in _API_UNAVAILABLE):
            return DialRefused(closecodes.BAD_UPSTREAM,
                               f"KubeVirt's API ({GROUP}) is not available now; try again later")
        # KubeVirt does not say who: the relay's own viewers of a VM are one exclusive session.
        return DialRefused(closecodes.CONFLICT,
                           f"in use by another console client (virtctl vnc or a web console) "
                           f"of VM {name}; KubeVirt keeps it for them")
    detail = " ".join(body.split())[:200]
    return DialRefused(closecodes.BAD_UPSTREAM,
                       f"KubeVirt refused the console of {name} (HTTP {status}"
                       + (f": {detail}" if detail else "") + ")")


class WebSocketTransport(asyncio.Transport):
    """The inner protocol's view of the WebSocket: bytes in, bytes out."""

    # loop.start_tls accepts it (VeNCrypt over the WebSocket, relay.rfbsecurity).
    _start_tls_compatible = True

    def __init__(self, stream: KubeVirtStream) -> None:
        super().__init__()
        self._stream = stream

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            self._stream.send(0x2, data)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        self.close()

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self._stream.pause_reading()

    def resume_reading(self) -> None:
        self._stream.resume_reading()

    def is_reading(self) -> bool:
        return not self._stream.reading_paused

    def close(self) -> None:
        self._stream.close()

    def abort(self) -> None:
        self._stream.abort()

    def is_closing(self) -> bool:
        return self._stream.closing

    def get_write_buffer_size(self) -> int:
        return self._stream.write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._stream.write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._stream.set_write_buffer_limits(high, low)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._stream.inner = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._stream.inner

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "subprotocol":
            return SUBPROTOCOL
        return self._stream.extra_info(name, default)


class KubeVirtStream(asyncio.Protocol):
    """The API server's connection: the upgrade, then WebSocket frames both ways."""

    def __init__(self, inner: asyncio.BaseProtocol, request: bytes, key: bytes,
                 namespace: str, name: str) -> None:
        loop = asyncio.get_running_loop()
        self.inner = inner
        self._request = request
        self._accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())  # noqa: S324 - RFC 6455
        self._where = (namespace, name)
        self._head = bytearray()
        self._refusal: tuple[int, int] | None = None  # a non-101 answer: (status, body length)
        self.upgraded: asyncio.Future[WebSocketTransport] = loop.create_future()
        self._transport: asyncio.Transport | None = None
        self._wrapper: WebSocketTransport | None = None
        self._parse = bytearray()  # an incomplete frame header
        self._in_payload = False
        self._remaining = 0  # payload bytes of the current frame still to come
        self._opcode = 0
        self._control = bytearray()  # the payload of a control frame being read
        self.reading_paused = False
        self.closing = False
        self._ended = False

    # -- the outer transport's events -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        assert self._transport is not None
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            self._head += data
            self._refusal_body()
            return
        if not self.upgraded.done():
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > MAX_RESPONSE_HEAD:
                    self._fail_upgrade(DialRefused(closecodes.BAD_UPSTREAM, "the API server's "
                                                   "answer to the console request is too long"))
                return
            if not self._upgrade_answered(bytes(self._head[:end])):
                return
            data, self._head = bytes(self._head[end + 4:]), bytearray()
            if not data:
                return
        self._frames(memoryview(data))

    def eof_received(self) -> bool | None:
        self._end(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc)

    # The API server's connection is over (or back under) its high-water mark: the inner
    # protocol's writes wait (the bridge's drain), as they would on a TCP transport.
    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # -- the upgrade ----------------------------------------------------------------------

    def _upgrade_answered(self, head: bytes) -> bool:
        lines = head.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            self._fail_upgrade(DialRefused(closecodes.BAD_UPSTREAM,
                                           "the API server answered the console request "
                                           "with something that is not HTTP"))
            return False
        headers: dict[str, str] = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        if status != 101:
            # The body of a refusal is a Status object: read (a bounded part of) it for the
            # message, then fail.
            try:
                length = int(headers.get("content-length", MAX_ERROR_BODY))
            except ValueError:
                length = MAX_ERROR_BODY
            self._refusal = (status, min(max(length, 0), MAX_ERROR_BODY))
            self._head = self._head[len(head) + 4:]
            self._refusal_body()
            return False
        if headers.get("sec-websocket-accept", "").encode() != self._accept:
            self._fail_upgrade(DialRefused(closecodes.BAD_UPSTREAM, "the console's WebSocket "
                                           "upgrade was answered wrongly (Sec-WebSocket-Accept)"))
            return False
        if headers.get("sec-websocket-protocol") != SUBPROTOCOL:
            self._fail_upgrade(DialRefused(closecodes.BAD_UPSTREAM, "KubeVirt did not accept "
                                           f"the {SUBPROTOCOL} subprotocol"))
            return False
        self._wrapper = WebSocketTransport(self)
        self.upgraded.set_result(self._wrapper)
        self.inner.connection_made(self._wrapper)
        return True

    def _refusal_body(self, *, ended: bool = False) -> None:
        assert self._refusal is not None
        status, wanted = self._refusal
        if len(self._head) >= wanted or ended:
            body = bytes(self._head[:MAX_ERROR_BODY]).decode("utf-8", "replace")
            self._fail_upgrade(_refusal(status, body, *self._where))

    def _fail_upgrade(self, refused: DialRefused) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(refused)
        self.abort()

    # -- frames from the server -------------------------------------------------------------

    def _frames(self, data: memoryview) -> None:
        while data and not self._ended:
            if not self._in_payload:
                need = self._header_size()
                while len(self._parse) < need and data:
                    take = data[:need - len(self._parse)]
                    self._parse += take
                    data = data[len(take):]
                    need = self._header_size()
                if len(self._parse) < need:
                    return
                self._start_frame()
                continue
            take = data[:self._remaining]
            data = data[len(take):]
            self._remaining -= len(take)
            if self._opcode >= 0x8:
                self._control += take
            elif take:
                self._deliver(take)
            if self._remaining == 0:
                self._frame_done()

    def _deliver(self, data: memoryview) -> None:
        """Hand bytes to the inner protocol: a plain Protocol's data_received (the bridge's
        Upstream has one), or a BufferedProtocol's buffers (asyncio's TLS layer, when
        VeNCrypt starts TLS over this stream)."""
        inner = self.inner
        receive = getattr(inner, "data_received", None)
        if receive is not None:
            receive(bytes(data))
            return
        assert isinstance(inner, asyncio.BufferedProtocol)
        while data:
            buffer = memoryview(inner.get_buffer(len(data))).cast("B")
            size = min(len(buffer), len(data))
            if not size:
                raise RuntimeError("the protocol offered an empty buffer")
            buffer[:size] = data[:size]
            inner.buffer_updated(size)
            data = data[size:]

    def _header_size(self) -> int:
        if len(self._parse) < 2:
            return 2
        length = self._parse[1] & 0x7F
        return 2 + (2 if length == 126 else 8 if length == 127 else 0)

    def _start_frame(self) -> None:
        first, second = self._parse[0], self._parse[1]
        length = second & 0x7F
        if length == 126:
            length = struct.unpack_from("!H", self._parse, 2)[0]
        elif length == 127:
            length = struct.unpack_from("!Q", self._parse, 2)[0]
        self._parse.clear()
        opcode = first & 0x0F
        problem = None
        if second & 0x80:
            problem = "the API server sent a masked frame"
        elif first & 0x70:
            problem = "the API server sent a frame with reserved bits set"
        elif opcode == 0x1:
            problem = "KubeVirt sent a text message; the console speaks binary"
        elif opcode not in (0x0, 0x2, 0x8, 0x9, 0xA):
            problem = f"the API server sent an unknown frame type {opcode}"
        elif opcode >= 0x8 and (length > MAX_CONTROL or not first & 0x80):
            problem = "the API server sent a malformed control frame"
        if problem is not None:
            self._end(ConnectionError(problem))
            return
        self._opcode, self._remaining, self._in_payload = opcode, length, True
        self._control.clear()
        if length == 0:
            self._frame_done()

    def _frame_done(self) -> None:
        self._in_payload = False
        if self._opcode >= 0x8:
            self._control_frame()

    def _control_frame(self) -> None:
        payload, opcode = bytes(self._control), self._opcode
        self._control.clear()
        if opcode == 0x9:  # ping: answer with the same payload
            self.send(0xA, payload)
        elif opcode == 0x8:  # the server closes: answer, and end like a TCP FIN
            if not self.closing:
                self.send(0x8, payload[:2])
                self.closing = True
            self._end(None, eof=True)

    def _end(self, exc: Exception | None, *, eof: bool = False) -> None:
        if self._ended:
            return
        if self._refusal is not None and not self.upgraded.done():
            self._refusal_body(ended=True)
        self._ended = True
        if not self.upgraded.done():
            self.upgraded.set_exception(DialRefused(
                closecodes.BAD_UPSTREAM,
                f"the API server closed the console request: {exc}" if exc else
                "the API server closed the console request"))
        elif self._wrapper is None:
            pass  # refused before the upgrade: the inner protocol never started
        elif eof and hasattr(self.inner, "eof_received"):
            self.inner.eof_received()
            self.inner.connection_lost(None)
        else:
            self.inner.connection_lost(exc)
        if self._transport is not None:
            if exc is not None:
                self._transport.abort()
            else:
                self._transport.close()

    # -- what the wrapper asks ----------------------------------------------------------------

    def send(self, opcode: int, payload: bytes | bytearray | memoryview) -> None:
        transport = self._transport
        if transport is None or transport.is_closing() or self._ended:
            return
        transport.write(client_frame(opcode, payload))

    def pause_reading(self) -> None:
        if self._transport is not None and not self.reading_paused:
            self.reading_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and self.reading_paused:
            self.reading_paused = False
            self._transport.resume_reading()

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.send(0x8, struct.pack("!H", 1000))
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self.closing = True
        if self._transport is not None:
            self._transport.abort()

    def write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() if self._transport is not None else 0

    def write_buffer_limits(self) -> tuple[int, int]:
        if self._transport is None:
            return (0, 0)
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None, low: int | None) -> None:
        if self._transport is not None:
            self._transport.set_write_buffer_limits(high, low)

    def extra_info(self, name: str, default: Any) -> Any:
        if self._transport is None:
            return default
        return self._transport.get_extra_info(name, default)


class KubeVirtDialer:
    """Opens consoles through the API server with the relay's Kubernetes credentials.

    The connection (kubeconfig, or the pod's ServiceAccount: token re-read at each dial) is
    loaded on first use, so a relay without KubeVirt targets never loads the kubernetes package.
    """

    def __init__(self, load: Callable[[], KubeConnection]) -> None:
        self._load = load
        self._connection: KubeConnection | None = None

    def connection(self) -> KubeConnection:
        if self._connection is None:
            try:
                self._connection = self._load()
            except KubeConfigError as exc:
                raise DialRefused(closecodes.INTERNAL_ERROR,
                                  "this relay has no Kubernetes credentials for KubeVirt "
                                  f"consoles ({exc}); run it in the cluster or give "
                                  "--kubeconfig") from None
        return self._connection

    async def dial(self, namespace: str, name: str,
                   factory: Callable[[], asyncio.BaseProtocol]) -> asyncio.Transport:
        """Open the console of VMI `namespace/name`; the caller bounds the time."""
        connection = self.connection()
        url = urlsplit(connection.server)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise DialRefused(closecodes.INTERNAL_ERROR,
                              f"the relay's Kubernetes server URL {connection.server!r} is "
                              "not an http(s) URL")
        port = url.port or (443 if url.scheme == "https" else 80)
        key = base64.b64encode(os.urandom(16))
        host = url.hostname if ":" not in url.hostname else f"[{url.hostname}]"
        lines = [f"GET {url.path.rstrip('/')}{vnc_path(namespace, name)}?{PRESERVE_SESSION} "
                 "HTTP/1.1",
                 f"Host: {host}:{port}", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key.decode()}", "Sec-WebSocket-Version: 13",
                 f"Sec-WebSocket-Protocol: {SUBPROTOCOL}", "User-Agent: vncgate-relay"]
        lines += [f"{k}: {v}" for k, v in connection.headers().items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        stream = KubeVirtStream(factory(), request, key, namespace, name)
        loop = asyncio.get_running_loop()
        context = connection.ssl_context if url.scheme == "https" else None
        transport: asyncio.Transport | None = None
        try:
            transport, _ = await loop.create_connection(
                lambda: stream, url.hostname, port,
                ssl=context if context is not False else None,
                server_hostname=url.hostname if context else None)
            return await stream.upgraded
        except OSError as exc:
            if transport is not None:
                transport.abort()
            raise DialRefused(closecodes.BAD_UPSTREAM,
                              "cannot reach the Kubernetes API server for the console of "
                              f"virtualmachineinstance {namespace}/{name}: "
                              f"{exc.strerror or exc}") from None
        except BaseException:
            if transport is not None:
                transport.abort()
            raise
