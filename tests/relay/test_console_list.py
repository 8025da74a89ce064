"""The console list's logic and its JSON: only what the user may open, the status from what the
relay's own connections found, who is connected and how, and the search, filters and pages
that live in the URL query."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from harness.cluster import free_port
from harness.servers import TcpServer
from tests.conftest import RelayFactory
from tests.relay.test_auth import ALICE_PASSWORD, BOB_TOKEN, USERS, jar_session, sign_in
from vncgate.common.model import Route, route_from_json
from vncgate.common.spec import Access, SpecError
from vncgate.relay import closecodes
from vncgate.relay.access.identity import AuthMode
from vncgate.relay.manifests import load_routes
from vncgate.relay.session.health import TargetHealth, classify
from vncgate.relay.settings import AuthSettings
from vncgate.relay.web.consolelist import ListQuery, ListQueryError, build_page
from vncgate.relay.web.server import RelayServer


def routes(count: int) -> list[Route]:
    return [Route(f"ns-{i % 3}", f"desk-{i:03}", "127.0.0.1", 5900,
                  display_name=f"Desk {i}") for i in range(count)]


def test_paging_grouping_and_facets() -> None:
    health = TargetHealth()
    listing = build_page(ListQuery(per=25), routes(120), health, {})
    assert (listing.total, listing.pages, listing.page, len(listing.rows)) == (120, 5, 1, 25)
    assert (listing.first, listing.last) == (1, 25)
    assert listing.namespaces == ["ns-0", "ns-1", "ns-2"]
    assert [ns for ns, _ in listing.groups()] == ["ns-0"]  # 40 in ns-0: sorted by namespace
    second = build_page(ListQuery(page=2, per=25), routes(120), health, {})
    assert [(ns, len(rows)) for ns, rows in second.groups()] == [("ns-0", 15), ("ns-1", 10)]
    assert listing.phases["Unknown"] == 120
    # A page past the end shows the last one; the URL keeps the filters, drops defaults.
    last = build_page(ListQuery(page=99, per=25), routes(120), health, {})
    assert (last.page, len(last.rows), last.first, last.last) == (5, 20, 101, 120)
    assert ListQuery(q="desk 1", page=3).url(page=4) == "?q=desk+1&page=4"
    assert ListQuery(namespace="ns-1").url(namespace="", page=1) == "?"


def test_search_namespace_label_and_phase_filters() -> None:
    health = TargetHealth()
    table = routes(30)
    health.failed(table[4].key, closecodes.BAD_UPSTREAM,
                  "the VNC server of ns-1/desk-004 refused the connection; is it running?")
    health.connected(table[7].key, "RFB 003.008")
    by_q = build_page(ListQuery(q="DESK-02"), table, health, {})  # any case
    assert {r.route.name for r in by_q.rows} == {f"desk-{i:03}" for i in range(20, 30)}
    by_words = build_page(ListQuery(q="ns-0 desk-02"), table, health, {})  # every word
    assert [r.route.name for r in by_words.rows] == ["desk-021", "desk-024", "desk-027"]
    by_ns = build_page(ListQuery(namespace="ns-1"), table, health, {})
    assert {r.route.namespace for r in by_ns.rows} == {"ns-1"} and by_ns.total == 10
    down = build_page(ListQuery(phase="Unreachable"), table, health, {})
    assert [(r.route.name, r.reason) for r in down.rows] == [("desk-004", "ConnectionRefused")]
    # The phase counts are those under the other filters, so the menu tells what a pick gives.
    assert down.phases == {"Ready": 1, "Unreachable": 1, "Refused": 0, "Invalid": 0,
                           "Unknown": 28}
    viewers = {table[9].key: [{"user": "alice", "mode": "control"},
                              {"user": "bob", "mode": "view"}]}
    ready = build_page(ListQuery(phase="Ready"), table, health, viewers)
    assert [(r.route.name, r.reason, r.viewers) for r in ready.rows] == [
        ("desk-009", "InUse", viewers[table[9].key]), ("desk-007", "Connected", [])]


@pytest.mark.parametrize(("query", "words"), [
    ({"phase": "Up"}, "phase: 'Up' is not one of Ready"),
    ({"page": "0"}, "page: '0'; write a page number from 1"),
    ({"per": "5000"}, "per: '5000'; write one of 25, 50, 100, 200"),
    ({"q": "x" * 201}, "q: at most 200 characters"),
])
def test_bad_queries_say_what_to_write(query: dict[str, str], words: str) -> None:
    with pytest.raises(ListQueryError, match=words.replace("(", r"\(")):
        ListQuery.parse(query)


@pytest.mark.parametrize(("code", "message", "verdict"), [
    (closecodes.BAD_UPSTREAM, "the VNC server of a/b refused the connection; is it running?",
     ("Unreachable", "ConnectionRefused")),
    (closecodes.UPSTREAM_TIMEOUT, "the VNC server of a/b did not answer within 2s",
     ("Unreachable", "Timeout")),
    (closecodes.BAD_UPSTREAM, "the server of a/b is not a VNC server (no RFB greeting)",
     ("Unreachable", "NotVNC")),
    (closecodes.BAD_UPSTREAM, "the VNC server refused the relay: Too many security failures",
     ("Refused", "Blacklisted")),
    (closecodes.CREDENTIAL_REFUSED, "the VNC server refused the password in Secret lab/x",
     ("Refused", "CredentialRefused")),
    (closecodes.FORBIDDEN, "a/b resolves to 169.254.169.254, which this relay may not reach",
     ("Invalid", "AddressDenied")),
    (closecodes.OVER_CAPACITY, "the relay is at its limit", None),  # not about the target
])
def test_connection_outcomes_classified(code: int, message: str,
                                        verdict: tuple[str, str] | None) -> None:
    assert classify(code, message) == verdict


@pytest.fixture
async def token_relay(make_relay: RelayFactory, backend: TcpServer
                      ) -> AsyncIterator[RelayServer]:
    auth = AuthSettings(mode=AuthMode.TOKEN, users=USERS, session_secret=b"s" * 32)
    table = [Route("lab", "open", "127.0.0.1", backend.port, display_name="Open desk"),
             Route("lab", "bobs", "127.0.0.1", backend.port, access=Access(users=("bob",))),
             Route("lab", "down", "127.0.0.1", free_port()),
             Route("ops", "admins", "127.0.0.1", backend.port,
                   access=Access(groups=("lab-admins",)))]
    async with make_relay(routes=table, auth=auth) as relay:
        yield relay


async def consoles(http: aiohttp.ClientSession, relay: RelayServer, query: str = "",
                   **kwargs: object) -> dict[str, object]:
    async with http.get(f"{relay.public_url}/api/v1/consoles{query}", **kwargs) as resp:  # type: ignore[arg-type]
        assert resp.status == 200, await resp.text()
        assert resp.headers["Cache-Control"] == "no-store"
        body: dict[str, object] = await resp.json()
        return body


async def test_json_lists_only_what_the_user_may_open_with_status_and_viewers(
        token_relay: RelayServer) -> None:
    relay = token_relay
    async with jar_session() as http:
        async with http.get(f"{relay.public_url}/api/v1/consoles") as resp:
            assert resp.status == 401 and (await resp.json())["error"] == "sign in first"
        assert (await sign_in(http, relay, "alice", ALICE_PASSWORD)).status == 303
        body = await consoles(http, relay)
        assert [(c["namespace"], c["name"], c["phase"]) for c in body["consoles"]] == [  # type: ignore[attr-defined]
            ("lab", "down", "Unknown"), ("lab", "open", "Unknown"), ("ops", "admins", "Unknown")]
        # Alice opens two consoles: one answers (and stays open), one refuses.
        async with http.ws_connect(f"{relay.public_url}/t/lab/open/websockify",
                                   origin=relay.public_url) as ws:
            assert (await ws.receive(timeout=5)).type is aiohttp.WSMsgType.BINARY
            async with http.ws_connect(f"{relay.public_url}/t/lab/down/websockify",
                                       origin=relay.public_url) as refused:
                msg = await refused.receive(timeout=5)
                assert msg.data == closecodes.BAD_UPSTREAM
            body = await consoles(http, relay)
            found = {c["name"]: c for c in body["consoles"]}  # type: ignore[attr-defined]
            assert (found["open"]["phase"], found["open"]["reason"]) == ("Ready", "InUse")
            assert found["open"]["viewers"] == [{"user": "alice", "mode": "control"}]
            assert (found["down"]["phase"], found["down"]["reason"]) == (
                "Unreachable", "ConnectionRefused")
            assert "refused the connection" in found["down"]["message"]
            # Filters in the query: the same ones the page takes.
            body = await consoles(http, relay, "?phase=Unreachable")
            assert [c["name"] for c in body["consoles"]] == ["down"]  # type: ignore[attr-defined]
            async with http.get(f"{relay.public_url}/api/v1/consoles?per=7") as resp:
                assert resp.status == 400 and "per: '7'" in (await resp.json())["error"]
            async with http.get(f"{relay.public_url}/?q=open+desk") as resp:
                page = await resp.text()
            assert 'data-key="lab/open"' in page and 'data-key="lab/down"' not in page
            assert "alice (control)" in page
    # Bob, by bearer token: his own console and the open ones, not the admins'.
    bob = {"Authorization": f"Bearer {BOB_TOKEN}"}
    async with aiohttp.ClientSession() as http:
        body = await consoles(http, relay, headers=bob)
        assert sorted(c["name"] for c in body["consoles"]) == ["bobs", "down", "open"]  # type: ignore[attr-defined]
        # Who is on a console, for its viewer page: only for those who may open it.
        async with http.get(f"{relay.public_url}/t/lab/open/viewers", headers=bob) as resp:
            assert resp.status == 200 and await resp.json() == {"viewers": []}
        async with http.get(f"{relay.public_url}/t/ops/admins/viewers", headers=bob) as resp:
            assert resp.status == 404
        async with http.get(f"{relay.public_url}/t/lab/open/viewers") as resp:
            assert resp.status == 401


def test_labels_from_manifests_filter_the_list(tmp_path: Path) -> None:
    (tmp_path / "targets.yaml").write_text("""
apiVersion: vncgate.io/v1alpha1
kind: VncTarget
metadata: {name: bmc-1, namespace: lab, labels: {rack: r12, vncgate.io/kind: bmc}}
spec: {endpoint: {address: {host: 10.20.0.15, port: 5900}}}
---
apiVersion: vncgate.io/v1alpha1
kind: VncTarget
metadata: {name: desk-1, namespace: lab, labels: {rack: r7}}
spec: {endpoint: {address: {host: 10.20.0.16, port: 5900}}}
---
apiVersion: vncgate.io/v1alpha1
kind: VncTarget
metadata: {name: plain, namespace: lab}
spec: {endpoint: {address: {host: 10.20.0.17, port: 5900}}}
""")
    table = load_routes([tmp_path])
    health = TargetHealth()

    def names(query: ListQuery) -> list[str]:
        return [row.route.name for row in build_page(query, table, health, {}).rows]

    assert names(ListQuery(label="rack")) == ["bmc-1", "desk-1"]
    assert names(ListQuery(label="rack=r12")) == ["bmc-1"]
    assert names(ListQuery(label="vncgate.io/kind=bmc")) == ["bmc-1"]
    assert names(ListQuery(q="r7")) == ["desk-1"]  # the search sees labels too
    # The wire form carries them (absent when there are none, so old digests hold).
    assert route_from_json(table[0].to_json()).labels == (("rack", "r12"),
                                                          ("vncgate.io/kind", "bmc"))
    assert "labels" not in table[2].to_json()


@pytest.mark.parametrize(("labels", "words"), [
    ({"-bad": "x"}, "not a label key"),
    ({"a/b/c": "x"}, "not a label key"),
    ({"rack": "has space"}, "a label value is a string of at most 63"),
    ({"rack": 7}, "a label value is a string"),
    ([["rack", "r1"]], "must be"),
])
def test_bad_labels_are_named(labels: object, words: str) -> None:
    body = {"namespace": "lab", "name": "x", "endpoint": {"host": "10.0.0.5", "port": 5900},
            "labels": labels}
    with pytest.raises(SpecError, match=words):
        route_from_json(body)
