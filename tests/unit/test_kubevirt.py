"""endpoint.kubevirt: the spec, the route's wire form, the subresource path, the relay's
KubeVirt stream (its upgrade and WebSocket frames against wsproto playing the API server, and
hand-made hostile frames), and the operator's verdict on a VM."""

from __future__ import annotations

import asyncio
import random
import struct
import threading
from typing import Any

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
)

from vncgate.common.kube import KubeConfigError, KubeConnection
from vncgate.common.model import (
    LOGIN_HELD,
    LOGIN_OK,
    LOGIN_REFUSED,
    LoginOutcome,
    Route,
    login_outcome_from_json,
    route_from_json,
)
from vncgate.common.spec import (
    KUBEVIRT_SESSIONS,
    KubeVirtRef,
    SessionMode,
    SpecError,
    parse_spec,
)
from vncgate.operator import kubevirt as verdicts
from vncgate.operator.policy import AddressPolicy
from vncgate.operator.resolve import evaluate
from vncgate.operator.settings import parse_args
from vncgate.relay import closecodes
from vncgate.relay.session.vmconsole import (
    SUBPROTOCOL,
    DialRefused,
    KubeVirtDialer,
    KubeVirtStream,
    WebSocketTransport,
    console_request,
    vnc_path,
)

# -- the spec ------------------------------------------------------------------------------


def test_a_kubevirt_target_is_exclusive_by_default() -> None:
    spec = parse_spec({"endpoint": {"kubevirt": {"name": "vm-1"}}})
    assert spec.endpoint == KubeVirtRef("vm-1")
    assert spec.sessions == KUBEVIRT_SESSIONS and spec.sessions.exclusive
    with_policy = parse_spec({"endpoint": {"kubevirt": {"name": "vm-1"}},
                              "sessions": {"takeover": "allow", "idleTimeout": "15m"}})
    assert with_policy.sessions.mode is SessionMode.EXCLUSIVE
    assert with_policy.sessions.idle_timeout == 900


def test_shared_is_refused_for_kubevirt_with_what_to_write() -> None:
    with pytest.raises(SpecError) as refused:
        parse_spec({"endpoint": {"kubevirt": {"name": "vm-1"}}, "sessions": {"mode": "shared"}})
    assert refused.value.field == "spec.sessions.mode"
    assert "KubeVirt keeps one VNC connection per VM" in refused.value.message
    assert "leave sessions.mode unset" in refused.value.message


@pytest.mark.parametrize(("endpoint", "field"), [
    ({"kubevirt": {"name": "../secrets"}}, "spec.endpoint.kubevirt.name"),
    ({"kubevirt": {"name": "vm/1"}}, "spec.endpoint.kubevirt.name"),
    ({"kubevirt": {"name": "VM-1"}}, "spec.endpoint.kubevirt.name"),
    ({"kubevirt": {"name": "vm-1", "namespace": "other"}}, "spec.endpoint.kubevirt.namespace"),
    ({"kubevirt": {"name": "vm-1"}, "service": {"name": "a", "port": 1}}, "spec.endpoint"),
])
def test_bad_kubevirt_endpoints(endpoint: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as refused:
        parse_spec({"endpoint": endpoint})
    assert refused.value.field == field


# -- the route -----------------------------------------------------------------------------


def test_the_route_carries_namespace_and_vmi_name() -> None:
    route = Route("lab", "desk", "", 0, kubevirt="vm-1", sessions=KUBEVIRT_SESSIONS)
    body = route.to_json()
    assert body["endpoint"] == {"kubevirt": {"namespace": "lab", "name": "vm-1"}}
    assert route_from_json(body) == route
    assert route.address == "kubevirt/lab/vm-1"


@pytest.mark.parametrize(("endpoint", "field"), [
    ({"kubevirt": {"namespace": "lab", "name": "a/../../b"}}, "endpoint.kubevirt.name"),
    ({"kubevirt": {"namespace": "lab", "name": ".."}}, "endpoint.kubevirt.name"),
    ({"kubevirt": {"namespace": "other", "name": "vm-1"}}, "endpoint.kubevirt.namespace"),
    ({"kubevirt": "vm-1"}, "endpoint.kubevirt"),
])
def test_the_registration_api_refuses_names_that_are_not_names(endpoint: dict[str, Any],
                                                                field: str) -> None:
    with pytest.raises(SpecError) as refused:
        route_from_json({"namespace": "lab", "name": "desk", "endpoint": endpoint})
    assert refused.value.field == field


def test_shared_kubevirt_routes_are_refused_on_the_wire_too() -> None:
    with pytest.raises(SpecError):
        route_from_json({"namespace": "lab", "name": "desk", "sessions": {"mode": "shared"},
                         "endpoint": {"kubevirt": {"namespace": "lab", "name": "vm-1"}}})


def test_the_operator_resolves_a_kubevirt_target_without_lookups() -> None:
    def no_lookup(namespace: str, name: str) -> None:
        raise AssertionError("a kubevirt target names no Service")

    endpoint, route = evaluate("lab", "desk", {"endpoint": {"kubevirt": {"name": "vm-1"}}},
                               no_lookup, AddressPolicy(), "cluster.local")
    assert endpoint == "kubevirt/lab/vm-1"
    assert isinstance(route, Route) and route.kubevirt == "vm-1" and route.sessions.exclusive


# -- the subresource path --------------------------------------------------------------------


def test_the_path_is_built_from_checked_names_only() -> None:
    assert vnc_path("lab", "vm-1.a") == ("/apis/subresources.kubevirt.io/v1/namespaces/lab/"
                                        "virtualmachineinstances/vm-1.a/vnc")
    for namespace, name in (("lab", "../x"), ("lab", "a%2f"), ("a/b", "vm"), ("lab", "a?b")):
        with pytest.raises(SpecError, match="is not a"):
            vnc_path(namespace, name)


# -- the WebSocket (wsproto on the relay's side; the tests play the API server) -------------


class Inner(asyncio.Protocol):
    def __init__(self) -> None:
        self.paused = False
        self.data = bytearray()
        self.transport: WebSocketTransport | None = None
        self.lost: list[Exception | None] = []
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, WebSocketTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False


class Outer(asyncio.Transport):
    """What the stream writes to the API server, and whether it was closed or aborted."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.aborted = False
        self.reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def taken(self) -> bytes:
        """What was written since the last call."""
        data = bytes(self.written)
        self.written.clear()
        return data


TOKEN_HEADERS = {"Authorization": "Bearer relay-token"}


def new_stream() -> tuple[KubeVirtStream, Inner, Outer, WSConnection]:
    """A stream that sent its upgrade request, and the API server's side that read it."""
    inner, outer = Inner(), Outer()
    request = console_request("127.0.0.1:6443", vnc_path("lab", "vm-1"), TOKEN_HEADERS)
    stream = KubeVirtStream(inner, request, "lab", "vm-1")
    stream.connection_made(outer)
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(outer.taken())
    return stream, inner, outer, server


def server_request(server: WSConnection) -> Request:
    events = list(server.events())
    assert len(events) == 1 and isinstance(events[0], Request)
    return events[0]


def upgraded_stream() -> tuple[KubeVirtStream, Inner, Outer, WSConnection]:
    stream, inner, outer, server = new_stream()
    server_request(server)
    stream.data_received(server.send(AcceptConnection(subprotocol=SUBPROTOCOL)))
    assert stream.upgraded.done() and inner.transport is not None
    return stream, inner, outer, server


def from_the_relay(server: WSConnection, outer: Outer) -> list[Event]:
    """What the relay wrote since the last look, as the API server reads it (wsproto as a
    server refuses unmasked frames: reading them at all shows they were masked)."""
    server.receive_data(outer.taken())
    return list(server.events())


def hand_made(first: int, payload: bytes, *, length: bytes | None = None) -> bytes:
    """A server frame built byte by byte, for what no library would send."""
    if length is None:
        length = bytes([len(payload)]) if len(payload) < 126 else \
            bytes([126]) + struct.pack("!H", len(payload))
    return bytes([first]) + length + payload


async def test_the_upgrade_request_asks_for_the_subprotocol_with_the_relays_token() -> None:
    _, _, _, server = new_stream()
    request = server_request(server)
    assert request.target == ("/apis/subresources.kubevirt.io/v1/namespaces/lab/"
                              "virtualmachineinstances/vm-1/vnc")
    assert request.host == "127.0.0.1:6443" and request.subprotocols == [SUBPROTOCOL]
    headers = dict(request.extra_headers)
    assert headers[b"authorization"] == b"Bearer relay-token"
    assert headers[b"user-agent"] == b"vncgate-relay"


async def test_frames_split_anywhere_give_the_byte_stream() -> None:
    stream, inner, outer, server = new_stream()
    server_request(server)
    rng = random.Random(7)  # noqa: S311 - reproducible splits, not a secret
    payloads = [rng.randbytes(rng.choice((0, 1, 125, 126, 300, 65535, 70000)))
                for _ in range(40)]
    # The answer to the upgrade and the first frames in one read, then messages whole and in
    # fragments, with a ping in the middle of a fragmented one.
    wire = server.send(AcceptConnection(subprotocol=SUBPROTOCOL))
    for index, payload in enumerate(payloads):
        if index % 3 == 0:
            half = len(payload) // 2
            wire += server.send(BytesMessage(data=payload[:half], message_finished=False))
            if index == 9:
                wire += server.send(Ping(payload=b"hi"))
            wire += server.send(BytesMessage(data=payload[half:], message_finished=True))
        else:
            wire += server.send(BytesMessage(data=payload))
    wire += server.send(BytesMessage(data=b"RFB 003.008\n"))
    position = 0
    while position < len(wire):
        step = rng.randint(1, 5000)
        stream.data_received(wire[position:position + step])
        position += step
    assert bytes(inner.data) == b"".join(payloads) + b"RFB 003.008\n"
    assert from_the_relay(server, outer) == [Pong(payload=b"hi")]
    assert not inner.lost


async def test_writes_become_masked_binary_frames() -> None:
    _, inner, outer, server = upgraded_stream()
    assert inner.transport is not None
    inner.transport.write(b"RFB 003.008\n")
    frame = bytes(outer.written)
    assert frame[0] == 0x82 and frame[1] == 0x80 | 12  # final, binary; masked, 12 bytes
    assert b"RFB" not in frame
    assert from_the_relay(server, outer) == [BytesMessage(data=b"RFB 003.008\n")]


async def test_flow_control_passes_through_both_ways() -> None:
    stream, inner, outer, _ = upgraded_stream()
    assert inner.transport is not None
    # A slow browser: the bridge pauses reading from the VNC side, i.e. the API server.
    inner.transport.pause_reading()
    assert not outer.reading and not inner.transport.is_reading()
    inner.transport.resume_reading()
    assert outer.reading
    # A slow API server: the bridge's writes wait for its drain.
    stream.pause_writing()
    assert inner.paused
    stream.resume_writing()
    assert not inner.paused


async def test_a_close_frame_ends_the_stream_like_a_fin() -> None:
    stream, inner, outer, server = upgraded_stream()
    stream.data_received(server.send(BytesMessage(data=b"abc"))
                         + server.send(CloseConnection(code=1000)))
    assert bytes(inner.data) == b"abc" and inner.eof and inner.lost == [None]
    assert outer.closed and not outer.aborted
    # The close is answered, as RFC 6455 asks.
    assert from_the_relay(server, outer) == [CloseConnection(code=1000, reason="")]


async def test_the_relay_closes_with_a_close_frame() -> None:
    _, inner, outer, server = upgraded_stream()
    assert inner.transport is not None
    inner.transport.close()
    assert outer.closed and inner.transport.is_closing()
    assert from_the_relay(server, outer) == [CloseConnection(code=1000, reason="")]
    inner.transport.write(b"late")  # after the close: nothing more goes out
    assert outer.written == b""


@pytest.mark.parametrize(("frame", "words"), [
    (hand_made(0x81, b"x"), "KubeVirt sent a text message"),
    (bytes([0x82, 0x81, 1, 2, 3, 4]) + b"x", "unexpected masked frame"),
    (hand_made(0xC2, b"x"), "Reserved bit set"),
    (hand_made(0x89, b"p" * 126), "Control frame with payload len > 125"),
    (hand_made(0x09, b"p"), "fragment control frame"),
    (hand_made(0x80, b"x"), "unexpected CONTINUATION"),
    (hand_made(0x02, b"") + hand_made(0x82, b"b"), "expected CONTINUATION"),
    (hand_made(0x82, b"", length=bytes([127, 0x80, 0, 0, 0, 0, 0, 0, 0])), "non-zero MSB"),
    (hand_made(0x82, b"", length=bytes([126, 0, 5])), "used 2 bytes when 1"),
    (hand_made(0x88, b"\x03"), "CLOSE with 1 byte payload"),
    (hand_made(0x88, struct.pack("!H", 999)), "CLOSE with invalid code"),
    (hand_made(0x88, struct.pack("!H", 1005)), "local-only"),
    (hand_made(0x88, struct.pack("!H", 1000) + b"\xff\xfe"), "utf-8"),
])
async def test_hostile_frames_end_the_stream_and_say_why(frame: bytes, words: str) -> None:
    stream, inner, outer, server = upgraded_stream()
    stream.data_received(server.send(BytesMessage(data=b"before")) + frame
                         + server.send(BytesMessage(data=b"after")))
    assert bytes(inner.data) == b"before"  # nothing after the bad frame is believed
    assert len(inner.lost) == 1 and isinstance(inner.lost[0], ConnectionError)
    assert words in str(inner.lost[0]), inner.lost[0]
    assert not inner.eof and outer.aborted
    stream.data_received(server.send(BytesMessage(data=b"later")))
    assert bytes(inner.data) == b"before" and len(inner.lost) == 1


def refused_with(stream: KubeVirtStream, inner: Inner) -> DialRefused:
    assert stream.upgraded.done()
    with pytest.raises(DialRefused) as refused:
        stream.upgraded.result()
    assert inner.transport is None and not inner.lost  # the viewer's side never started
    return refused.value


@pytest.mark.parametrize(("status", "body", "code", "words"), [
    (403, b'{"kind":"Status","reason":"Forbidden"}', closecodes.FORBIDDEN,
     "may not get virtualmachineinstances/vnc"),
    (404, b'{"kind":"Status","message":"the server could not find the requested resource"}',
     closecodes.BAD_UPSTREAM, "KubeVirt is not installed"),
    (404, b'{"kind":"Status","message":"virtualmachineinstance \\"vm-1\\" not found"}',
     closecodes.BAD_UPSTREAM, "virtualmachineinstance vm-1 does not exist"),
    (503, b"", closecodes.BAD_UPSTREAM, "not available now"),
    (500, b"etcd is on fire", closecodes.BAD_UPSTREAM, "(HTTP 500: etcd is on fire)"),
    (503, b"service unavailable\n", closecodes.BAD_UPSTREAM, "not available now"),
    (503, b'{"kind":"Status","code":503,"message":"Active VNC connection. Request denied."}',
     closecodes.CONFLICT, "in use by another console client"),
])
async def test_refusals_say_what_to_do(status: int, body: bytes, code: int, words: str) -> None:
    stream, inner, outer, _ = new_stream()
    head = (f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    stream.data_received(head)
    if body:  # the body arrives after the head: the message waits for it
        assert not stream.upgraded.done()
        stream.data_received(body)
    refused = refused_with(stream, inner)
    assert refused.code == code and words in refused.reason, refused.reason
    assert outer.closed


async def test_a_refusal_body_that_runs_to_the_end_of_the_connection() -> None:
    stream, inner, _, _ = new_stream()
    stream.data_received(b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\n\r\nno backend")
    assert not stream.upgraded.done()
    stream.eof_received()
    assert "(HTTP 502: no backend)" in refused_with(stream, inner).reason


async def test_a_huge_refusal_body_is_read_only_as_far_as_its_message() -> None:
    stream, inner, _, _ = new_stream()
    stream.data_received(b"HTTP/1.1 500 X\r\nContent-Length: 100000000\r\n\r\n"
                         + b"a" * 3000)
    reason = refused_with(stream, inner).reason
    assert "(HTTP 500: aaaa" in reason and len(reason) < 300


@pytest.mark.parametrize(("answer", "words"), [
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Sec-WebSocket-Accept: bm9wZQ==\r\nSec-WebSocket-Protocol: plain.kubevirt.io\r\n\r\n",
     "Bad accept token"),
    (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n",
     "Missing header, 'Upgrade: websocket'"),
    (b"HTTP/1.1 101 Switching Protocols\r\n" + b"X-Long: " + b"a" * 70000,
     "Receive buffer too long"),
    (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "Bad HTTP message"),
])
async def test_a_wrong_upgrade_answer_is_refused(answer: bytes, words: str) -> None:
    stream, inner, outer, _ = new_stream()
    stream.data_received(answer)
    refused = refused_with(stream, inner)
    assert refused.code == closecodes.BAD_UPSTREAM
    assert "is not a WebSocket upgrade" in refused.reason and words in refused.reason
    assert outer.aborted


async def test_an_upgrade_without_kubevirts_subprotocol_is_refused() -> None:
    stream, inner, outer, server = new_stream()
    server_request(server)
    stream.data_received(server.send(AcceptConnection()))
    refused = refused_with(stream, inner)
    assert "did not accept the plain.kubevirt.io subprotocol" in refused.reason
    assert outer.aborted


async def test_a_connection_closed_before_the_answer() -> None:
    stream, inner, _, _ = new_stream()
    stream.data_received(b"HTTP/1.1 101 Swi")
    stream.connection_lost(ConnectionResetError("reset by peer"))
    refused = refused_with(stream, inner)
    assert refused.reason == "the API server closed the console request: reset by peer"


class TokenWithALineBreak:
    def get_api_key_with_prefix(self, name: str) -> str:
        return "Bearer secret-part\r\nX-Injected: 1"


async def test_a_token_that_cannot_be_a_header_is_refused_without_showing_it() -> None:
    dialer = KubeVirtDialer(lambda: KubeConnection("http://127.0.0.1:9", False,
                                                   TokenWithALineBreak()))
    with pytest.raises(DialRefused) as refused:
        await dialer.dial("lab", "vm-1", Inner)
    assert refused.value.code == closecodes.INTERNAL_ERROR
    assert "cannot be sent as an HTTP header" in refused.value.reason
    assert "secret-part" not in refused.value.reason


async def test_the_credentials_load_in_a_thread_once_and_a_failure_is_tried_again() -> None:
    # Importing the kubernetes package takes seconds on a busy machine: never on the loop.
    loads: list[int] = []

    def load() -> KubeConnection:
        loads.append(threading.get_ident())
        if len(loads) == 1:
            raise KubeConfigError("no kubeconfig here")
        return KubeConnection("http://127.0.0.1:9", False, TokenWithALineBreak())

    dialer = KubeVirtDialer(load)
    dialer.warm()
    dialer.warm()  # one load at a time
    with pytest.raises(DialRefused) as refused:
        await dialer.dial("lab", "vm-1", Inner)
    assert "no Kubernetes credentials for KubeVirt consoles (no kubeconfig here)" in \
        refused.value.reason
    for _ in range(2):  # loaded by the next dial, then kept
        with pytest.raises(DialRefused) as refused:
            await dialer.dial("lab", "vm-1", Inner)
        assert "cannot be sent as an HTTP header" in refused.value.reason
    assert len(loads) == 2 and threading.get_ident() not in loads


# -- the operator's verdict ----------------------------------------------------------------


@pytest.mark.parametrize(("vm", "vmi", "ok", "reason"), [
    (None, {"status": {"phase": "Running"}}, True, verdicts.RUNNING),
    (None, {"status": {"phase": "Scheduling"}}, False, verdicts.STARTING),
    (None, {"status": {}}, False, verdicts.STARTING),
    (None, {"status": {"phase": "Failed"}}, False, verdicts.STOPPED),
    ({"status": {"printableStatus": "Stopped"}}, None, False, verdicts.STOPPED),
    (None, None, False, verdicts.NOT_FOUND),
])
def test_the_verdict_on_a_vm(vm: dict[str, Any] | None, vmi: dict[str, Any] | None, ok: bool,
                             reason: str) -> None:
    result = verdicts.verdict("lab", "vm-1", vm, vmi)
    assert (result.ok, result.reason) == (ok, reason)
    assert "lab/vm-1" in result.message


def test_status_says_when_kubevirt_kept_the_console_for_another_client() -> None:
    # What the relays report of their last attempt at the VM's console (their table summary).
    reason = ("in use by another console client (virtctl vnc or a web console) of VM vm-1; "
              "KubeVirt keeps it for them")
    held = verdicts.console_verdict(LoginOutcome(LOGIN_HELD, 1_700_000_000.0, reason))
    assert held is not None
    ok, why, message = held
    assert (ok, why) == (False, verdicts.HELD_BY_ANOTHER_CLIENT)
    assert reason in message and "next session that opens it clears this" in message
    # Refusals that repeat say the same: no status write each time.
    assert verdicts.console_verdict(LoginOutcome(LOGIN_HELD, 1_700_000_999.0, reason)) == held
    assert verdicts.console_verdict(LoginOutcome(LOGIN_OK, 1.0)) == (
        True, verdicts.CONSOLE_OPENED,
        "the relay opened the VM's console at the last session through it")
    # Nothing reported, or a failure that is not about who holds it: no verdict.
    assert verdicts.console_verdict(None) is None
    assert verdicts.console_verdict(LoginOutcome(LOGIN_REFUSED, 1.0, "wrong password")) is None
    # A hostile reason stays one printable line.
    odd = verdicts.console_verdict(LoginOutcome(LOGIN_HELD, 1.0, "a\x1b[2Jb\nc"))
    assert odd is not None and "\x1b" not in odd[2] and "\n" not in odd[2]
    # An older operator ignores `held` from a newer relay; this one reads it back.
    assert login_outcome_from_json({"result": "held", "at": 1.0, "reason": reason}) == \
        LoginOutcome(LOGIN_HELD, 1.0, reason)


# -- discovery -------------------------------------------------------------------------------


def labelled_vm(**labels: str) -> dict[str, Any]:
    return {"metadata": {"name": "vm-1", "namespace": "lab", "uid": "u-1", "labels": labels,
                         "annotations": {"vncgate.io/display-name": "Lab VM"}}}


def test_discovery_makes_an_owned_target_for_a_labelled_vm() -> None:
    target = verdicts.discovered_target(labelled_vm(**{"vncgate.io/console": "true"}))
    assert target is not None
    assert target["metadata"]["ownerReferences"] == [
        {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": "vm-1", "uid": "u-1",
         "controller": True, "blockOwnerDeletion": False}]
    assert target["spec"] == {"endpoint": {"kubevirt": {"name": "vm-1"}},
                              "displayName": "Lab VM"}
    assert parse_spec(target["spec"]).sessions.exclusive  # a spec the parser takes
    assert verdicts.owned_by(target, "u-1") and not verdicts.owned_by(target, "u-2")


@pytest.mark.parametrize("labels", [{}, {"vncgate.io/console": "false"}, {"other": "true"}])
def test_discovery_ignores_unlabelled_vms(labels: dict[str, str]) -> None:
    assert verdicts.discovered_target(labelled_vm(**labels)) is None


def test_the_discovery_flag() -> None:
    base = ["--relay-url=http://127.0.0.1:8081", f"--api-token-file={__file__}"]
    assert parse_args(base, environ={}).kubevirt_discovery is False
    assert parse_args([*base, "--kubevirt-discovery"], environ={}).kubevirt_discovery is True
    assert parse_args(base, environ={"VNCGATE_KUBEVIRT_DISCOVERY": "true"}).kubevirt_discovery
