"""Authentication and authorization against the real relay over real sockets.

Token mode (login page, cookie, bearer), proxy mode (trusted and spoofed headers), share links
(expired, tampered, reused, wrong target, rotated keys), the failed-login rate limit, and the
Kubernetes SubjectAccessReview path against kmock.
"""

from __future__ import annotations

import hashlib
import logging
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import pytest
from yarl import URL

from harness.servers import GREETING, TcpServer
from harness.waiting import eventually
from tests.conftest import API_TOKEN, ROOT, RelayFactory
from tests.support.kubeconfig import write_kubeconfig
from vncgate.common.model import Route
from vncgate.common.spec import Access
from vncgate.relay import closecodes
from vncgate.relay.access import links
from vncgate.relay.access.cookies import SESSION_COOKIE, session_cookie
from vncgate.relay.access.identity import AuthConfigError, AuthMode
from vncgate.relay.access.passwords import hash_secret, verify_secret
from vncgate.relay.access.proxies import parse_networks
from vncgate.relay.access.users import User, load_users
from vncgate.relay.settings import AuthSettings
from vncgate.relay.web.server import RelayServer

ALICE_PASSWORD = "correct horse battery staple"
BOB_TOKEN = "bob-api-token-0123456789abcdef"
KEY = b"k" * 40
OLD_KEY = b"o" * 40
USERS = {
    "alice": User("alice", hash_secret(ALICE_PASSWORD), ("lab-admins",)),
    "bob": User("bob", "sha256$" + hashlib.sha256(BOB_TOKEN.encode()).hexdigest()),
}


def targets(port: int) -> list[Route]:
    return [Route("lab", "open", "127.0.0.1", port),
            Route("lab", "admins", "127.0.0.1", port, access=Access(groups=("lab-admins",))),
            Route("lab", "bobs", "127.0.0.1", port, access=Access(users=("bob",)))]


@pytest.fixture
async def token_relay(make_relay: RelayFactory, backend: TcpServer) -> AsyncIterator[RelayServer]:
    auth = AuthSettings(mode=AuthMode.TOKEN, users=USERS, session_secret=b"s" * 32,
                        link_keys=(KEY, OLD_KEY))
    async with make_relay(routes=targets(backend.port), auth=auth) as relay:
        yield relay


def jar_session() -> aiohttp.ClientSession:
    # unsafe=True: keep cookies for 127.0.0.1 (an IP address) as a browser would.
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def csrf_from(http: aiohttp.ClientSession, url: str) -> str:
    """Load one of our pages like a browser: it sets the CSRF cookie and carries the token."""
    async with http.get(url) as page:
        match = re.search(r'name="csrf" value="([^"]+)"', await page.text())
    assert match is not None, f"no CSRF token on {url}"
    return match.group(1)


async def sign_in(http: aiohttp.ClientSession, relay: RelayServer, user: str, password: str,
                  next_path: str = "", origin: str = "null") -> aiohttp.ClientResponse:
    # Browsers send `Origin: null` on form posts from a page with Referrer-Policy: no-referrer.
    csrf = await csrf_from(http, f"{relay.public_url}/login")
    return await http.post(f"{relay.public_url}/login", allow_redirects=False,
                           data={"user": user, "password": password, "next": next_path,
                                 "csrf": csrf},
                           headers={"Origin": origin})


async def open_console(http: aiohttp.ClientSession, relay: RelayServer, name: str,
                       **kw: Any) -> tuple[int | None, str]:
    """Open a WebSocket; returns (close code, reason), or (None, "") when the greeting came."""
    async with http.ws_connect(f"{relay.public_url}/t/lab/{name}/websockify",
                               origin=relay.public_url, **kw) as ws:
        msg = await ws.receive(timeout=5)
        if msg.type is aiohttp.WSMsgType.BINARY:
            assert msg.data == GREETING
            return None, ""
        assert msg.type is aiohttp.WSMsgType.CLOSE, msg
        return msg.data, msg.extra or ""


# --- token mode ---------------------------------------------------------------------------

async def test_nobody_signed_in_is_sent_to_login_and_refused_4401(token_relay: RelayServer
                                                                  ) -> None:
    async with jar_session() as http:
        async with http.get(f"{token_relay.public_url}/", allow_redirects=False) as resp:
            assert resp.status == 302 and resp.headers["Location"] == "login"
        code, reason = await open_console(http, token_relay, "open")
    assert code == closecodes.UNAUTHENTICATED and "sign in" in reason


async def test_login_sets_a_signed_httponly_cookie_and_the_list_shows_only_allowed(
        token_relay: RelayServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vncgate.audit")
    async with jar_session() as http:
        resp = await sign_in(http, token_relay, "alice", ALICE_PASSWORD, "t/lab/admins/")
        assert resp.status == 303 and resp.headers["Location"] == "t/lab/admins/"
        cookie = resp.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
        async with http.get(f"{token_relay.public_url}/") as page:
            text = await page.text()
        assert "t/lab/open/" in text and "t/lab/admins/" in text
        assert "t/lab/bobs/" not in text  # alice is not in its access list
        assert "Signed in as alice" in text
        assert await open_console(http, token_relay, "admins") == (None, "")
        code, reason = await open_console(http, token_relay, "bobs")
        assert code == closecodes.FORBIDDEN and "alice is not in the access list" in reason
    events = [r.fields for r in caplog.records if r.name == "vncgate.audit"]  # type: ignore[attr-defined]
    assert {"event": "login", "user": "alice", "result": "ok"}.items() <= events[0].items()
    assert any(e["event"] == "denied" and e["target"] == "lab/bobs" for e in events)
    assert ALICE_PASSWORD not in caplog.text


async def test_wrong_password_and_cross_site_posts_are_refused(token_relay: RelayServer
                                                               ) -> None:
    async with jar_session() as http:
        resp = await sign_in(http, token_relay, "alice", "wrong password!")
        assert resp.status == 401 and "Wrong user or password" in await resp.text()
        assert SESSION_COOKIE not in resp.cookies
        resp = await sign_in(http, token_relay, "alice", ALICE_PASSWORD,
                             origin="https://evil.example")
        assert resp.status == 403
        # A foreign page cannot know the CSRF token: a post without it is refused.
        async with http.post(f"{token_relay.public_url}/login", allow_redirects=False,
                             data={"user": "alice", "password": ALICE_PASSWORD,
                                   "csrf": "guessed"}) as resp:
            assert resp.status == 403
        assert SESSION_COOKIE not in http.cookie_jar.filter_cookies(
            URL(token_relay.public_url))


@pytest.mark.parametrize("next_path", ["//evil.example/", "https://evil.example/",
                                       "/\\evil.example", "t/../../x", "javascript:alert(1)"])
async def test_login_never_redirects_off_site(token_relay: RelayServer, next_path: str) -> None:
    async with jar_session() as http:
        resp = await sign_in(http, token_relay, "alice", ALICE_PASSWORD, next_path)
    assert resp.status == 303
    assert resp.headers["Location"] in ("./", "t/../../x")
    assert "evil" not in resp.headers["Location"] and ":" not in resp.headers["Location"]


async def test_tampered_expired_and_orphaned_cookies_are_not_a_sign_in(
        token_relay: RelayServer) -> None:
    key = b"s" * 32
    good = session_cookie(key, "alice", 3600)
    mac = good.partition(".")[2]
    forged_body = session_cookie(key, "bob", 3600).partition(".")[0]
    cases = {
        "tampered": f"{forged_body}.{mac}",
        "expired": session_cookie(key, "alice", 60, now=1_000_000),
        "other key": session_cookie(b"x" * 32, "alice", 3600),
        "removed user": session_cookie(key, "carol", 3600),
    }
    for case, value in cases.items():
        async with jar_session() as http:
            http.cookie_jar.update_cookies({SESSION_COOKIE: value}, URL(token_relay.public_url))
            code, _ = await open_console(http, token_relay, "open")
            assert code == closecodes.UNAUTHENTICATED, case
    async with jar_session() as http:
        http.cookie_jar.update_cookies({SESSION_COOKIE: good}, URL(token_relay.public_url))
        assert await open_console(http, token_relay, "open") == (None, "")


async def test_bearer_token_for_scripts(token_relay: RelayServer) -> None:
    async with aiohttp.ClientSession() as http:
        ok = await open_console(http, token_relay, "bobs",
                                headers={"Authorization": f"Bearer {BOB_TOKEN}"})
        assert ok == (None, "")
        code, _ = await open_console(http, token_relay, "bobs",
                                     headers={"Authorization": "Bearer not-the-token"})
        assert code == closecodes.UNAUTHENTICATED
        code, _ = await open_console(http, token_relay, "admins",
                                     headers={"Authorization": f"Bearer {BOB_TOKEN}"})
        assert code == closecodes.FORBIDDEN


async def test_failed_logins_are_rate_limited_per_client(token_relay: RelayServer) -> None:
    async with jar_session() as http:
        for _ in range(5):
            resp = await sign_in(http, token_relay, "alice", "guess guess guess")
            assert resp.status == 401
        resp = await sign_in(http, token_relay, "alice", ALICE_PASSWORD)
        assert resp.status == 429  # even the right password waits now
        assert int(resp.headers["Retry-After"]) > 0
        assert "Too many failed sign-ins" in await resp.text()
    # Another client address (127.0.0.2 is loopback too) is not held back.
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=connector,
                                     cookie_jar=aiohttp.CookieJar(unsafe=True)) as other:
        resp = await sign_in(other, token_relay, "alice", ALICE_PASSWORD)
        assert resp.status == 303


async def test_logout_clears_the_cookie(token_relay: RelayServer) -> None:
    async with jar_session() as http:
        await sign_in(http, token_relay, "alice", ALICE_PASSWORD)
        csrf = await csrf_from(http, f"{token_relay.public_url}/")
        async with http.post(f"{token_relay.public_url}/logout", allow_redirects=False,
                             data={"csrf": "wrong"}) as resp:
            assert resp.status == 403
        async with http.post(f"{token_relay.public_url}/logout", allow_redirects=False,
                             data={"csrf": csrf}) as resp:
            assert resp.status == 303
        code, _ = await open_console(http, token_relay, "open")
        assert code == closecodes.UNAUTHENTICATED


# --- share links --------------------------------------------------------------------------

async def exchange(http: aiohttp.ClientSession, relay: RelayServer, name: str,
                   token: str) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{relay.public_url}/t/lab/{name}/link", json={"token": token},
                         headers={"Origin": "null", "X-Requested-With": "vncgate"}) as resp:
        return resp.status, await resp.json()


async def test_share_link_minted_by_the_api_opens_its_target_only(token_relay: RelayServer
                                                                  ) -> None:
    async with aiohttp.ClientSession() as api, api.post(
            f"{token_relay.internal_url}/api/v1/links",
            json={"namespace": "lab", "name": "bobs", "ttl": "10m", "viewOnly": True},
            headers={"Authorization": f"Bearer {API_TOKEN}"}) as resp:
        assert resp.status == 200
        minted = await resp.json()
    token = minted["token"]
    assert minted["path"] == f"/t/lab/bobs/#link={token}"  # in the fragment: never logged
    async with jar_session() as http:
        status, reply = await exchange(http, token_relay, "bobs", token)
        assert status == 200 and reply["viewOnly"] is True
        async with http.ws_connect(f"{token_relay.public_url}/t/lab/bobs/websockify",
                                   origin=token_relay.public_url) as ws:
            assert await ws.receive_bytes(timeout=5) == GREETING
            [session] = list(token_relay.state.sessions)
            assert session.view_only and session.user.startswith("link:")
        # The link's cookie is scoped to its viewer and admits to nothing else.
        code, _ = await open_console(http, token_relay, "open")
        assert code == closecodes.UNAUTHENTICATED


async def test_bad_links_are_refused_with_a_reason(token_relay: RelayServer) -> None:
    expired, _ = links.mint(KEY, "lab/open", 60, now=1_000_000)
    good, _ = links.mint(KEY, "lab/open", 600)
    mac = good.partition(".")[2]
    tampered = links.mint(KEY, "lab/bobs", 600)[0].partition(".")[0] + "." + mac
    foreign, _ = links.mint(b"f" * 40, "lab/open", 600)
    cases = [(expired, "expired"), (tampered, "altered"), (foreign, "altered"),
             (good, None), ("garbage", "not valid")]
    async with jar_session() as http:
        for token, words in cases:
            status, reply = await exchange(http, token_relay, "open", token)
            if words is None:
                assert status == 200
            else:
                assert status == 403 and words in reply["error"], (token, reply)
        status, reply = await exchange(http, token_relay, "admins", good)
        assert status == 403 and "opens lab/open, not lab/admins" in reply["error"]
        # Only our viewer's fetch (with its custom header) may exchange a link.
        async with http.post(f"{token_relay.public_url}/t/lab/open/link",
                             json={"token": good}) as resp:
            assert resp.status == 403


async def test_single_use_link_works_once(token_relay: RelayServer) -> None:
    token, _ = links.mint(KEY, "lab/open", 600, once=True)
    async with jar_session() as first, jar_session() as second:
        assert (await exchange(first, token_relay, "open", token))[0] == 200
        status, reply = await exchange(second, token_relay, "open", token)
        assert status == 403 and "one use only" in reply["error"]
        # The holder of the first exchange keeps the console (and may reconnect).
        assert await open_console(first, token_relay, "open") == (None, "")


async def test_links_signed_with_a_rotated_key_work_until_it_is_removed(
        make_relay: RelayFactory, backend: TcpServer) -> None:
    old_link, _ = links.mint(OLD_KEY, "lab/open", 600)
    rotated = AuthSettings(mode=AuthMode.TOKEN, users=USERS, link_keys=(KEY, OLD_KEY))
    retired = AuthSettings(mode=AuthMode.TOKEN, users=USERS, link_keys=(KEY,))
    for auth, expected in ((rotated, 200), (retired, 403)):
        async with make_relay(routes=targets(backend.port), auth=auth) as relay, \
                jar_session() as http:
            assert (await exchange(http, relay, "open", old_link))[0] == expected


def test_link_command_prints_a_link_that_verifies(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    result = subprocess.run(
        [sys.executable, "-m", "vncgate.relay", "link", "lab/open", "--ttl", "10m", "--once",
         "--link-key-file", str(key_file), "--public-url", "https://vnc.example.com/"],
        capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    match = re.fullmatch(r"https://vnc\.example\.com/t/lab/open/#link=(\S+)\n", result.stdout)
    assert match is not None, result.stdout
    grant = links.verify((KEY,), match.group(1), "lab/open")
    assert grant.once and not grant.view_only
    assert match.group(1) not in result.stderr  # the audit line names the link id, not the token


def test_hash_password_command() -> None:
    result = subprocess.run([sys.executable, "-m", "vncgate.relay", "hash-password"],
                            input="a long enough password\n", capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 0
    assert verify_secret("a long enough password", result.stdout.strip())
    assert not verify_secret("another password", result.stdout.strip())


# --- proxy mode ---------------------------------------------------------------------------

@pytest.mark.parametrize(("trusted", "local", "expected"), [
    ("127.0.0.1/32", "127.0.0.1", None),                       # the proxy: believed
    ("127.0.0.1/32", "127.0.0.2", closecodes.UNAUTHENTICATED),  # anyone else: ignored
    ("10.99.0.0/24", "127.0.0.1", closecodes.UNAUTHENTICATED),
])
async def test_proxy_headers_count_only_from_trusted_proxies(
        make_relay: RelayFactory, backend: TcpServer, trusted: str, local: str,
        expected: int | None) -> None:
    auth = AuthSettings(mode=AuthMode.PROXY, trusted_proxies=parse_networks([trusted], "t"))
    async with make_relay(routes=targets(backend.port), auth=auth) as relay, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(local, 0))) as http:
        code, _ = await open_console(http, relay, "admins", headers={
            "X-Forwarded-User": "mallory", "X-Forwarded-Groups": "lab-admins"})
        assert code == expected
        async with http.get(f"{relay.public_url}/", headers={
                "X-Forwarded-User": "mallory", "X-Forwarded-Groups": "lab-admins"}) as resp:
            assert resp.status == (200 if expected is None else 401)


async def test_proxy_user_without_the_group_is_forbidden(make_relay: RelayFactory,
                                                         backend: TcpServer) -> None:
    auth = AuthSettings(mode=AuthMode.PROXY, trusted_proxies=parse_networks(["127.0.0.0/8"], "t"))
    async with make_relay(routes=targets(backend.port), auth=auth) as relay, \
            aiohttp.ClientSession() as http:
        code, reason = await open_console(http, relay, "admins", headers={
            "X-Forwarded-User": "eve", "X-Forwarded-Groups": "students, guests"})
        assert code == closecodes.FORBIDDEN and "eve" in reason


# --- Kubernetes RBAC (SubjectAccessReview) -------------------------------------------------

def rbac_policy(request: kmock.Request) -> dict[str, Any]:
    """alice may connect to anything in namespace lab; group lab-viewers to lab/open."""
    spec = request.data["spec"]
    attrs = spec["resourceAttributes"]
    assert attrs["group"] == "vncgate.io" and attrs["resource"] == "vnctargets"
    assert attrs["verb"] == "connect"
    allowed = (spec["user"] == "alice" and attrs["namespace"] == "lab") or (
        "lab-viewers" in spec.get("groups", []) and attrs.get("name") == "open")
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "status": {"allowed": allowed}}


# kmock's KubernetesEmulator stores every create under its name; SubjectAccessReviews have none,
# so the second would conflict there. Its plain HTTP server answers every review.
@pytest.mark.kmock(cls=kmock.RawHandler)
async def test_subject_access_review_decides_and_is_cached(
        make_relay: RelayFactory, backend: TcpServer, kmock: kmock.RawHandler,
        tmp_path: Path) -> None:
    reviews = kmock["post /apis/authorization.k8s.io/v1/subjectaccessreviews"] << rbac_policy
    auth = AuthSettings(mode=AuthMode.PROXY, trusted_proxies=parse_networks(["127.0.0.1/32"], "t"),
                        authorization="kubernetes")
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", str(kmock.url))
    async with make_relay(routes=targets(backend.port), auth=auth,
                          kubeconfig=kubeconfig) as relay, \
            aiohttp.ClientSession() as http:
        def as_user(user: str, groups: str = "") -> dict[str, str]:
            return {"X-Forwarded-User": user, "X-Forwarded-Groups": groups}

        assert await open_console(http, relay, "bobs", headers=as_user("alice")) == (None, "")
        code, reason = await open_console(http, relay, "bobs", headers=as_user("bob"))
        assert code == closecodes.FORBIDDEN
        assert "RoleBinding to vncgate-viewer in lab" in reason
        assert await open_console(http, relay, "open",
                                  headers=as_user("carol", "lab-viewers")) == (None, "")
        async with http.get(f"{relay.public_url}/", headers=as_user("carol", "lab-viewers")) as r:
            page = await r.text()
        assert "t/lab/open/" in page and "t/lab/bobs/" not in page
        count = len(list(reviews))
        assert await open_console(http, relay, "bobs", headers=as_user("alice")) == (None, "")
        assert len(list(reviews)) == count  # answered from the cache
    sent = next(iter(reviews))
    assert sent.headers["Authorization"] == "Bearer relay-service-account-token"


@pytest.mark.kmock(cls=kmock.RawHandler)
async def test_api_errors_deny_never_allow(make_relay: RelayFactory, backend: TcpServer,
                                           kmock: kmock.RawHandler, tmp_path: Path) -> None:
    kmock["post /apis/authorization.k8s.io/v1/subjectaccessreviews"] << 503
    auth = AuthSettings(mode=AuthMode.PROXY, trusted_proxies=parse_networks(["127.0.0.1/32"], "t"),
                        authorization="kubernetes")
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", str(kmock.url))
    async with make_relay(routes=targets(backend.port), auth=auth,
                          kubeconfig=kubeconfig) as relay, \
            aiohttp.ClientSession() as http:
        code, reason = await open_console(http, relay, "open",
                                          headers={"X-Forwarded-User": "alice"})
        # Refused, but not as a denial: 4503, after which the viewer reconnects with back-off
        # (4403 is final: a reconnect storm that outran the API server would strand viewers
        # who may open the console).
        assert code == closecodes.UNAVAILABLE
        assert "could not check your access" in reason
        alice = {"X-Forwarded-User": "alice"}
        for method, path in (("GET", "/t/lab/open/viewers"), ("GET", "/t/lab/open/thumbnail"),
                             ("DELETE", "/api/v1/sessions/lab/open")):
            async with http.request(method, f"{relay.public_url}{path}", headers=alice) as r:
                assert r.status == 503, (path, r.status, await r.text())
                assert "could not check your access" in await r.text(), path
        # The list leaves out what it could not check, and says so.
        async with http.get(f"{relay.public_url}/", headers=alice) as r:
            page = await r.text()
        assert r.status == 200 and "t/lab/" not in page
        assert re.search(r'id="unchecked"[^>]*>3 consoles could not be checked', page), page


@pytest.mark.kmock(cls=kmock.RawHandler)
async def test_the_list_stops_asking_an_api_server_that_does_not_answer(
        make_relay: RelayFactory, backend: TcpServer, kmock: kmock.RawHandler,
        tmp_path: Path) -> None:
    """45 consoles, none answered: one question for the namespace, one batch of 20 for the
    consoles, then no more (each would wait a review's timeout); all 45 counted as unchecked."""
    reviews = kmock["post /apis/authorization.k8s.io/v1/subjectaccessreviews"] << 503
    auth = AuthSettings(mode=AuthMode.PROXY, trusted_proxies=parse_networks(["127.0.0.1/32"], "t"),
                        authorization="kubernetes")
    routes = [Route("lab", f"desk-{i:02}", "127.0.0.1", backend.port) for i in range(45)]
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", str(kmock.url))
    async with make_relay(routes=routes, auth=auth, kubeconfig=kubeconfig) as relay, \
            aiohttp.ClientSession() as http, \
            http.get(f"{relay.public_url}/api/v1/consoles",
                     headers={"X-Forwarded-User": "alice"}) as r:
        listing = await r.json()
    assert r.status == 200 and listing["total"] == 0 and listing["unchecked"] == 45, listing
    assert len(list(reviews)) == 1 + 20


async def test_unreachable_api_denies(make_relay: RelayFactory, backend: TcpServer,
                                      tmp_path: Path) -> None:
    auth = AuthSettings(mode=AuthMode.PROXY, trusted_proxies=parse_networks(["127.0.0.1/32"], "t"),
                        authorization="kubernetes")
    kubeconfig = write_kubeconfig(tmp_path / "k", "http://127.0.0.1:9")
    async with make_relay(routes=targets(backend.port), auth=auth,
                          kubeconfig=kubeconfig) as relay, \
            aiohttp.ClientSession() as http:
        code, _ = await open_console(http, relay, "open", headers={"X-Forwarded-User": "alice"})
    assert code == closecodes.UNAVAILABLE


# --- configuration ------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "words"), [
    (["--listen", "0.0.0.0:0"], "choose --auth proxy"),
    (["--auth", "proxy"], "needs --trusted-proxy"),
    (["--auth", "token"], "needs --users-file"),
    (["--auth", "proxy", "--trusted-proxy", "10.0.0.0/33"], "not a CIDR"),
])
def test_unsafe_or_incomplete_auth_settings_stop_the_relay(args: list[str], words: str) -> None:
    result = subprocess.run([sys.executable, "-m", "vncgate.relay", *args], capture_output=True,
                            text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 2
    assert words in result.stderr


def test_users_file_problems_are_named(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    path.write_text("alice: short\n")
    with pytest.raises(AuthConfigError, match="at least 12 characters"):
        load_users(path)
    path.write_text("alice: {secret: 'a-long-secret-value', groups: admins}\n")
    with pytest.raises(AuthConfigError, match="groups must be a list"):
        load_users(path)
    path.write_text("users:\n  alice: {secret: 'a-long-secret-value', groups: [admins]}\n"
                    "  bob: sha256$abc\n")
    users = load_users(path)
    assert users["alice"].groups == ("admins",)
    assert users["bob"].secret == "sha256$abc"


async def test_session_view_only_comes_from_the_route(make_relay: RelayFactory,
                                                      backend: TcpServer) -> None:
    route = Route("lab", "watch", "127.0.0.1", backend.port, view_only=True)
    async with make_relay(routes=[route]) as relay, aiohttp.ClientSession() as http, \
            http.ws_connect(f"{relay.public_url}/t/lab/watch/websockify") as ws:
        assert await ws.receive_bytes(timeout=5) == GREETING
        await eventually(lambda: relay.state.sessions.count, "the session opened")
        assert all(s.view_only for s in relay.state.sessions)
