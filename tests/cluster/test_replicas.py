"""Several relay replicas behave as one relay behind a round-robin balancer with no affinity.

Three (and, to show nothing depends on there being several, one) `vncgate-relay` processes
with the chart's relay ServiceAccount against the real API server, behind HAProxy from Debian
(`mode tcp`, `balance roundrobin`), with a real Xvnc: a single-use link is exchanged once in all,
also after restarts; a sign-out closes the sign-in's consoles on every replica with 4401 and its
cookie is refused everywhere, also by a replica started after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import aiohttp
import pytest
import yaml
from playwright.async_api import async_playwright
from yarl import URL

from harness.waiting import eventually, wait_until
from harness.xvnc import XvncServer
from tests.cluster.conftest import Release
from tests.e2e.conftest import CHROMIUM, CHROMIUM_ARGS
from tests.e2e.test_viewer import wait_for_pixel
from tests.operator.conftest import conditions
from tests.relay.test_second_review import from_address, sign_in_at
from tests.support.processes import ConsoleScript
from tests.support.replicas import LINK_KEY, SESSION_KEY, Replica, Replicas
from vncgate.relay import closecodes
from vncgate.relay.access import links
from vncgate.relay.access.cookies import SESSION_COOKIE, read_session_cookie, revocation_key
from vncgate.relay.access.passwords import hash_secret
from vncgate.relay.replicas import KIND_LINK, mark_name

PASSWORD = "correct horse battery staple"
TOKEN = "alice-token-0123456789abcdef"
BAD_TOKEN = "not-a-token-of-anyone"


def write_files(workdir: Path, namespace: str, port: int, sessions: dict[str, object]) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "users.yaml").write_text(yaml.safe_dump(
        {"alice": {"secret": hash_secret(PASSWORD), "groups": ["lab"]},
         "carol": {"secret": hash_secret(PASSWORD)}, "alice-script": {"token": TOKEN}}))
    targets = workdir / "targets.yaml"
    targets.write_text(yaml.safe_dump({
        "apiVersion": "vncgate.io/v1alpha1", "kind": "VncTarget",
        "metadata": {"name": "desk", "namespace": namespace},
        "spec": {"endpoint": {"address": {"host": "127.0.0.1", "port": port}},
                 "sessions": sessions}}))
    return targets


def replicas_of(count: int, release: Release, namespace: str, xvnc: XvncServer,
                tmp_path: Path, sessions: dict[str, object]) -> Replicas:
    targets = write_files(tmp_path, namespace, xvnc.port, sessions)
    return Replicas(release.plane, release.namespace, release.relay_account, tmp_path / "relays",
                    count, "--auth=token", f"--users-file={tmp_path / 'users.yaml'}",
                    "--authorization=manifest", f"--targets={targets}")


@pytest.fixture(params=[3, 1], ids=["three-replicas", "one-replica"])
def replicas(request: pytest.FixtureRequest, release: Release, namespace: str,
             xvnc: XvncServer, tmp_path: Path) -> Iterator[Replicas]:
    with replicas_of(request.param, release, namespace, xvnc, tmp_path,
                     {"mode": "shared"}) as relays:
        yield relays


@pytest.fixture(params=[3, 1], ids=["three-replicas", "one-replica"])
def limited(request: pytest.FixtureRequest, release: Release, namespace: str,
            xvnc: XvncServer, tmp_path: Path) -> Iterator[Replicas]:
    with replicas_of(request.param, release, namespace, xvnc, tmp_path,
                     {"mode": "shared", "maxViewers": 2, "interactive": "first"}) as relays:
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
        # (at least) one go. At most five failures: the sixth from this address in a minute
        # is a 429 on any replica (the bad-link limit counts every replica's failures).
        for _ in range(len(replicas.members) + 2):
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

    # Every replica restarted (a rollout; the first one SIGKILLed, as a node that dies): the
    # link stays used, asked of each one directly.
    for index, member in enumerate(replicas.members):
        if index == 0:
            member.kill()
        else:
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
            if count > 1:
                # A replica dies (SIGKILL) before the sign-out: the broadcast cannot reach it.
                replicas.members[-1].kill()
                await sockets.pop().close()
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
    # The replica that was down at the sign-out (started after it) refuses it too: it read the
    # sign-out's Lease before serving. With one replica: it dies after the sign-out.
    if count == 1:
        assert_refused_everywhere(replicas, cookie, target)
        replicas.members[-1].kill()
    replicas.members[-1].start()
    assert_refused_everywhere(replicas, cookie, target)


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


async def viewer(url: str) -> tuple[aiohttp.ClientWebSocketResponse | None, int | None, str]:
    """A viewer with a bearer token: its open WebSocket (after the RFB greeting), or the close
    code and reason."""
    http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"})
    ws = await http.ws_connect(f"{url}/websockify", protocols=("binary",),
                               origin=url.split("/t/")[0])
    first = await ws.receive(timeout=20)
    if first.type == aiohttp.WSMsgType.BINARY:
        ws._vncgate_http = http  # type: ignore[attr-defined]  # closed with the socket
        return ws, None, ""
    await http.close()
    return None, ws.close_code, str(first.extra or "")


async def close_viewer(ws: aiohttp.ClientWebSocketResponse) -> None:
    await ws.close()
    await ws._vncgate_http.close()  # type: ignore[attr-defined]


async def opened(url: str) -> aiohttp.ClientWebSocketResponse | None:
    ws, _, _ = await viewer(url)
    return ws


def view_only_of(member: Replica) -> list[bool]:
    return sorted(s["viewOnly"] for s in member.api("GET", "/api/v1/sessions")["sessions"])


def test_max_viewers_and_the_first_viewers_control_hold_across_replicas(
        limited: Replicas, namespace: str) -> None:
    members, count = limited.members, len(limited.members)

    def on(index: int) -> str:
        return f"{members[index % count].url}/t/{namespace}/desk"

    async def scenario() -> None:
        first, _, _ = await viewer(on(0))
        second, _, _ = await viewer(on(1))
        assert first is not None and second is not None, limited.logs()
        try:
            # The second viewer, on another replica, only watches: the first one types.
            assert view_only_of(members[0]) == ([False] if count > 1 else [False, True])
            if count > 1:
                assert view_only_of(members[1]) == [True]
            # maxViewers: 2 holds for the relay as a whole: on the third replica, and through
            # the balancer (whichever replica it deals the viewer to).
            for url in (on(2), f"{limited.url}/t/{namespace}/desk"):
                refused, code, reason = await viewer(url)
                assert refused is None and code == 4409, (code, reason, limited.logs())
                assert "already has 2 viewers" in reason, reason
            # The console list counts every replica's viewers (its JSON, the page's rows).
            async with aiohttp.ClientSession(
                    headers={"Authorization": f"Bearer {TOKEN}"}) as http, http.get(
                    f"{members[2 % count].url}/api/v1/consoles") as page:
                listed = {c["name"]: c for c in (await page.json())["consoles"]}
            assert len(listed["desk"]["viewers"]) == 2, listed
            if count > 1:
                # The replica of the second viewer dies (SIGKILL): its viewer is gone, but
                # the slot it held is free only when that replica's liveness Lease expires
                # (30 s); then one more viewer gets in, and only watches (the first viewer
                # still has control).
                members[1].kill()
                third = await eventually(lambda: opened(on(2)),
                                         "a slot freed by the dead replica's expiry",
                                         timeout=90, interval=1)
                assert view_only_of(members[2]) == [True]
                await close_viewer(third)
        finally:
            await close_viewer(second)
            await close_viewer(first)

        # The first viewer left: the next one types.
        async def typing() -> bool:
            ws, _, _ = await viewer(on(2))
            if ws is None:
                return False
            try:
                return view_only_of(members[2 % count]) == [False]
            finally:
                await close_viewer(ws)

        await eventually(typing, "a viewer that types after the first left", timeout=30)

    asyncio.run(scenario())


def test_sign_in_limits_count_every_replicas_failures(replicas: Replicas) -> None:
    members, count = replicas.members, len(replicas.members)

    async def scenario() -> None:
        # Per address (5 a minute): one address guessing through the balancer, each request
        # on a new connection, so on the next replica.
        async with browser() as http:
            statuses = [await sign_in_at(http, replicas.url, "mallory", "wrong")
                        for _ in range(7)]
        assert statuses == [401] * 5 + [429] * 2, (statuses, replicas.logs())
        # Per account (10 in 5 minutes), whatever the address: six addresses, two guesses each,
        # every guess on the next replica.
        statuses = []
        for n in range(6):
            async with from_address(f"127.0.0.{10 + n}") as http:
                for guess in range(2):
                    member = members[(2 * n + guess) % count]
                    statuses.append(await sign_in_at(http, member.url, "alice", "wrong"))
        assert statuses == [401] * 10 + [429] * 2, (statuses, replicas.logs())
        if count > 1:
            # A replica dies (SIGKILL): its failures cannot be counted, so sign-ins are
            # refused (fail closed) until it is back.
            members[1].kill()
            async with from_address("127.0.0.50") as http:
                assert await sign_in_at(http, members[0].url, "carol", PASSWORD) == 503
            members[1].start()
        async with from_address("127.0.0.51") as http:
            assert await sign_in_at(http, members[0].url, "carol", PASSWORD) == 303

    asyncio.run(scenario())


@pytest.mark.timeout(300)  # three relays, the operator, and a replica's death to notice
def test_the_operator_counts_every_replicas_viewers_in_status(
        release: Release, namespace: str, xvnc: XvncServer, tmp_path: Path) -> None:
    """Three replicas filled by the operator (no manifests): a viewer on each, and the
    VncTarget's status.activeSessions says 3, then 2 after a replica is SIGKILLed; the target
    stays Ready (its Registered condition unchanged), and one created while the replica is down
    turns Ready and opens: Registered is judged over the replicas that answer."""
    plane = release.plane
    with Replicas(plane, release.namespace, release.relay_account, tmp_path / "relays", 3,
                  "--auth=none") as relays:
        kubeconfig = plane.service_account_kubeconfig(
            tmp_path / "operator-kubeconfig", release.namespace, release.operator_account)
        operator = ConsoleScript("vncgate-operator", [
            *(f"--relay-url={m.internal_url}" for m in relays.members),
            f"--api-token-file={tmp_path / 'relays' / 'api-token'}",
            "--public-url=https://vnc.example.com", "--allow-cidr=127.0.0.0/8",
            "--probe-interval=1h", "--resync-interval=1h", "--liveness=off", "--standalone"],
            tmp_path, env={"KUBECONFIG": str(kubeconfig)})
        with operator:
            plane.apply({"apiVersion": "vncgate.io/v1alpha1", "kind": "VncTarget",
                         "metadata": {"name": "desk", "namespace": namespace},
                         "spec": {"endpoint": {"address": {"host": "127.0.0.1",
                                                           "port": xvnc.port}}}})

            def status() -> dict[str, object]:
                operator.check_running()
                return plane.get("vnc", "desk", "-n", namespace).get("status") or {}

            wait_until(lambda: status().get("phase") == "Ready", "desk Ready", timeout=90)

            async def scenario() -> None:
                sockets = []
                try:
                    for member in relays.members:
                        ws, code, reason = await viewer_without_sign_in(
                            f"{member.url}/t/{namespace}/desk")
                        assert ws is not None, (code, reason, relays.logs())
                        sockets.append(ws)
                    await asyncio.to_thread(
                        wait_until, lambda: status().get("activeSessions") == 3,
                        "activeSessions 3", timeout=60)
                    registered = conditions(status())["Registered"]
                    assert registered["status"] == "True", status()
                    relays.members[2].kill()
                    await asyncio.to_thread(
                        wait_until, lambda: status().get("activeSessions") == 2,
                        "activeSessions 2 after a replica died", timeout=60)
                    # The two that answer serve desk: it stays Ready, its Registered
                    # condition untouched (no Pending and back for every target).
                    assert status().get("phase") == "Ready", status()
                    assert conditions(status())["Registered"] == registered, status()
                    # A target created while the replica is down is served by the others.
                    plane.apply({"apiVersion": "vncgate.io/v1alpha1", "kind": "VncTarget",
                                 "metadata": {"name": "desk-2", "namespace": namespace},
                                 "spec": {"endpoint": {"address": {
                                     "host": "127.0.0.1", "port": xvnc.port}}}})
                    await asyncio.to_thread(
                        wait_until, lambda: (plane.get("vnc", "desk-2", "-n", namespace)
                                             .get("status") or {}).get("phase") == "Ready",
                        "desk-2 Ready with a replica down", timeout=90)
                    ws, code, reason = await viewer_without_sign_in(
                        f"{relays.members[0].url}/t/{namespace}/desk-2")
                    assert ws is not None, (code, reason, relays.logs())
                    sockets.append(ws)
                    assert conditions(status())["Registered"] == registered, status()
                finally:
                    for ws in sockets:
                        await close_viewer(ws)

            asyncio.run(scenario())


async def viewer_without_sign_in(url: str
                                 ) -> tuple[aiohttp.ClientWebSocketResponse | None, int | None,
                                            str]:
    http = aiohttp.ClientSession()
    ws = await http.ws_connect(f"{url}/websockify", protocols=("binary",),
                               origin=url.split("/t/")[0])
    first = await ws.receive(timeout=20)
    if first.type == aiohttp.WSMsgType.BINARY:
        ws._vncgate_http = http  # type: ignore[attr-defined]  # closed with the socket
        return ws, None, ""
    await http.close()
    return None, ws.close_code, str(first.extra or "")


def test_a_sign_out_kept_by_another_replica_reaches_a_running_one_by_its_watch(
        release: Release, namespace: str, xvnc: XvncServer, tmp_path: Path) -> None:
    """A replica the broadcast did not reach (not in the signing-out replica's peers) learns
    the sign-out from the Lease that keeps it, by its watch, and closes the console."""
    with replicas_of(1, release, namespace, xvnc, tmp_path, {"mode": "shared"}) as relays:
        member = relays.members[0]

        async def scenario() -> None:
            async with browser() as http:
                csrf = await page_csrf(http, f"{member.url}/login")
                async with http.post(f"{member.url}/login", allow_redirects=False,
                                     headers={"Origin": member.url},
                                     data={"user": "alice", "password": PASSWORD,
                                           "csrf": csrf}) as resp:
                    assert resp.status == 303
                cookie = http.cookie_jar.filter_cookies(URL(member.url))[SESSION_COOKIE].value
                claim = read_session_cookie(SESSION_KEY.encode(), cookie)
                assert claim is not None
                async with http.ws_connect(f"{member.url}/t/{namespace}/desk/websockify",
                                           protocols=("binary",), origin=member.url) as ws:
                    first = await ws.receive(timeout=20)
                    assert first.type == aiohttp.WSMsgType.BINARY
                    # The Lease another replica writes when it takes the sign-out.
                    key = revocation_key(claim.sid)
                    await asyncio.to_thread(release.plane.apply, {
                        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": {"name": f"vncgate-signout-{key}",
                                     "namespace": release.namespace,
                                     "labels": {"vncgate.io/lease": "signout"},
                                     "annotations": {"vncgate.io/expires":
                                                     str(claim.expires + 60)}},
                        "spec": {"holderIdentity": "relay-elsewhere"}})
                    closed = await ws.receive(timeout=30)
                    assert (closed.data, closed.extra) == (closecodes.UNAUTHENTICATED,
                                                           "you signed out"), closed
                async with http.get(f"{member.url}/", allow_redirects=False) as page:
                    assert page.status == 302

        asyncio.run(scenario())


@pytest.fixture(params=[3, 1], ids=["three-replicas", "one-replica"])
def first_types(request: pytest.FixtureRequest, release: Release, namespace: str,
                xvnc: XvncServer, tmp_path: Path) -> Iterator[Replicas]:
    with replicas_of(request.param, release, namespace, xvnc, tmp_path,
                     {"mode": "shared", "interactive": "first"}) as relays:
        yield relays


def seat_leases(release: Release) -> list[str]:
    """The names of the slot and control Leases held now."""
    found = release.plane.get("lease", "-n", release.namespace,
                              "-l", "vncgate.io/lease in (slot,control)")
    return [item["metadata"]["name"] for item in found["items"]]


async def seats_freed(release: Release) -> None:
    await eventually(lambda: not seat_leases(release), "every seat released", timeout=30,
                     interval=0.5)


async def at_once(urls: list[str]) -> tuple[list[aiohttp.ClientWebSocketResponse],
                                            list[tuple[int | None, str]]]:
    """Viewers that all arrive at the same moment: the open ones and the refusals."""
    results = await asyncio.gather(*(viewer(url) for url in urls))
    return ([ws for ws, _, _ in results if ws is not None],
            [(code, reason) for ws, code, reason in results if ws is None])


def modes(members: list[Replica]) -> list[bool]:
    """Every live replica's sessions: view-only or not."""
    return sorted(mode for member in members for mode in view_only_of(member))


def test_max_viewers_hold_by_construction_for_viewers_at_once_and_a_replica_cut_off(
        limited: Replicas, release: Release, namespace: str) -> None:
    """maxViewers: 2 with viewers that all arrive within one round trip on every replica,
    and with a replica that answers nobody (SIGSTOP, as a network partition) then dies
    (SIGKILL): its viewers' slots are held until its liveness Lease expires, not counted
    as none."""
    members, count = limited.members, len(limited.members)

    def on(index: int) -> str:
        return f"{members[index % count].url}/t/{namespace}/desk"

    async def scenario() -> None:
        for _ in range(3):
            sockets, refusals = await at_once([on(n) for n in range(3 * count)])
            try:
                assert len(sockets) == 2, (len(sockets), refusals, limited.logs())
                assert all(code == closecodes.CONFLICT and "already has 2 viewers" in reason
                           for code, reason in refusals), refusals
                # interactive: first: of the two, exactly one types.
                assert modes(members) == [False, True], limited.logs()
            finally:
                for ws in sockets:
                    await close_viewer(ws)
            await seats_freed(release)
        # Two viewers on one replica, which then answers nobody: a viewer elsewhere is
        # still refused (its slots are held; a count would have left it out).
        held = [await opened(on(count - 1)) for _ in range(2)]
        assert all(held), limited.logs()
        if count > 1:
            members[-1].freeze()
            refused, code, reason = await viewer(on(0))
            assert refused is None and code == closecodes.CONFLICT, (code, reason)
        # It dies (SIGKILL): its slots are free when its liveness Lease expires (with one
        # replica: at once, when it is started again, since they name its old process).
        members[-1].kill()
        if count == 1:
            members[-1].start()
        alive = members[:-1] if count > 1 else members

        def at(index: int) -> str:
            return f"{alive[index % len(alive)].url}/t/{namespace}/desk"

        first = await eventually(lambda: opened(at(0)), "a slot of the dead replica freed",
                                 timeout=90, interval=1)
        second = await opened(at(1))
        assert second is not None, limited.logs()
        try:
            refused, code, reason = await viewer(at(2))
            assert refused is None and code == closecodes.CONFLICT, (code, reason)
        finally:
            for ws in (first, second):
                await close_viewer(ws)
            for ws in held:
                assert ws is not None
                with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                    await close_viewer(ws)

    asyncio.run(scenario())


def test_only_the_first_viewer_types_for_viewers_at_once_and_a_replica_cut_off(
        first_types: Replicas, release: Release, namespace: str) -> None:
    """interactive: first with viewers that all arrive at once on every replica, and with
    the replica of the viewer that types cut off (SIGSTOP) then dead (SIGKILL): a new viewer
    watches until the dead replica's control Lease expires, then the next one types."""
    members, count = first_types.members, len(first_types.members)

    def on(index: int) -> str:
        return f"{members[index % count].url}/t/{namespace}/desk"

    async def scenario() -> None:
        for _ in range(3):
            sockets, refusals = await at_once([on(n) for n in range(3 * count)])
            try:
                assert not refusals and len(sockets) == 3 * count, refusals
                assert modes(members) == [False] + [True] * (3 * count - 1), \
                    first_types.logs()
            finally:
                for ws in sockets:
                    await close_viewer(ws)
            await seats_freed(release)
        typist = await opened(on(count - 1))
        assert typist is not None and view_only_of(members[-1]) == [False]
        watcher = None
        if count > 1:
            members[-1].freeze()
            watcher = await opened(on(0))
            assert watcher is not None and view_only_of(members[0]) == [True], \
                first_types.logs()
        members[-1].kill()
        if count == 1:
            members[-1].start()

        async def types() -> bool:
            ws = await opened(on(1))
            if ws is None:
                return False
            try:
                return view_only_of(members[1 % count]).count(False) == 1
            finally:
                await close_viewer(ws)

        await eventually(types, "a viewer that types after the typist's replica died",
                         timeout=90, interval=1)
        with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
            await close_viewer(typist)
        if watcher is not None:
            assert view_only_of(members[0]) == [True]  # watchers keep watching
            await close_viewer(watcher)

    asyncio.run(scenario())


def test_bad_token_and_link_limits_count_every_replicas_failures(
        replicas: Replicas, namespace: str) -> None:
    """The per-address limit of failed bearer tokens and share links (5 a minute) holds for
    the relay as a whole; while a replica cannot be asked, a failure is refused with 503."""
    members, count = replicas.members, len(replicas.members)
    target = f"{namespace}/desk"

    async def bad_token(http: aiohttp.ClientSession, url: str, token: str = BAD_TOKEN) -> int:
        async with http.get(f"{url}/api/v1/consoles",
                            headers={"Authorization": f"Bearer {token}"}) as resp:
            return resp.status

    async def scenario() -> None:
        # One address through the balancer, each request on a new connection: each on the
        # next replica.
        async with browser() as http:
            statuses = [await bad_token(http, replicas.url) for _ in range(7)]
        assert statuses == [401] * 5 + [429] * 2, (statuses, replicas.logs())
        # Bad share links from another address, dealt over the replicas by hand.
        statuses = []
        for n in range(7):
            async with from_address("127.0.0.20") as http:
                member = members[n % count]
                status, _ = await exchange(http, member.url, target, "not.a.link")
                statuses.append(status)
        assert statuses == [403] * 5 + [429] * 2, (statuses, replicas.logs())
        if count > 1:
            # A replica dies (SIGKILL): a failure cannot be counted, so it is refused with
            # 503 (fail closed); a good token is never refused for that.
            members[1].kill()
            async with from_address("127.0.0.21") as http:
                assert await bad_token(http, members[0].url) == 503
                status, _ = await exchange(http, members[0].url, target, "not.a.link")
                assert status == 503
                assert await bad_token(http, members[0].url, TOKEN) == 200
            members[1].start()
        async with from_address("127.0.0.22") as http:
            assert await bad_token(http, members[0].url) == 401

    asyncio.run(scenario())


@pytest.mark.e2e
@pytest.mark.timeout(300)
async def test_a_browser_through_the_balancer_sees_the_console_and_signs_out_everywhere(
        replicas: Replicas, namespace: str, xvnc: XvncServer) -> None:
    """Chromium through HAProxy `balance roundrobin` in front of the replicas: it signs in,
    opens a console and sees the Xvnc's colour; a replica that does not serve the console is
    SIGKILLed; signing out from the list page closes the console (back to the sign-in page),
    and the cookie is refused by every replica, the restarted one included."""
    members, count = replicas.members, len(replicas.members)
    target = f"{namespace}/desk"
    url = replicas.url
    xvnc.paint("#ff0000")
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM,
                                                    args=CHROMIUM_ARGS, headless=True)
        try:
            context = await chromium.new_context()
            page = await context.new_page()
            await page.goto(f"{url}/t/{target}/")
            await page.wait_for_url(f"{url}/login?next=t/{target}/", timeout=60_000)
            await page.fill("input[name=user]", "alice")
            await page.fill("input[name=password]", PASSWORD)
            await page.click("button[type=submit]")
            await page.wait_for_url(f"{url}/t/{target}/", timeout=60_000)
            await page.wait_for_selector("body[data-state=connected]", timeout=60_000)
            await wait_for_pixel(page, (255, 0, 0))
            cookie = next(c["value"] for c in await context.cookies()
                          if c["name"] == SESSION_COOKIE)
            serving = [m for m in members if m.api("GET", "/api/v1/sessions")["sessions"]]
            assert len(serving) == 1, replicas.logs()
            killed = None
            if count > 1:
                # In the middle: a replica that does not serve the console dies.
                killed = next(m for m in members if m is not serving[0])
                killed.kill()
            other = await context.new_page()
            await other.goto(f"{url}/")
            await other.click("form[action=logout] button")
            await other.wait_for_url(f"{url}/login**", timeout=60_000)
            # The open console ended with 4401: its viewer went to the sign-in page.
            await page.wait_for_url(f"{url}/login?next=t/{target}/", timeout=60_000)
            await context.close()
        finally:
            await chromium.close()
    if killed is None:  # one replica: it dies after the sign-out
        killed = members[0]
        killed.kill()
    await asyncio.to_thread(killed.start)
    await asyncio.to_thread(assert_refused_everywhere, replicas, cookie, target)


def lease_age(release: Release, identity: str) -> float:
    """Seconds since the replica last renewed its liveness Lease."""
    lease = release.plane.get("lease", f"vncgate-relay-{identity}", "-n", release.namespace)
    renewed = datetime.fromisoformat(lease["spec"]["renewTime"].replace("Z", "+00:00"))
    return time.time() - renewed.timestamp()


@pytest.mark.timeout(300)
def test_a_replica_that_stood_still_past_its_lease_ends_its_seated_viewers(
        limited: Replicas, release: Release, namespace: str) -> None:
    """A replica stopped (SIGSTOP) for longer than its liveness Lease: the others count its
    seats free and let viewers in; when it runs again (SIGCONT) it ends its own seated
    viewer with 4503 rather than keep it past maxViewers."""
    members, count = limited.members, len(limited.members)
    stood = members[-1]

    def on(member: Replica) -> str:
        return f"{member.url}/t/{namespace}/desk"

    async def scenario() -> None:
        held = await opened(on(stood))
        assert held is not None, limited.logs()
        stood.freeze()
        others: list[aiohttp.ClientWebSocketResponse] = []
        try:
            await asyncio.to_thread(wait_until, lambda: lease_age(release, stood.identity) > 31,
                                    "the stopped replica's liveness Lease expired",
                                    timeout=90, interval=1)
            if count > 1:
                # Its slot counts free: two viewers get in on the other replicas.
                others.append(await eventually(lambda: opened(on(members[0])),
                                               "a viewer in the stopped replica's slot",
                                               timeout=30, interval=1))
                second = await opened(on(members[1]))
                assert second is not None, limited.logs()
                others.append(second)
        finally:
            stood.thaw()
        closed = await held.receive(timeout=30)
        assert (closed.type, closed.data) == (aiohttp.WSMsgType.CLOSE,
                                              closecodes.OVER_CAPACITY), (closed, limited.logs())
        assert "lost its hold on the console" in str(closed.extra), closed
        await close_viewer(held)
        try:
            if count > 1:  # the relay as a whole has its two viewers, never three
                refused, code, reason = await viewer(on(members[0]))
                assert refused is None and code == closecodes.CONFLICT, (code, reason)
        finally:
            for ws in others:
                await close_viewer(ws)

    asyncio.run(scenario())
