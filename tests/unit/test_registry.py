"""The route table, its O(1) revision, and the route wire format."""

from __future__ import annotations

import pytest

from vncgate.common.model import (
    EMPTY_REVISION,
    Route,
    route_from_json,
    table_from_json,
    table_revision,
)
from vncgate.common.rfb import parse_greeting
from vncgate.common.spec import SpecError
from vncgate.relay.closecodes import MAX_REASON_BYTES, clip_reason
from vncgate.relay.session.registry import Registry

A = Route("lab", "a", "10.0.0.1", 5900)
B = Route("lab", "b", "10.0.0.2", 5900, display_name="B", view_only=True)


def test_revision_is_order_independent_and_tracks_changes() -> None:
    assert table_revision([]) == EMPTY_REVISION
    assert table_revision([A, B]) == table_revision([B, A]) != table_revision([A])
    registry = Registry([A])
    assert registry.revision == table_revision([A])
    registry.put(B)
    assert registry.revision == table_revision([A, B])
    registry.put(Route("lab", "a", "10.0.0.9", 5900))
    assert registry.revision == table_revision([Route("lab", "a", "10.0.0.9", 5900), B])
    registry.delete("lab", "a")
    assert registry.revision == table_revision([B])
    registry.delete("lab", "b")
    assert registry.revision == EMPTY_REVISION


def test_replace_reports_and_notifies() -> None:
    registry = Registry([A, B])
    events: list[tuple[str, str | None]] = []
    registry.add_listener(lambda old, new: events.append((old.key, new and new.address)))
    changed_a = Route("lab", "a", "10.0.0.3", 5900)
    assert registry.replace([changed_a, Route("ops", "c", "h", 1)]) == (1, 1, 1)
    assert sorted(events, key=str) == [("lab/a", "10.0.0.3:5900"), ("lab/b", None)]
    assert registry.synced
    assert registry.replace([changed_a, Route("ops", "c", "h", 1)]) == (0, 0, 0)


def test_put_of_an_equal_route_changes_nothing() -> None:
    registry = Registry([A])
    assert registry.put(Route("lab", "a", "10.0.0.1", 5900)) is False


def test_route_json_round_trip_ignores_unknown_fields() -> None:
    body = {**B.to_json(), "futureField": {"enabled": True}}  # from a newer operator
    assert route_from_json(body) == B
    assert table_from_json({"targets": [A.to_json(), B.to_json()]}) == [A, B]
    with pytest.raises(SpecError, match="targets"):
        table_from_json({"routes": []})


def test_ipv6_addresses_are_bracketed() -> None:
    assert Route("lab", "v6", "::1", 5900).address == "[::1]:5900"


@pytest.mark.parametrize(("data", "version"), [
    (b"RFB 003.008\n", "RFB 003.008"), (b"RFB 003.003\n", "RFB 003.003"),
    (b"RFB 003.008", None), (b"SSH-2.0-Open", None), (b"RFB 3.8\n    ", None),
    (b"HTTP/1.1 400", None),
])
def test_greeting(data: bytes, version: str | None) -> None:
    assert parse_greeting(data) == version


def test_close_reasons_fit_a_close_frame_without_breaking_characters() -> None:
    assert clip_reason("short") == "short"
    long = "ü" * 200
    clipped = clip_reason(long)
    assert len(clipped.encode()) <= MAX_REASON_BYTES
    assert clipped.endswith("...")
    clipped.encode().decode()  # still valid UTF-8
