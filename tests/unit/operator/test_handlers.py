"""The VncTarget indexes: which names each keeps, and that one watch event parses the spec once."""

from __future__ import annotations

from typing import Any

import kopf
import pytest

from vncgate.operator import handlers, runtime
from vncgate.operator.runtime import IndexedTarget


def body(spec: dict[str, Any]) -> kopf.Body:
    return kopf.Body({"apiVersion": "vncgate.io/v1alpha1", "kind": "VncTarget",
                      "metadata": {"name": "desk", "namespace": "lab", "uid": "u-1",
                                   "generation": 2, "resourceVersion": "7"},
                      "spec": spec})


async def all_indexes(event: kopf.Body) -> tuple[Any, Any, Any]:
    common = {"namespace": "lab", "name": "desk", "body": event}
    return (await handlers.index_target(**common),
            await handlers.index_target_service(**common),
            await handlers.index_target_kubevirt(**common))


async def test_each_index_keeps_its_names() -> None:
    targets, by_service, by_vm = await all_indexes(
        body({"endpoint": {"service": {"name": "desk-svc", "port": 5900}}}))
    assert isinstance(targets[("lab", "desk")], IndexedTarget)
    assert by_service == {("lab", "desk-svc"): "desk"} and by_vm is None
    _, by_service, by_vm = await all_indexes(body({"endpoint": {"kubevirt": {"name": "vm-1"}}}))
    assert by_service is None and by_vm == {("lab", "vm-1"): "desk"}
    _, by_service, by_vm = await all_indexes(
        body({"endpoint": {"address": {"host": "10.0.0.1", "port": 5900}}}))
    assert by_service is None and by_vm is None


@pytest.mark.parametrize("spec", [{}, {"endpoint": "desk"}, {"endpoint": {"service": "desk"}},
                                  {"endpoint": {"service": {"name": 5}}}])
async def test_a_malformed_endpoint_names_nothing(spec: dict[str, Any]) -> None:
    targets, by_service, by_vm = await all_indexes(body(spec))
    assert isinstance(targets[("lab", "desk")].spec, runtime.TargetInvalid)
    assert by_service is None and by_vm is None


async def test_one_watch_event_parses_the_spec_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    parse = runtime.parse_target_spec

    def counted(spec: Any) -> Any:
        calls.append(spec)
        return parse(spec)

    monkeypatch.setattr(runtime, "parse_target_spec", counted)
    await all_indexes(body({"endpoint": {"service": {"name": "desk-svc", "port": 5900}}}))
    assert len(calls) == 1
