"""KubePool: the bound on a process's connections to the API server, against a real HTTP server on
loopback standing in for it (tests/cluster/test_api_connections.py is the real API server).

Requests share at most `max_connections` kept-alive connections, whichever client sends them; a
request that finds none free waits, and fails within its own timeout; watches do not take the
requests' connections."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from kubernetes import client as kubernetes_client

from harness.waiting import eventually
from tests.conftest import relay_settings
from vncgate.common.kube import KubeClient, KubeConnection, KubePool
from vncgate.common.model import Route
from vncgate.relay.access.authz import SAR_PATH, KubernetesAuthorizer
from vncgate.relay.access.identity import AuthMode, Identity
from vncgate.relay.access.proxies import parse_networks
from vncgate.relay.access.tokenreview import (
    TOKEN_REVIEW_PATH,
    TokenReviewer,
    TokenReviewUnavailable,
)
from vncgate.relay.session.consoles import KubeConsoles
from vncgate.relay.settings import AuthSettings
from vncgate.relay.state import RelayKube, RelayState


@dataclass
class ApiServer:
    """Answers every POST after `gate` opens; counts what is under way and who connected."""

    url: str = ""
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: int = 0
    most: int = 0
    answered: int = 0
    renewals: int = 0
    peers: set[tuple[str, int]] = field(default_factory=set)

    async def review(self, request: web.Request) -> web.Response:
        self.peers.add(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await self.gate.wait()
        finally:
            self.in_flight -= 1
        self.answered += 1
        return web.json_response({"status": {"allowed": True}})

    async def token_review(self, request: web.Request) -> web.Response:
        """Every token is alice's, once `gate` opens."""
        self.peers.add(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        self.in_flight += 1
        try:
            await self.gate.wait()
        finally:
            self.in_flight -= 1
        self.answered += 1
        return web.json_response({"status": {"authenticated": True,
                                             "user": {"username": "alice", "groups": ["lab"]}}})

    async def lease(self, request: web.Request) -> web.Response:
        """A Lease renewal: answered at once, gate or not."""
        self.renewals += 1
        return web.json_response({"kind": "Lease"})

    async def watch(self, request: web.Request) -> web.StreamResponse:
        self.peers.add(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(json.dumps({"type": "ADDED", "object": {}}).encode() + b"\n")
        await self.gate.wait()  # held open, as a watch is, until the test lets it end
        return response


@pytest.fixture
async def api() -> AsyncIterator[ApiServer]:
    server = ApiServer()
    app = web.Application()
    app.router.add_post("/review", server.review)
    app.router.add_post(SAR_PATH, server.review)
    app.router.add_post(TOKEN_REVIEW_PATH, server.token_review)
    app.router.add_get("/things", server.watch)
    app.router.add_patch("/apis/coordination.k8s.io/v1/namespaces/relays/leases/{name}",
                         server.lease)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield server
    finally:
        server.gate.set()
        await runner.cleanup()


def connection(api: ApiServer) -> KubeConnection:
    return KubeConnection(api.url, False, kubernetes_client.Configuration())


async def test_clients_of_one_pool_share_its_bound_and_reuse_its_connections(
        api: ApiServer) -> None:
    pool = KubePool(max_connections=2)
    clients = [KubeClient(connection(api), pool=pool) for _ in range(3)]
    try:
        replies = [asyncio.create_task(clients[i % 3].request("POST", "/review", {}))
                   for i in range(8)]
        await eventually(lambda: api.in_flight == 2, "two requests at the server")
        api.gate.set()
        answers = await asyncio.gather(*replies)
        assert all(answer["status"]["allowed"] for answer in answers)
    finally:
        for kube in clients:
            await kube.close()  # not the pool's: it is the caller's
        await pool.close()
    assert api.answered == 8
    assert api.most == 2, api.most
    # Eight requests, two connections: each kept alive for the next request that waited.
    assert len(api.peers) == 2, api.peers


async def test_a_request_that_gets_no_connection_in_time_fails(api: ApiServer) -> None:
    pool = KubePool(max_connections=1)
    holder = KubeClient(connection(api), timeout=60, pool=pool)
    waiter = KubeClient(connection(api), timeout=0.5, pool=pool)
    try:
        held = asyncio.create_task(holder.request("POST", "/review", {}))
        await eventually(lambda: api.in_flight == 1, "the one connection busy")
        # As an API server that does not answer: the caller's error path (a review denies).
        with pytest.raises(TimeoutError):
            await waiter.request("POST", "/review", {})
        assert len(api.peers) == 1  # it never had a connection of its own
        api.gate.set()
        assert (await held)["status"]["allowed"]
    finally:
        await pool.close()


async def test_a_sent_request_outlives_the_wait_for_a_connection(api: ApiServer) -> None:
    """`sent_timeout`: `timeout` bounds the wait for a connection; a request that has one and
    was sent is given its reply's time, not closed with the connection it holds."""
    pool = KubePool(max_connections=1)
    kube = KubeClient(connection(api), timeout=0.3, pool=pool, sent_timeout=60)
    try:
        sent = asyncio.create_task(kube.request("POST", "/review", {}))
        await eventually(lambda: api.in_flight == 1, "the request at the server")
        with pytest.raises(TimeoutError):  # no connection free within 0.3 s
            await kube.request("POST", "/review", {})
        await asyncio.sleep(0.5)  # past `timeout`: the sent one still waits for its reply
        assert not sent.done()
        api.gate.set()
        assert (await sent)["status"]["allowed"]
        assert api.answered == 1 and len(api.peers) == 1
    finally:
        await pool.close()


async def test_a_review_the_viewer_stopped_waiting_for_answers_the_next_try(
        api: ApiServer) -> None:
    """The viewer is refused for now (unavailable: 4503) when its review is not answered in
    time; the review goes on, on its connection, and its answer is the next try's. The same
    question asked meanwhile waits for the review under way: one review, one connection."""
    pool = KubePool(max_connections=4)
    authorizer = KubernetesAuthorizer(KubeClient(connection(api), pool=pool, sent_timeout=60),
                                      answer_within=0.3)
    alice = Identity(user="alice", groups=("lab",), method="proxy")
    route = Route("lab", "desk", "127.0.0.1", 5900)
    try:
        first, again = await asyncio.gather(authorizer.decide(alice, route),
                                            authorizer.decide(alice, route))
        for decision in (first, again):
            assert not decision.allowed and decision.unavailable, decision
        assert api.in_flight == 1 and api.answered == 0
        assert authorizer.decide_now(alice, route) is None  # nothing cached yet
        api.gate.set()
        await eventually(lambda: authorizer.decide_now(alice, route) is not None,
                         "the review's answer cached")
        decision = await authorizer.decide(alice, route)
        assert decision.allowed and not decision.unavailable, decision
        assert api.answered == 1 and len(api.peers) == 1
    finally:
        await authorizer.close()
        await pool.close()


async def test_a_token_review_the_viewer_stopped_waiting_for_answers_the_next_try(
        api: ApiServer) -> None:
    """As for SubjectAccessReviews: refused for now, one review for the token presented twice
    meanwhile, and its answer is the next try's."""
    pool = KubePool(max_connections=4)
    reviewer = TokenReviewer(KubeClient(connection(api), pool=pool, sent_timeout=60),
                             answer_within=0.3)
    try:
        tries = await asyncio.gather(reviewer.review("a-token"), reviewer.review("a-token"),
                                     return_exceptions=True)
        assert all(isinstance(outcome, TokenReviewUnavailable) for outcome in tries), tries
        assert reviewer.reviews == 1 and api.in_flight == 1 and len(reviewer) == 0
        api.gate.set()
        await eventually(lambda: len(reviewer) == 1, "the review's answer cached")
        identity = await reviewer.review("a-token")
        assert identity is not None and identity.user == "alice"
        assert reviewer.reviews == 1 and api.answered == 1 and len(api.peers) == 1
    finally:
        await reviewer.close()
        await pool.close()


async def test_a_watch_does_not_take_a_requests_connection(api: ApiServer) -> None:
    pool = KubePool(max_connections=1)
    kube = KubeClient(connection(api), timeout=10, pool=pool)
    events = kube.watch("/things")
    try:
        assert (await anext(events))["type"] == "ADDED"  # the watch is open, and stays
        review = asyncio.create_task(kube.request("POST", "/review", {}))
        await eventually(lambda: api.in_flight == 1, "the request at the server beside the watch")
        api.gate.set()
        assert (await review)["status"]["allowed"]
        assert len(api.peers) == 2
    finally:
        await events.aclose()
        await pool.close()


async def test_a_client_without_a_pool_has_its_own_bounded_one(api: ApiServer) -> None:
    assert KubeClient(connection(api)).pool.max_connections == 16
    kube = KubeClient(connection(api), max_connections=1)
    first = asyncio.create_task(kube.request("POST", "/review", {}))
    second = asyncio.create_task(kube.request("POST", "/review", {}))
    try:
        await eventually(lambda: api.in_flight == 1, "one request at the server")
        api.gate.set()
        await asyncio.gather(first, second)
        assert api.most == 1 and len(api.peers) == 1
    finally:
        await kube.close()  # its own pool, with it
    assert kube.pool._requests is None
    with pytest.raises(ValueError, match="at least 1"):
        KubePool(max_connections=0)


def kubeconfig(tmp_path: Path, api: ApiServer) -> Path:
    """A kubeconfig for the relay's account at `api`."""
    config = tmp_path / "kubeconfig"
    config.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": api.url}}],
        "users": [{"name": "u", "user": {"token": "relay-account"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    return config


async def test_the_kubernetes_clients_of_a_relay_share_a_pool_per_kind_of_work(
        api: ApiServer, tmp_path: Path) -> None:
    config = kubeconfig(tmp_path, api)
    settings = relay_settings(
        kubeconfig=config, lease_namespace="relays", peer_service=("relays", "vncgate-relay"),
        kube_api_connections=3,
        auth=AuthSettings(mode=AuthMode.PROXY, authorization="kubernetes",
                          kubernetes_tokens=True,
                          trusted_proxies=parse_networks(["127.0.0.1/32"], "t")))
    state = RelayState(settings=settings)
    try:
        assert isinstance(state.authorizer, KubernetesAuthorizer)
        assert isinstance(state.consoles, KubeConsoles)
        assert state.token_reviewer is not None and state.marks is not None
        assert state.peers.kube is not None
        reviews = [state.authorizer.client, state.token_reviewer.client]
        own = [state.consoles.client, state.marks.client, state.peers.kube,
               state.logins._client()]
        # The viewers' reviews, the relay's own requests and its liveness Lease each have a
        # pool of their own: a storm's reviews cannot hold back a Lease or its renewal.
        assert {id(kube.pool) for kube in reviews} == {id(state.kube.reviews)}
        assert {id(kube.pool) for kube in own} == {id(state.kube.pool)}
        assert state.consoles.liveness.pool is state.kube.liveness
        assert len({id(state.kube.reviews), id(state.kube.pool), id(state.kube.liveness)}) == 3
        assert state.kube.reviews.max_connections == state.kube.pool.max_connections == 3
        assert state.kube.liveness.max_connections == 1
        # One set of credentials, loaded once, for all of them (and KubeVirt consoles).
        clients = [*reviews, *own, state.consoles.liveness]
        assert {id(kube.connection) for kube in clients} == {id(state.kube.connection())}
    finally:
        await state.kube.close()
        state.derivations.close()


async def test_a_burst_of_reviews_does_not_hold_back_the_liveness_renewal(
        api: ApiServer, tmp_path: Path) -> None:
    """Every review connection and every own-request connection busy (held by the server): the
    replica's liveness Lease is still renewed, on its own connection. Were it queued behind
    them, the replica would count itself cut off and end its seated sessions."""
    config = kubeconfig(tmp_path, api)
    kube = RelayKube(relay_settings(kubeconfig=config, kube_api_connections=1))
    reviews, own = kube.client(kube.reviews), kube.client()
    consoles = KubeConsoles(own, "relays", "relay-0", liveness=kube.client(kube.liveness))
    held = [asyncio.create_task(client.request("POST", "/review", {}))
            for client in (reviews, reviews, own, own)]
    try:
        await eventually(lambda: api.in_flight == 2, "both pools' one connection busy")
        await asyncio.wait_for(consoles._renew(), timeout=10)
        assert api.renewals == 1 and api.in_flight == 2 and api.answered == 0
    finally:
        api.gate.set()
        await asyncio.gather(*held)
        await kube.close()
