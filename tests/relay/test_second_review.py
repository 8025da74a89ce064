"""The findings of the second hostile review (issue #26), each against the real relay.

Real sockets on 127.0.0.1; a real HAProxy in front where the finding is about the Ingress; real
Xvnc where a VNC server is involved. docs/SECURITY.md names each test in its threat table.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from tests.conftest import RelayFactory
from tests.relay.test_auth import (
    ALICE_PASSWORD,
    BOB_TOKEN,
    KEY,
    csrf_from,
    exchange,
    jar_session,
    targets,
)
from tests.support.certs import make_ca, make_server_cert
from tests.support.haproxy import HttpProxy
from tests.support.servers import TcpServer
from vncgate.relay.access import links
from vncgate.relay.access.identity import AuthMode
from vncgate.relay.access.passwords import hash_secret
from vncgate.relay.access.proxies import parse_networks
from vncgate.relay.access.users import User
from vncgate.relay.settings import AuthSettings
from vncgate.relay.web.server import RelayServer

CAROL_PASSWORD = "carol's plain password"
USERS = {
    "alice": User("alice", hash_secret(ALICE_PASSWORD), ("lab-admins",)),
    "bob": User("bob", "sha256$" + hashlib.sha256(BOB_TOKEN.encode()).hexdigest()),
    "carol": User("carol", CAROL_PASSWORD),  # a plain entry: a password too
}
# The relay believes X-Forwarded-For from 127.0.0.1: tests name clients there, or a real
# HAProxy on loopback does.
AUTH = AuthSettings(mode=AuthMode.TOKEN, users=USERS, session_secret=b"s" * 32,
                    link_keys=(KEY,), trusted_proxies=parse_networks(["127.0.0.1/32"], "t"))


@pytest.fixture
async def relay(make_relay: RelayFactory, backend: TcpServer) -> AsyncIterator[RelayServer]:
    async with make_relay(routes=targets(backend.port), auth=AUTH) as server:
        yield server


def bearer(token: str, client: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "X-Forwarded-For": client}


async def signed_in(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> int:
    """200 with a credential, 302 (to the login page) without one, 429 when refused."""
    async with http.get(f"{url}/", allow_redirects=False, headers=headers) as resp:
        return resp.status


# --- 3. bearer tokens: token entries only, failures counted overall --------------------------

async def test_passwords_are_never_bearer_tokens(relay: RelayServer) -> None:
    async with aiohttp.ClientSession() as http:
        url = relay.public_url
        assert await signed_in(http, url, bearer(BOB_TOKEN, "192.0.2.1")) == 200
        # A password (scrypt or plain entry) as a bearer token skipped the per-account limit
        # of sign-ins: it is no bearer token at all.
        assert await signed_in(http, url, bearer(ALICE_PASSWORD, "192.0.2.2")) == 302
        assert await signed_in(http, url, bearer(CAROL_PASSWORD, "192.0.2.3")) == 302


async def test_bearer_guesses_from_many_addresses_are_limited_overall(relay: RelayServer
                                                                      ) -> None:
    limit = relay.state.bearer_failures.limit
    async with aiohttp.ClientSession() as http:
        url = relay.public_url
        # The reviewer's spread: each address stays under its own limit of 5.
        for n in range(limit):
            assert await signed_in(http, url, bearer(f"guess-{n}", f"198.51.100.{n % 50}")) \
                == 302
        assert await signed_in(http, url, bearer("one-more", "203.0.113.1")) == 429
        # The limit refuses failures only: a good token still works, from anywhere.
        assert await signed_in(http, url, bearer(BOB_TOKEN, "203.0.113.2")) == 200


async def test_failures_never_refuse_a_good_token_or_link(relay: RelayServer) -> None:
    link, _ = links.mint(KEY, "lab/open", 600)
    async with aiohttp.ClientSession() as http:
        url = relay.public_url
        for n in range(5):
            assert await signed_in(http, url, bearer(f"guess-{n}", "192.0.2.7")) == 302
        assert await signed_in(http, url, bearer("guess-5", "192.0.2.7")) == 429
        # Before the fix the whole address was refused, good credentials included: behind an
        # Ingress without a trusted proxy that address was everyone's.
        assert await signed_in(http, url, bearer(BOB_TOKEN, "192.0.2.7")) == 200
    async with jar_session() as http:
        http.headers["X-Forwarded-For"] = "192.0.2.7"
        status, reply = await exchange(http, relay, "open", "not-a-link")
        assert status == 429 and "too many bad links" in reply["error"]
        assert (await exchange(http, relay, "open", link))[0] == 200


# --- 7. one address's failures lock nobody else out, behind a real reverse proxy -------------

def from_address(address: str) -> aiohttp.ClientSession:
    """A browser on its own loopback address (127.0.0.0/8 is all local on Linux)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)),
                                 cookie_jar=aiohttp.CookieJar(unsafe=True))


async def sign_in_at(http: aiohttp.ClientSession, url: str, user: str, password: str) -> int:
    csrf = await csrf_from(http, f"{url}/login")
    async with http.post(f"{url}/login", allow_redirects=False, headers={"Origin": url},
                         data={"user": user, "password": password, "csrf": csrf}) as resp:
        return resp.status


async def test_guessing_behind_the_ingress_keeps_no_one_else_out(
        relay: RelayServer, tmp_path: Path) -> None:
    backend = relay.public_url.removeprefix("http://")
    with HttpProxy(tmp_path, backend) as proxy:
        url = proxy.url
        async with from_address("127.0.0.3") as alice, from_address("127.0.0.2") as guesser, \
                from_address("127.0.0.4") as helper, from_address("127.0.0.5") as colleague, \
                from_address("127.0.0.6") as new_browser:
            assert await sign_in_at(alice, url, "alice", ALICE_PASSWORD) == 303
            # One address guesses: it is slowed, keyed on its own address (from HAProxy's
            # X-Forwarded-For), not on the proxy's, which every user shares.
            for _ in range(5):
                assert await sign_in_at(guesser, url, "alice", "a guess!") == 401
            assert await sign_in_at(guesser, url, "alice", "a guess!") == 429
            assert await sign_in_at(colleague, url, "bob", BOB_TOKEN) == 303
            # With a second address the account's own limit (10 in 5 minutes) is reached: a
            # browser that never signed in as alice waits, the one that did does not.
            for _ in range(5):
                assert await sign_in_at(helper, url, "alice", "a guess!") == 401
            assert await sign_in_at(new_browser, url, "alice", ALICE_PASSWORD) == 429
            assert await sign_in_at(alice, url, "alice", ALICE_PASSWORD) == 303
            # Guesses at another account from alice's browser are not exempt.
            assert await sign_in_at(alice, url, "carol", "a guess!") == 401


# --- 5. CSRF: the token hangs on the sign-in, not on a cookie a sibling host can plant --------

async def list_csrf(http: aiohttp.ClientSession, url: str) -> str:
    """The token of the list page's forms (sign-out, End session), as the page carries it."""
    async with http.get(f"{url}/") as page:
        assert page.status == 200
        assert page.headers["Referrer-Policy"] == "same-origin"
        match = re.search(r'name="csrf" value="([^"]+)"', await page.text())
    assert match is not None
    return match.group(1)


async def still_signed_in(http: aiohttp.ClientSession, url: str) -> bool:
    async with http.get(f"{url}/", allow_redirects=False) as page:
        return page.status == 200


async def test_a_planted_csrf_cookie_and_origin_null_sign_nobody_out(relay: RelayServer) -> None:
    url = relay.public_url
    async with jar_session() as http:
        assert await sign_in_at(http, url, "alice", ALICE_PASSWORD) == 303
        # evil.example.test set `vncgate_csrf=known; Domain=example.test`: the browser sends it
        # here, and the page posts the same value with Referrer-Policy: no-referrer.
        http.cookie_jar.update_cookies({"vncgate_csrf": "known-value"}, URL(url))
        for end in ("logout", "sessions/end"):
            async with http.post(f"{url}/{end}", allow_redirects=False,
                                 headers={"Origin": "null"},
                                 data={"csrf": "known-value", "namespace": "lab",
                                       "name": "open"}) as resp:
                assert resp.status == 403, end
        assert await still_signed_in(http, url)
        token = await list_csrf(http, url)
        # The page's own token, but from a page that hides its origin: refused.
        async with http.post(f"{url}/logout", allow_redirects=False, data={"csrf": token},
                             headers={"Origin": "null"}) as resp:
            assert resp.status == 403
        # Another sign-in's token (the attacker's own, from their account) does not fit.
        async with jar_session() as other:
            assert await sign_in_at(other, url, "bob", BOB_TOKEN) == 303
            foreign_token = await list_csrf(other, url)
        async with http.post(f"{url}/logout", allow_redirects=False,
                             data={"csrf": foreign_token}, headers={"Origin": url}) as resp:
            assert resp.status == 403
        assert await still_signed_in(http, url)
        # The relay's own form, as a browser posts it: signs out.
        async with http.post(f"{url}/logout", allow_redirects=False, data={"csrf": token},
                             headers={"Origin": url}) as resp:
            assert resp.status == 303
        assert not await still_signed_in(http, url)


async def test_cookies_are_host_only_under_tls(make_relay: RelayFactory, backend: TcpServer,
                                               tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    pem = make_server_cert(ca, tmp_path / "server", "relay")
    context = ssl.create_default_context(cafile=ca.cert)
    async with make_relay(routes=targets(backend.port), auth=AUTH, tls_cert=pem.cert,
                          tls_key=pem.key) as relay, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context),
            cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        url = relay.public_url
        async with http.get(f"{url}/login") as page:
            set_cookies = page.headers.getall("Set-Cookie")
        assert [c.split("=")[0] for c in set_cookies] == ["__Host-vncgate_csrf"]
        # A plain-named cookie (as a sibling host can plant) is not read at all.
        http.cookie_jar.update_cookies({"vncgate_csrf": "known-value"}, URL(url))
        csrf = await csrf_from(http, f"{url}/login")
        async with http.post(f"{url}/login", allow_redirects=False, headers={"Origin": url},
                             data={"user": "alice", "password": ALICE_PASSWORD,
                                   "csrf": csrf}) as resp:
            assert resp.status == 303
            names = {c.split("=")[0]: c for c in resp.headers.getall("Set-Cookie")}
        assert set(names) == {"__Host-vncgate_session", "__Host-vncgate_device"}
        for cookie in names.values():
            assert "Secure" in cookie and "Path=/" in cookie and "Domain" not in cookie
        assert await still_signed_in(http, url)
