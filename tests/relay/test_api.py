"""The registration API on the internal port: token, validation, table operations, metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import API_TOKEN, RelayFactory
from vncgate.common.addresses import Address
from vncgate.common.client import RelayClient, RelayError
from vncgate.common.model import Route, table_revision
from vncgate.relay.web.server import RelayServer

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
DESK = {"endpoint": {"host": "10.0.0.5", "port": 5900}, "displayName": "Desk", "viewOnly": False}


@pytest.fixture
async def relay(make_relay: RelayFactory) -> AsyncIterator[RelayServer]:
    async with make_relay() as server:
        yield server


async def call(http: aiohttp.ClientSession, method: str, url: str, *, body: Any = None,
               data: str | None = None, headers: dict[str, str] | None = None
               ) -> tuple[int, Any]:
    async with http.request(method, url, json=body, data=data,
                            headers=AUTH if headers is None else headers) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-wrong-token"},
                                     {"Authorization": f"Basic {API_TOKEN}"}])
async def test_api_requires_the_bearer_token(relay: RelayServer, http: aiohttp.ClientSession,
                                             headers: dict[str, str]) -> None:
    status, body = await call(http, "PUT", f"{relay.internal_url}/api/v1/targets/lab/desk",
                              body=DESK, headers=headers)
    assert status == 401
    assert "bearer token" in body["error"]
    assert relay.registry.get("lab", "desk") is None


async def test_api_without_a_configured_token_refuses_everything(
        make_relay: RelayFactory, http: aiohttp.ClientSession) -> None:
    async with make_relay(api_token=None) as relay:
        status, body = await call(http, "GET", f"{relay.internal_url}/api/v1/targets")
    assert status == 401 and "--api-token-file" in body["error"]


async def test_put_get_delete_one_route(relay: RelayServer, http: aiohttp.ClientSession) -> None:
    url = f"{relay.internal_url}/api/v1/targets/lab/desk"
    status, body = await call(http, "PUT", url, body=DESK)
    assert status == 200 and body["changed"] is True
    assert relay.registry.get("lab", "desk") == Route("lab", "desk", "10.0.0.5", 5900,
                                                      display_name="Desk")
    status, body = await call(http, "PUT", url, body=DESK)
    assert body["changed"] is False  # idempotent
    status, table = await call(http, "GET", f"{relay.internal_url}/api/v1/targets")
    assert status == 200
    assert table["targets"] == [{"namespace": "lab", "name": "desk", **DESK, "activeSessions": 0,
                                 "viewers": []}]
    assert table["revision"] == table_revision([Route("lab", "desk", "10.0.0.5", 5900,
                                                      display_name="Desk")])
    status, body = await call(http, "DELETE", url)
    assert status == 200 and body["deleted"] is True
    status, body = await call(http, "DELETE", url)
    assert status == 200 and body["deleted"] is False
    assert len(relay.registry) == 0


@pytest.mark.parametrize(("body", "words"), [
    ({"endpoint": {"host": "10.0.0.5", "port": 70000}}, "endpoint.port"),
    ({"endpoint": {"host": "bad host!", "port": 5900}}, "endpoint.host"),
    ({"endpoint": {"host": "10.0.0.5", "port": "5900"}}, "endpoint.port"),
    ({"endpoint": "10.0.0.5:5900"}, "endpoint"),
    ({"endpoint": {"host": "10.0.0.5", "port": 5900}, "viewOnly": "yes"}, "viewOnly"),
    ({**DESK, "name": "other"}, "must agree"),
    ([1, 2], "JSON object"),
])
async def test_bad_route_is_400_with_the_field(relay: RelayServer, http: aiohttp.ClientSession,
                                               body: Any, words: str) -> None:
    status, reply = await call(http, "PUT", f"{relay.internal_url}/api/v1/targets/lab/desk",
                               body=body)
    assert status == 400
    assert words in reply["error"]
    assert len(relay.registry) == 0


async def test_bad_json_is_400_not_500(relay: RelayServer, http: aiohttp.ClientSession) -> None:
    status, reply = await call(http, "PUT", f"{relay.internal_url}/api/v1/targets/lab/desk",
                               data="{not json", headers={**AUTH,
                                                          "Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in reply["error"]


async def test_bad_names_in_the_path_are_400(relay: RelayServer,
                                             http: aiohttp.ClientSession) -> None:
    status, reply = await call(http, "PUT", f"{relay.internal_url}/api/v1/targets/Lab/desk",
                               body=DESK)
    assert status == 400 and "namespace" in reply["error"]


async def test_replace_table_adds_changes_removes(relay: RelayServer,
                                                  http: aiohttp.ClientSession) -> None:
    relay.registry.put(Route("lab", "old", "10.0.0.1", 5900))
    relay.registry.put(Route("lab", "desk", "10.0.0.2", 5900))
    routes = [Route("lab", "desk", "10.0.0.3", 5900), Route("ops", "bmc", "bmc1.lab", 5901)]
    status, body = await call(http, "PUT", f"{relay.internal_url}/api/v1/targets",
                              body={"targets": [r.to_json() for r in routes]})
    assert status == 200
    assert (body["added"], body["changed"], body["removed"]) == (1, 1, 1)
    assert body["revision"] == table_revision(routes) == relay.registry.revision
    assert sorted(relay.registry, key=lambda r: r.key) == sorted(routes, key=lambda r: r.key)
    assert relay.registry.synced


async def test_replace_table_rejects_duplicates_and_names_the_index(
        relay: RelayServer, http: aiohttp.ClientSession) -> None:
    item = Route("lab", "desk", "10.0.0.3", 5900).to_json()
    status, body = await call(http, "PUT", f"{relay.internal_url}/api/v1/targets",
                              body={"targets": [item, item]})
    assert status == 400 and "targets[1]" in body["error"] and "twice" in body["error"]
    bad = {**item, "endpoint": {"host": "10.0.0.3"}}
    status, body = await call(http, "PUT", f"{relay.internal_url}/api/v1/targets",
                              body={"targets": [item, bad]})
    assert status == 400 and "targets[1].endpoint.port" in body["error"]
    assert len(relay.registry) == 0  # all or nothing


async def test_client_round_trip(relay: RelayServer, http: aiohttp.ClientSession) -> None:
    client = RelayClient(http, relay.internal_url, API_TOKEN)
    desk = Route("lab", "desk", "10.0.0.5", 5900, display_name="Desk", view_only=True)
    await client.put_route(desk)
    snapshot = await client.get_table()
    assert snapshot.routes == {"lab/desk": desk} and snapshot.sessions == {"lab/desk": 0}
    assert snapshot.revision == table_revision([desk])
    assert await client.replace_table([]) == table_revision([])
    await client.delete_route("lab", "desk")  # already gone: not an error
    with pytest.raises(RelayError, match="401"):
        await RelayClient(http, relay.internal_url, "wrong-token-wrong-token").get_table()
    with pytest.raises(RelayError, match="failed"):
        await RelayClient(http, "http://127.0.0.1:9", API_TOKEN, timeout=2).get_table()


async def test_metrics_and_health(relay: RelayServer, http: aiohttp.ClientSession) -> None:
    relay.registry.put(Route("lab", "desk", "10.0.0.5", 5900))
    async with http.get(f"{relay.internal_url}/metrics") as resp:
        text = await resp.text()
    assert resp.status == 200
    assert "vncgate_routes 1.0" in text
    assert "vncgate_connect_seconds_bucket" in text
    async with http.get(f"{relay.public_url}/healthz") as resp:
        assert resp.status == 200
    async with http.get(f"{relay.public_url}/readyz") as resp:
        assert resp.status == 200
    # The registration API is not on the public port.
    async with http.put(f"{relay.public_url}/api/v1/targets/lab/desk", json=DESK,
                        headers=AUTH) as resp:
        assert resp.status in (404, 405)


async def test_metrics_on_their_own_port_leave_the_api_behind(make_relay: RelayFactory,
                                                               http: aiohttp.ClientSession
                                                               ) -> None:
    """--metrics-listen: /metrics moves to its own port, which serves nothing else, so a
    scraper admitted there (the chart's networkPolicy.metricsFrom) cannot reach the API."""
    async with make_relay(metrics_listen=Address("127.0.0.1", 0)) as relay:
        relay.registry.put(Route("lab", "desk", "10.0.0.5", 5900))
        assert relay.metrics_url and relay.metrics_url != relay.internal_url
        async with http.get(f"{relay.metrics_url}/metrics") as resp:
            assert resp.status == 200
            assert "vncgate_routes 1.0" in await resp.text()
        for path in ("/api/v1/targets", "/api/v1/sessions"):
            async with http.get(f"{relay.metrics_url}{path}", headers=AUTH) as resp:
                assert resp.status == 404, path
        async with http.get(f"{relay.internal_url}/metrics") as resp:
            assert resp.status == 404, "the internal port no longer serves /metrics"
        status, _ = await call(http, "GET", f"{relay.internal_url}/api/v1/targets")
        assert status == 200


async def test_readyz_waits_for_the_first_full_table(make_relay: RelayFactory,
                                                     http: aiohttp.ClientSession) -> None:
    async with make_relay(wait_for_sync=True) as relay:
        async with http.get(f"{relay.public_url}/readyz") as resp:
            assert resp.status == 503
            assert "first full table" in (await resp.json())["status"]
        await RelayClient(http, relay.internal_url, API_TOKEN).replace_table([])
        async with http.get(f"{relay.public_url}/readyz") as resp:
            assert resp.status == 200


async def test_summary_view_carries_revision_and_sessions_only(
        make_relay: RelayFactory, http: aiohttp.ClientSession) -> None:
    from harness.servers import TcpServer, echo_rfb

    async with TcpServer(echo_rfb) as server, make_relay() as relay:
        routes = [Route("lab", "desk", "127.0.0.1", server.port),
                  Route("lab", "idle", "127.0.0.1", server.port)]
        client = RelayClient(http, relay.internal_url, API_TOKEN)
        await client.replace_table(routes)
        async with http.ws_connect(f"{relay.public_url}/t/lab/desk/websockify") as ws:
            await ws.receive_bytes(timeout=5)
            summary = await client.get_summary()
        assert summary.revision == table_revision(routes)
        assert summary.synced and summary.route_count == 2
        assert summary.routes == {}
        assert summary.sessions == {"lab/desk": 1}
        assert summary.viewers == {"lab/desk": ["anonymous"]}


async def test_conditional_table_replace_refuses_a_stale_table(
        relay: RelayServer, http: aiohttp.ClientSession) -> None:
    client = RelayClient(http, relay.internal_url, API_TOKEN)
    desk, lab = Route("lab", "desk", "10.0.0.5", 5900), Route("lab", "lab", "10.0.0.6", 5900)
    before = await client.get_summary()
    assert before.boot and before.revision == table_revision([])
    await client.put_route(desk)  # the table moves on after `before` was read
    with pytest.raises(RelayError) as refused:
        await client.replace_table([lab], if_revision=before.revision)
    assert refused.value.status == 412 and "read it again" in str(refused.value)
    assert relay.registry.get("lab", "lab") is None and relay.registry.get("lab", "desk") == desk
    now = await client.get_summary()
    assert await client.replace_table([lab], if_revision=now.revision) == table_revision([lab])
    assert (await client.get_summary()).boot == before.boot  # same process, same boot id


async def test_boot_id_differs_between_relay_starts(make_relay: RelayFactory,
                                                    http: aiohttp.ClientSession) -> None:
    boots = []
    for _ in range(2):
        async with make_relay() as relay:
            boots.append((await RelayClient(http, relay.internal_url, API_TOKEN)
                          .get_summary()).boot)
    assert boots[0] and boots[1] and boots[0] != boots[1]
