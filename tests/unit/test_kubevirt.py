"""endpoint.kubevirt: the spec, the route's wire form, the subresource path, the WebSocket
frames of the relay's KubeVirt stream, and the operator's verdict on a VM."""

from __future__ import annotations

import asyncio
import random
import struct
from typing import Any

import pytest

from vncgate.common.model import Route, route_from_json
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
    DialRefused,
    KubeVirtStream,
    WebSocketTransport,
    client_frame,
    mask,
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


# -- WebSocket frames ------------------------------------------------------------------------


def test_client_frames_are_masked() -> None:
    payload = bytes(range(200))
    frame = client_frame(0x2, payload)
    assert frame[0] == 0x82 and frame[1] == 0x80 | 126
    (length,) = struct.unpack("!H", frame[2:4])
    key, body = frame[4:8], frame[8:]
    assert length == 200 and mask(body, key) == payload and body != payload


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
    """What the stream writes to the API server, and whether it was closed."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
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
        self.closed = True


def server_frame(opcode: int, payload: bytes) -> bytes:
    if len(payload) < 126:
        return bytes([0x80 | opcode, len(payload)]) + payload
    if len(payload) < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, len(payload)) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, len(payload)) + payload


def upgraded_stream(key: bytes = b"dGhlIHNhbXBsZSBub25jZQ==") -> tuple[KubeVirtStream, Inner,
                                                                        Outer]:
    inner, outer = Inner(), Outer()
    stream = KubeVirtStream(inner, b"GET ...\r\n\r\n", key, "lab", "vm-1")
    stream.connection_made(outer)
    # RFC 6455's own example: this key is answered with this accept value.
    stream.data_received(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
                         b"Sec-WebSocket-Protocol: plain.kubevirt.io\r\n\r\n")
    assert stream.upgraded.done() and inner.transport is not None
    return stream, inner, outer


async def test_frames_split_anywhere_give_the_byte_stream() -> None:
    stream, inner, outer = upgraded_stream()
    rng = random.Random(7)  # noqa: S311 - reproducible splits, not a secret
    payloads = [rng.randbytes(rng.choice((0, 1, 125, 126, 300, 65535, 70000)))
                for _ in range(40)]
    wire = b"".join(server_frame(0x2, p) for p in payloads)
    wire += server_frame(0x9, b"hi")  # a ping in the middle: answered with a pong
    wire += server_frame(0x2, b"RFB 003.008\n")
    position = 0
    while position < len(wire):
        step = rng.randint(1, 5000)
        stream.data_received(wire[position:position + step])
        position += step
    assert bytes(inner.data) == b"".join(payloads) + b"RFB 003.008\n"
    pong = bytes(outer.written[len(b"GET ...\r\n\r\n"):])
    assert pong[0] == 0x8A and pong[1] == 0x80 | 2 and mask(pong[6:8], pong[2:6]) == b"hi"


async def test_writes_become_masked_binary_frames() -> None:
    _, inner, outer = upgraded_stream()
    assert inner.transport is not None
    before = len(outer.written)
    inner.transport.write(b"RFB 003.008\n")
    frame = bytes(outer.written[before:])
    assert frame[0] == 0x82 and frame[1] == 0x80 | 12
    assert mask(frame[6:], frame[2:6]) == b"RFB 003.008\n"


async def test_flow_control_passes_through_both_ways() -> None:
    stream, inner, outer = upgraded_stream()
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
    stream, inner, outer = upgraded_stream()
    stream.data_received(server_frame(0x2, b"abc") + server_frame(0x8, struct.pack("!H", 1000)))
    assert bytes(inner.data) == b"abc" and inner.eof and inner.lost == [None]
    assert outer.closed


@pytest.mark.parametrize(("frame", "words"), [
    (bytes([0x81, 1]) + b"x", "text message"),
    (bytes([0x82, 0x81, 0, 0, 0, 0]) + b"x", "masked frame"),
    (bytes([0xC2, 1]) + b"x", "reserved bits"),
])
async def test_protocol_errors_end_the_stream(frame: bytes, words: str) -> None:
    stream, inner, outer = upgraded_stream()
    stream.data_received(frame)
    assert len(inner.lost) == 1 and words in str(inner.lost[0])
    assert outer.closed


@pytest.mark.parametrize(("status", "body", "code", "words"), [
    (403, b'{"kind":"Status","reason":"Forbidden"}', closecodes.FORBIDDEN,
     "may not get virtualmachineinstances/vnc"),
    (404, b'{"kind":"Status","message":"the server could not find the requested resource"}',
     closecodes.BAD_UPSTREAM, "KubeVirt is not installed"),
    (404, b'{"kind":"Status","message":"virtualmachineinstance \\"vm-1\\" not found"}',
     closecodes.BAD_UPSTREAM, "virtualmachineinstance vm-1 does not exist"),
    (503, b"", closecodes.BAD_UPSTREAM, "not available now"),
    (503, b"service unavailable\n", closecodes.BAD_UPSTREAM, "not available now"),
    (503, b'{"kind":"Status","code":503,"message":"Active VNC connection. Request denied."}',
     closecodes.CONFLICT, "in use by another console client"),
])
async def test_refusals_say_what_to_do(status: int, body: bytes, code: int, words: str) -> None:
    inner, outer = Inner(), Outer()
    stream = KubeVirtStream(inner, b"GET ...\r\n\r\n", b"key", "lab", "vm-1")
    stream.connection_made(outer)
    head = (f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    # The body arrives after the head: the message waits for it.
    stream.data_received(head)
    stream.data_received(body)
    if not stream.upgraded.done():
        stream.connection_lost(None)
    with pytest.raises(DialRefused) as refused:
        stream.upgraded.result()
    assert refused.value.code == code and words in refused.value.reason
    assert inner.transport is None and not inner.lost  # the viewer's side never started


async def test_a_wrong_accept_value_is_refused() -> None:
    inner, outer = Inner(), Outer()
    stream = KubeVirtStream(inner, b"GET ...\r\n\r\n", b"key", "lab", "vm-1")
    stream.connection_made(outer)
    stream.data_received(b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: nope\r\n"
                         b"Sec-WebSocket-Protocol: plain.kubevirt.io\r\n\r\n")
    with pytest.raises(DialRefused):
        stream.upgraded.result()
    assert outer.closed


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
