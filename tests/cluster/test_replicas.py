"""Several relay replicas behave as one relay behind a round-robin balancer with no affinity.

Three (and, to show nothing depends on there being several, one) `vncgate-relay` processes
with the chart's relay ServiceAccount against the real API server, behind HAProxy from Debian
(`mode tcp`, `balance roundrobin`), with a real Xvnc: a single-use link is exchanged once in all,
also after restarts; a sign-out closes the sign-in's consoles on every replica with 4401 and its
cookie is refused everywhere, also by a replica started after it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from yarl import URL

from harness.waiting import eventually
from harness.xvnc import XvncServer
from tests.cluster.conftest import Release
from tests.support.replicas import LINK_KEY, Replicas
from vncgate.relay import closecodes
from vncgate.relay.access import links
from vncgate.relay.access.cookies import SESSION_COOKIE
from vncgate.relay.access.passwords import hash_secret
from vncgate.relay.replicas import KIND_LINK, mark_name

PASSWORD = "correct horse battery staple"


def write_files(workdir: Path, namespace: str, port: int, sessions: dict[str, object]) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "users.yaml").write_text(yaml.safe_dump(
        {"alice": {"secret": hash_secret(PASSWORD), "groups": ["lab"]}}))
    targets = workdir / "targets.yaml"
    targets.write_text(yaml.safe_dump({
        "apiVersion": "vncgate.io/v1alpha1", "kind": "VncTarget",
        "metadata": {"name": "desk", "namespace": namespace},
        "spec": {"endpoint": {"address": {"host": "127.0.0.1", "port": port}},
                 "sessions": sessions}}))
    return targets


@pytest.fixture(params=[3, 1], ids=["three-replicas", "one-replica"])
def replicas(request: pytest.FixtureRequest, release: Release, namespace: str,
             xvnc: XvncServer, tmp_path: Path) -> Iterator[Replicas]:
    targets = write_files(tmp_path, namespace, xvnc.port, {"mode": "shared"})
    with Replicas(release.plane, release.namespace, release.relay_account, tmp_path / "relays",
                  request.param, "--auth=token", f"--users-file={tmp_path / 'users.yaml'}",
                  "--authorization=manifest", f"--targets={targets}") as relays:
        yield relays


def browser() -> aiohttp.ClientSession:
    # A fresh connection per request (force_close), so that the balancer deals each request
    # to the next replica, as a browser's new connections are.
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                 connector=aiohttp.TCPConnector(force_close=True))


async def exchange(http: aiohttp.ClientSession, url: str, target: str, token: str
                   ) -> tuple[int, str]:
    async with http.post(f"{url}/t/{target}/link", json={"token": token},
                         headers={"Origin": url, "X-Requested-With": "vncgate"}) as resp:
        return resp.status, str((await resp.json()).get("error", ""))


async def greeting_or_close(http: aiohttp.ClientSession, url: str, target: str
                            ) -> tuple[bytes | None, int | None, str]:
    async with http.ws_connect(f"{url}/t/{target}/websockify", protocols=("binary",),
                               origin=url) as ws:
        message = await ws.receive(timeout=20)
        if message.type == aiohttp.WSMsgType.BINARY:
            return bytes(message.data), None, ""
        return None, ws.close_code, str(message.extra or "")


def test_a_single_use_link_opens_once_across_replicas_and_restarts(
        replicas: Replicas, release: Release, namespace: str) -> None:
    target = f"{namespace}/desk"
    minted = replicas.members[0].api("POST", "/api/v1/links", {
        "namespace": namespace, "name": "desk", "ttl": "10m", "once": True})
    grant = links.verify((LINK_KEY.encode(),), minted["token"], target)

    async def scenario() -> list[tuple[int, str]]:
        results = []
        # Each exchange from its own browser and connection: round robin gives each replica
        # (at least) one go.
        for _ in range(2 * len(replicas.members) + 1):
            async with browser() as http:
                results.append(await exchange(http, replicas.url, target, minted["token"]))
        return results

    results = asyncio.run(scenario())
    assert [status for status, _ in results].count(200) == 1, (results, replicas.logs())
    assert all("one use only" in reason for status, reason in results if status != 200), results
    # The Lease that makes it so, named from the link's id (a digest: the id is not in it).
    lease = release.plane.get("lease", mark_name(KIND_LINK, grant.link_id),
                              "-n", release.namespace)
    assert lease["metadata"]["labels"]["vncgate.io/lease"] == KIND_LINK
    assert grant.link_id not in lease["metadata"]["name"]

    # Every replica restarted (a rollout): the link stays used, asked of each one directly.
    for member in replicas.members:
        member.script.stop()
        member.start()

    async def again() -> list[int]:
        statuses = []
        for member in replicas.members:
            async with browser() as http:
                statuses.append((await exchange(http, member.url, target, minted["token"]))[0])
        return statuses

    assert asyncio.run(again()) == [403] * len(replicas.members)


def test_a_link_lease_is_named_from_the_link_id() -> None:
    name = mark_name(KIND_LINK, "0123456789abcdef")
    assert re.fullmatch(r"vncgate-link-[0-9a-f]{40}", name) and "0123456789abcdef" not in name


def test_sign_out_closes_every_replicas_consoles_and_the_cookie_stays_refused(
        replicas: Replicas, namespace: str) -> None:
    target = f"{namespace}/desk"
    count = len(replicas.members)

    async def scenario() -> str:
        async with browser() as http:
            csrf = await page_csrf(http, f"{replicas.url}/login")
            async with http.post(f"{replicas.url}/login", allow_redirects=False,
                                 headers={"Origin": replicas.url},
                                 data={"user": "alice", "password": PASSWORD,
                                       "csrf": csrf}) as resp:
                assert resp.status == 303, await resp.text()
            cookie = http.cookie_jar.filter_cookies(URL(replicas.url))[SESSION_COOKIE].value
            # One console on each replica.
            sockets = []
            for member in replicas.members:
                ws = await http.ws_connect(f"{member.url}/t/{target}/websockify",
                                           protocols=("binary",), origin=member.url)
                first = await ws.receive(timeout=20)
                assert first.type == aiohttp.WSMsgType.BINARY, (first, replicas.logs())
                sockets.append(ws)
            csrf = await page_csrf(http, f"{replicas.url}/")
            async with http.post(f"{replicas.url}/logout", allow_redirects=False,
                                 headers={"Origin": replicas.url}, data={"csrf": csrf}) as resp:
                assert resp.status == 303
            for ws in sockets:
                closed = await ws.receive(timeout=20)
                assert (closed.type, closed.data, closed.extra) == (
                    aiohttp.WSMsgType.CLOSE, closecodes.UNAUTHENTICATED, "you signed out"), \
                    (closed, replicas.logs())
                await ws.close()
            return cookie

    cookie = asyncio.run(scenario())
    assert_refused_everywhere(replicas, cookie, target)
    # A replica that was down at the sign-out (restarted after it) refuses it too: it read
    # the sign-out's Lease before serving. SIGKILLed, as a node that dies.
    replicas.members[-1].kill()
    replicas.members[-1].start()
    assert_refused_everywhere(replicas, cookie, target)
    assert count == len(replicas.members)


def assert_refused_everywhere(replicas: Replicas, cookie: str, target: str) -> None:
    async def check() -> None:
        for member in replicas.members:
            async with aiohttp.ClientSession(cookies={SESSION_COOKIE: cookie}) as replay:
                async with replay.get(f"{member.url}/", allow_redirects=False) as resp:
                    assert resp.status == 302 and resp.headers["Location"] == "login", \
                        member.identity
                data, code, _ = await greeting_or_close(replay, member.url, target)
                assert data is None and code == closecodes.UNAUTHENTICATED, member.identity

    asyncio.run(check())


async def page_csrf(http: aiohttp.ClientSession, url: str) -> str:
    async def loaded() -> str | None:
        async with http.get(url) as page:
            match = re.search(r'name="csrf" value="([^"]+)"', await page.text())
        return match.group(1) if match else None

    return await eventually(loaded, f"a CSRF token on {url}", timeout=10)
