"""How long an OpenID sign-in lasts, against a real provider (oidc-provider under Node) with ID
tokens of a few seconds and a real Xvnc behind the relay: without a refresh token the sign-in
and its open console end with the ID token; with one, the relay renews the sign-in (the console
stays open, requests keep working, the cookie is renewed), until the provider refuses (the
person removed: the sign-in and its consoles end) or the renewed groups no longer open the
console. The waits are for conditions (a close, a renewal the relay made), never for times.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import ssl
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import pytest

from harness.cluster import free_port
from harness.waiting import eventually
from harness.xvnc import XvncServer
from tests.conftest import RelayFactory
from tests.relay.test_oidc_relay import provider_login
from tests.support.kubeconfig import write_kubeconfig
from tests.support.oidc import Account, OidcProvider, need_provider
from vncgate.common.addresses import Address
from vncgate.common.model import Route
from vncgate.common.spec import Access
from vncgate.relay import closecodes
from vncgate.relay.access.cookies import (
    MAX_COOKIE,
    SESSION_COOKIE,
    seal,
    session_cookie,
    sign,
    unseal,
    unsign,
)
from vncgate.relay.access.identity import AuthMode
from vncgate.relay.access.oidc import OidcSettings
from vncgate.relay.access.passwords import unb64
from vncgate.relay.settings import AuthSettings
from vncgate.relay.web.server import RelayServer

CLIENT, SECRET = "vncgate", "the relay's client secret"
PASSWORD = "alice's provider password"
KEY = b"s" * 32
# Short enough that the tests see several ID tokens expire; long enough for a loaded machine to
# sign in and open a console before the first one does.
ID_TOKEN_TTL = 6


@dataclass
class Lab:
    provider: OidcProvider
    relay_port: int


@pytest.fixture
def lab_factory(tmp_path: Path) -> Iterator[Callable[..., Lab]]:
    need_provider()
    started: list[OidcProvider] = []

    def make(*, refresh: bool, rotate: bool = False, groups: tuple[str, ...] = ("devs",)
             ) -> Lab:
        relay_port = free_port()
        relay = f"http://127.0.0.1:{relay_port}"
        grants = ["authorization_code", "refresh_token"] if refresh else ["authorization_code"]
        provider = OidcProvider(tmp_path / f"oidc-{len(started)}", clients=[
            {"client_id": CLIENT, "client_secret": SECRET, "grant_types": grants,
             "redirect_uris": [f"{relay}/login/oidc/callback"],
             "post_logout_redirect_uris": [f"{relay}/"]}],
            accounts={"alice": Account(PASSWORD, {"email": "alice@example.test",
                                                  "groups": list(groups)})},
            id_token_ttl=ID_TOKEN_TTL, refresh_tokens=refresh, rotate_refresh_tokens=rotate)
        started.append(provider)
        provider.start()
        return Lab(provider, relay_port)

    try:
        yield make
    finally:
        for provider in started:
            provider.stop()


def relay_options(lab: Lab, xvnc: XvncServer) -> dict[str, Any]:
    assert lab.provider.ca is not None
    oidc = OidcSettings(issuer=lab.provider.issuer, client_id=CLIENT, client_secret=SECRET,
                        ca_file=lab.provider.ca.cert, username_claim="email",
                        groups_claim="groups", groups_prefix="oidc:", extra_scopes=("groups",))
    auth = AuthSettings(mode=AuthMode.OIDC, session_secret=KEY,
                        public_url=f"http://127.0.0.1:{lab.relay_port}", oidc=oidc)
    routes = [Route("lab", "mine", "127.0.0.1", xvnc.port,
                    access=Access(groups=("oidc:devs",)))]
    return {"routes": routes, "auth": auth, "listen": Address("127.0.0.1", lab.relay_port)}


@pytest.fixture
async def browser_like(tmp_path: Path) -> AsyncIterator[aiohttp.ClientSession]:
    """Keeps cookies (of IP-address hosts too); the provider's CA is trusted per request."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only ever 127.0.0.1: the provider of this test
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     connector=aiohttp.TCPConnector(ssl=context)) as session:
        yield session


async def sign_in(http: aiohttp.ClientSession, relay: RelayServer) -> str:
    """Sign alice in at the provider; the session cookie the relay set."""
    hops, done = await provider_login(http, f"{relay.public_url}/login/oidc?next=./")
    assert str(done.url) == f"{relay.public_url}/", hops
    callback = next(r for r in hops if r.url.path == "/login/oidc/callback")
    return callback.cookies[SESSION_COOKIE].value


def payload(cookie: str) -> dict[str, Any]:
    body = cookie.partition(".")[0]
    return dict(json.loads(unb64(body)))


async def open_console(http: aiohttp.ClientSession, relay: RelayServer
                       ) -> aiohttp.ClientWebSocketResponse:
    """A console on the real Xvnc, through the relay, past the RFB handshake."""
    ws = await http.ws_connect(f"{relay.public_url}/t/lab/mine/websockify",
                               origin=relay.public_url)
    reader = RfbReader(ws)
    assert (await reader.read(12)).startswith(b"RFB 003.008")
    await ws.send_bytes(b"RFB 003.008\n")
    count = (await reader.read(1))[0]
    assert 1 in await reader.read(count)  # security type None
    await ws.send_bytes(b"\x01")
    assert await reader.read(4) == b"\0\0\0\0"
    await ws.send_bytes(b"\x01")  # ClientInit: shared
    width, height = struct.unpack(">HH", await reader.read(4))
    assert (width, height) == (800, 600)
    ws._vncgate_reader = reader  # type: ignore[attr-defined]
    return ws


class RfbReader:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws, self.buffer = ws, b""

    async def read(self, count: int) -> bytes:
        while len(self.buffer) < count:
            msg = await self.ws.receive(timeout=30)
            assert msg.type == aiohttp.WSMsgType.BINARY, (msg.type, msg.data, msg.extra)
            self.buffer += msg.data
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data


async def screen_arrives(ws: aiohttp.ClientWebSocketResponse) -> None:
    """The console still relays: a FramebufferUpdateRequest is answered by the real Xvnc."""
    await ws.send_bytes(struct.pack(">BBHHHH", 3, 0, 0, 0, 16, 16))
    msg = await ws.receive(timeout=30)
    assert msg.type == aiohttp.WSMsgType.BINARY, (msg.type, msg.data, msg.extra)


async def closed(ws: aiohttp.ClientWebSocketResponse) -> aiohttp.WSMessage:
    """The close that ends the console (screen updates before it are skipped)."""
    async with asyncio.timeout(120):
        while True:
            msg = await ws.receive()
            if msg.type != aiohttp.WSMsgType.BINARY:
                return msg


async def status_with(http: aiohttp.ClientSession, relay: RelayServer, cookie: str
                      ) -> aiohttp.ClientResponse:
    """The list page's answer to exactly this cookie (not the jar's)."""
    async with aiohttp.ClientSession() as fresh, fresh.get(
            f"{relay.public_url}/", headers={"Cookie": f"{SESSION_COOKIE}={cookie}"},
            allow_redirects=False) as answer:
        await answer.read()
        return answer


def renewed_until(relay: RelayServer, sid: str) -> float:
    """When the ID token of the relay's newest renewal of sign-in `sid` expires (0: none)."""
    renewals = relay.state.renewals
    assert renewals is not None
    known = renewals._latest.get(sid)
    return known.person.expires if known is not None else 0.0


async def in_thread(function: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(function, *args)


async def console_ends_with_the_id_token(http: aiohttp.ClientSession, relay: RelayServer
                                         ) -> None:
    """A console opened with a sign-in that cannot be renewed relays, then closes (4401)."""
    ws = await open_console(http, relay)
    await screen_arrives(ws)
    msg = await closed(ws)
    assert (msg.type, msg.data, msg.extra) == (
        aiohttp.WSMsgType.CLOSE, closecodes.UNAUTHENTICATED, "your sign-in expired; sign in again")


async def test_without_a_refresh_token_the_console_ends_with_the_id_token(
        make_relay: RelayFactory, xvnc: XvncServer, lab_factory: Callable[..., Lab],
        browser_like: aiohttp.ClientSession) -> None:
    lab = lab_factory(refresh=False)
    async with make_relay(**relay_options(lab, xvnc)) as relay:
        cookie = await sign_in(browser_like, relay)
        claims = payload(cookie)
        assert "rt" not in claims and claims["exp"] <= time.time() + ID_TOKEN_TTL
        await console_ends_with_the_id_token(browser_like, relay)
        # The cookie, replayed after its ID token expired, is no sign-in.
        answer = await status_with(browser_like, relay, cookie)
        assert answer.status == 302 and answer.headers["Location"].startswith("login")


async def test_a_refresh_token_too_long_for_the_cookie_signs_in_without_renewal(
        make_relay: RelayFactory, xvnc: XvncServer, lab_factory: Callable[..., Lab],
        browser_like: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    """So many groups that the cookie holds them but not them and the sealed refresh token
    too: the sign-in works, without renewal (it ends with its ID token), and the audit log
    says why, rather than the sign-in being refused or a cookie the browser drops being set."""
    groups = ["devs"]
    while len(session_cookie(KEY, "alice@example.test", 3600, groups=tuple(
            f"oidc:{g}" for g in groups), expires=time.time() + ID_TOKEN_TTL)) < MAX_COOKIE - 80:
        groups.append(f"team-{len(groups):04d}")
    caplog.set_level(logging.INFO)
    lab = lab_factory(refresh=True, groups=tuple(groups))
    async with make_relay(**relay_options(lab, xvnc)) as relay:
        cookie = await sign_in(browser_like, relay)
        claims = payload(cookie)
        assert len(cookie) <= MAX_COOKIE and len(claims["g"]) == len(groups)
        assert "rt" not in claims and claims["exp"] <= time.time() + ID_TOKEN_TTL
        assert any(getattr(r, "fields", {}).get("result") ==
                   "refresh token too long for a cookie: not renewable"
                   for r in caplog.records), caplog.text
        await console_ends_with_the_id_token(browser_like, relay)


async def test_a_refresh_token_keeps_the_sign_in_and_its_console(
        make_relay: RelayFactory, xvnc: XvncServer, lab_factory: Callable[..., Lab],
        browser_like: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    # Rotated refresh tokens, each usable once (the provider revokes the grant on reuse): the
    # relay must renew with the newest one every time.
    lab = lab_factory(refresh=True, rotate=True)
    async with make_relay(**relay_options(lab, xvnc)) as relay:
        cookie = await sign_in(browser_like, relay)
        claims = payload(cookie)
        first_expiry, sid = claims["ie"], claims["sid"]
        # The cookie lasts the relay's --session-ttl (8 h), its names the ID token's seconds;
        # the refresh token in it is sealed: not readable by whoever holds the cookie.
        assert claims["exp"] > first_expiry + 3600 and first_expiry <= time.time() + ID_TOKEN_TTL
        assert "rt" in claims and "." not in claims["rt"] and len(claims["rt"]) > 40
        ws = await open_console(browser_like, relay)
        # The relay renews the sign-in of the open console when its ID token expires, twice
        # over (the second renewal needs the rotated refresh token of the first).
        await eventually(lambda: renewed_until(relay, sid) > first_expiry,
                         "the relay to renew the sign-in", timeout=120)
        second = renewed_until(relay, sid)
        await eventually(lambda: renewed_until(relay, sid) > second,
                         "the relay to renew the sign-in again", timeout=120)
        assert time.time() > first_expiry  # past the first ID token, and still relaying:
        await screen_arrives(ws)
        # Requests with the browser's cookie (whose ID token expired) keep working, and get a
        # renewed cookie of the same sign-in.
        async with browser_like.get(f"{relay.public_url}/", allow_redirects=False) as listing:
            text = await listing.text()
            renewed = listing.cookies[SESSION_COOKIE].value
        assert listing.status == 200 and "alice@example.test" in text and "lab/mine" in text
        assert payload(renewed)["sid"] == sid and payload(renewed)["ie"] > first_expiry
        assert payload(renewed)["exp"] == claims["exp"]  # renewal never extends --session-ttl
        await screen_arrives(ws)
        assert not ws.closed
        await ws.close()
    # The refresh tokens (the first, and the rotated one in the renewed cookie) were never
    # logged, by the relay or by aiohttp.
    tokens = [unseal(KEY, sid, payload(value)["rt"]) for value in (cookie, renewed)]
    assert all(t is not None and len(t["rt"]) > 20 for t in tokens)
    assert tokens[0] != tokens[1]  # rotated
    assert caplog.records and not any(t["rt"] in caplog.text for t in tokens if t)


async def test_a_refused_renewal_ends_the_sign_in_and_its_consoles(
        make_relay: RelayFactory, xvnc: XvncServer, lab_factory: Callable[..., Lab],
        browser_like: aiohttp.ClientSession) -> None:
    lab = lab_factory(refresh=True)
    async with make_relay(**relay_options(lab, xvnc)) as relay:
        cookie = await sign_in(browser_like, relay)
        ws = await open_console(browser_like, relay)
        # Alice is removed at the provider: her next renewal is refused.
        await in_thread(lab.provider.remove_account, "alice")
        msg = await closed(ws)
        assert (msg.type, msg.data, msg.extra) == (
            aiohttp.WSMsgType.CLOSE, closecodes.UNAUTHENTICATED,
            "the provider ended your sign-in; sign in again")
        # The sign-in is over: its cookie (valid for hours by its own expiry) is refused.
        assert payload(cookie)["exp"] > time.time() + 3600
        answer = await status_with(browser_like, relay, cookie)
        assert answer.status == 302 and answer.headers["Location"].startswith("login")


async def test_renewed_groups_decide_again_whether_the_console_stays_open(
        make_relay: RelayFactory, xvnc: XvncServer, lab_factory: Callable[..., Lab],
        browser_like: aiohttp.ClientSession) -> None:
    lab = lab_factory(refresh=True)
    async with make_relay(**relay_options(lab, xvnc)) as relay:
        cookie = await sign_in(browser_like, relay)
        ws = await open_console(browser_like, relay)
        # Alice leaves `devs` at the provider; her sign-in goes on, but not this console.
        lab.provider.accounts["alice"].claims["groups"] = ["sales"]
        await in_thread(lab.provider.reload)
        msg = await closed(ws)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == closecodes.FORBIDDEN, msg
        async with browser_like.get(f"{relay.public_url}/", allow_redirects=False) as listing:
            text = await listing.text()
        assert listing.status == 200 and "alice@example.test" in text
        assert "lab/mine" not in text
        assert payload(cookie)["sid"] == payload(
            listing.cookies[SESSION_COOKIE].value)["sid"]


async def test_a_tampered_or_transplanted_refresh_grant_is_refused(
        make_relay: RelayFactory, xvnc: XvncServer, lab_factory: Callable[..., Lab],
        browser_like: aiohttp.ClientSession) -> None:
    lab = lab_factory(refresh=True)
    async with make_relay(**relay_options(lab, xvnc)) as relay:
        cookie = await sign_in(browser_like, relay)
        claims = payload(cookie)
        expired = {**claims, "ie": int(time.time()) - 1}

        async def answer_to(value: str) -> int:
            return (await status_with(browser_like, relay, value)).status

        # Not signed by the relay: a changed sealed grant, or an earlier `ie` to force a renewal.
        mac = cookie.partition(".")[2]
        for changed in ({**claims, "rt": claims["rt"][:-4] + "AAAA"}, expired):
            forged = sign(b"x" * 32, changed).partition(".")[0]
            assert await answer_to(f"{forged}.{mac}") == 302
        # Signed with the relay's key (as if it leaked) but sealed for another sign-in: the
        # seal is bound to the cookie's id, and the sign-in is refused when it needs renewal.
        other = seal(KEY, "another-sid", {"rt": "x", "sub": "alice", "n": ""})
        transplanted = sign(KEY, {**expired, "rt": other})
        assert await answer_to(transplanted) == 302
        assert unsign((KEY,), transplanted) is not None
        # A grant that cannot be opened ends the sign-in (fail closed): the genuine cookie of
        # the same sign-in is refused from then on too.
        assert await answer_to(cookie) == 302


async def test_two_replicas_renew_one_sign_in_and_a_refusal_ends_it_on_both(
        make_relay: RelayFactory, xvnc: XvncServer, lab_factory: Callable[..., Lab],
        browser_like: aiohttp.ClientSession) -> None:
    """Replicas share nothing but the session key and each other's internal port: each renews
    the sign-in of the console it holds and of the cookie it is sent, and once the provider
    refuses, the sign-in ends on both (the refusing replica revokes it and tells its peers).
    The provider's refresh tokens are not single-use here, as docs/SECURITY.md asks of
    providers behind several replicas."""
    lab = lab_factory(refresh=True)
    internal_a, internal_b = free_port(), free_port()
    options = relay_options(lab, xvnc)
    async with make_relay(**options, internal_listen=Address("127.0.0.1", internal_a),
                          peer_urls=(f"http://127.0.0.1:{internal_b}",)) as a, \
            make_relay(**{**options, "listen": Address("127.0.0.1", free_port())},
                       internal_listen=Address("127.0.0.1", internal_b),
                       peer_urls=(f"http://127.0.0.1:{internal_a}",)) as b:
        cookie = await sign_in(browser_like, a)  # at replica a
        first_expiry, sid = payload(cookie)["ie"], payload(cookie)["sid"]
        console_a, console_b = await open_console(browser_like, a), \
            await open_console(browser_like, b)
        # Each replica renews the sign-in of the console it holds.
        for replica in (a, b):
            await eventually(lambda r=replica: renewed_until(r, sid) > first_expiry,
                             "both replicas to renew the consoles' sign-in", timeout=120)
        await screen_arrives(console_a)
        await screen_arrives(console_b)
        # Replica b takes the browser's cookie (its ID token long expired) and renews it.
        async with browser_like.get(f"{b.public_url}/", allow_redirects=False) as listing:
            assert listing.status == 200 and "lab/mine" in await listing.text()
        # Alice is removed at the provider: whichever replica renews next is refused, ends the
        # sign-in, and tells the other; both consoles close with 4401.
        await in_thread(lab.provider.remove_account, "alice")
        for console in (console_a, console_b):
            msg = await closed(console)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE,
                                            closecodes.UNAUTHENTICATED), msg
        for replica in (a, b):
            answer = await status_with(browser_like, replica, cookie)
            assert answer.status == 302 and answer.headers["Location"].startswith("login")


async def test_a_provider_away_at_renewal_time_does_not_close_the_console(
        make_relay: RelayFactory, xvnc: XvncServer, lab_factory: Callable[..., Lab],
        browser_like: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    """The provider stops answering (SIGSTOP: its port still takes connections, nothing
    answers) when the console's ID token expires: the relay asks again, for as long as the
    expired token would still pass its checks, and the console stays open once it answers."""
    caplog.set_level(logging.INFO)
    lab = lab_factory(refresh=True)
    process = lab.provider.process
    assert process is not None

    def unavailable_renewals() -> int:
        return sum(1 for r in caplog.records if r.getMessage() == "renewal"
                   and "unavailable" in getattr(r, "fields", {}).get("result", ""))

    async with make_relay(**relay_options(lab, xvnc)) as relay:
        cookie = await sign_in(browser_like, relay)
        first_expiry, sid = payload(cookie)["ie"], payload(cookie)["sid"]
        ws = await open_console(browser_like, relay)
        process.send_signal(signal.SIGSTOP)
        try:
            await eventually(unavailable_renewals, "a renewal to find the provider away",
                             timeout=120)
        finally:
            process.send_signal(signal.SIGCONT)
        await eventually(lambda: renewed_until(relay, sid) > first_expiry,
                         "the relay to renew the sign-in once the provider answers", timeout=120)
        await screen_arrives(ws)
        assert not ws.closed
        await ws.close()


@pytest.mark.kmock(cls=kmock.RawHandler)
async def test_an_api_server_away_at_renewal_time_does_not_close_the_console(
        make_relay: RelayFactory, xvnc: XvncServer, lab_factory: Callable[..., Lab],
        browser_like: aiohttp.ClientSession, kmock: kmock.RawHandler, tmp_path: Path) -> None:
    """At the ID token's expiry the relay renews the sign-in and asks Kubernetes again
    whether the renewed names may open the console. While the API server does not answer that
    review, the relay asks again (for as long as the expired token would still pass its
    checks) instead of ending the console as if it were denied (4403, final)."""
    lab = lab_factory(refresh=True)
    away = [False]
    answered: list[bool] = []  # per review: whether it was answered

    def review(request: kmock.Request) -> Any:
        answered.append(not away[0])
        if away[0]:
            raise RuntimeError("the API server is away")  # its answer: HTTP 500
        groups = request.data["spec"].get("groups", [])
        return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                "status": {"allowed": "oidc:devs" in groups}}

    kmock["post /apis/authorization.k8s.io/v1/subjectaccessreviews"] << review
    options = relay_options(lab, xvnc)
    options["routes"] = [Route("lab", "mine", "127.0.0.1", xvnc.port)]
    options["auth"] = dataclasses.replace(options["auth"], authorization="kubernetes")
    async with make_relay(**options, kubeconfig=write_kubeconfig(
            tmp_path / "kubeconfig", str(kmock.url))) as relay:
        await sign_in(browser_like, relay)
        ws = await open_console(browser_like, relay)
        assert answered and all(answered)  # the list page's and the console's reviews
        # New names at the next renewal (a review the relay has not cached), and the API
        # server away when it is asked.
        lab.provider.accounts["alice"].claims["groups"] = ["devs", "ops"]
        await in_thread(lab.provider.reload)
        away[0] = True
        await eventually(lambda: answered.count(False) >= 2,
                         "the relay to ask again after a review that was not answered",
                         timeout=60)
        assert not ws.closed
        (session,) = relay.state.sessions
        expires = session.expires_at
        assert expires is not None
        away[0] = False
        # Answered: the session's next renewal is set at the renewed ID token's expiry.
        await eventually(lambda: (session.expires_at or 0) > expires,
                         "the console's sign-in renewed and decided again", timeout=60)
        assert answered[-1]
        await screen_arrives(ws)
        assert not ws.closed
        await ws.close()
