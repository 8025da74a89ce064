"""`--auth oidc` in a real browser: chromium signs in through a real OpenID provider's login page
(panva's oidc-provider under Node, tests/support/oidc.py), opens a console on a real Xvnc that
its prefixed group may open, is refused one it may not, and signs out of the relay and the
provider, which ends its open console. With refresh tokens and ID tokens of a few seconds, the
open console outlives its ID token and the browser keeps a renewed cookie."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, BrowserContext, Page

from harness.cluster import free_port
from harness.waiting import eventually
from harness.xvnc import XvncServer
from tests.conftest import ARTIFACTS, RelayFactory
from tests.e2e.test_viewer import wait_for_pixel
from tests.support.oidc import Account, OidcProvider, need_provider
from vncgate.common.addresses import Address
from vncgate.common.model import Route
from vncgate.common.spec import Access
from vncgate.relay.access.cookies import revocation_key
from vncgate.relay.access.identity import AuthMode
from vncgate.relay.access.oidc import OidcSettings
from vncgate.relay.access.passwords import unb64
from vncgate.relay.settings import AuthSettings
from vncgate.relay.web.server import RelayServer

CLIENT, SECRET = "vncgate", "the relay's client secret"
PASSWORD = "alice's provider password"


@pytest.fixture
def relay_port() -> int:
    return free_port()


@pytest.fixture(params=[False], ids=["plain"])
def provider(tmp_path: Path, relay_port: int, request: pytest.FixtureRequest
             ) -> Iterator[OidcProvider]:
    """The provider; parametrized with True: refresh tokens (rotated on every use) and ID
    tokens of a few seconds."""
    need_provider()
    relay = f"http://127.0.0.1:{relay_port}"
    refresh = bool(request.param)
    server = OidcProvider(tmp_path / "oidc", clients=[{
        "client_id": CLIENT, "client_secret": SECRET,
        "grant_types": ["authorization_code", *(["refresh_token"] if refresh else [])],
        "redirect_uris": [f"{relay}/login/oidc/callback"],
        "post_logout_redirect_uris": [f"{relay}/"]}],
        accounts={"alice": Account(PASSWORD, {"email": "alice@example.test",
                                              "email_verified": True,
                                              "groups": ["devs"]})},
        **({"id_token_ttl": 8, "refresh_tokens": True, "rotate_refresh_tokens": True}
           if refresh else {}))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def oidc_auth(provider: OidcProvider, relay_port: int) -> AuthSettings:
    assert provider.ca is not None
    return AuthSettings(
        mode=AuthMode.OIDC, session_secret=b"s" * 32, public_url=f"http://127.0.0.1:{relay_port}",
        oidc=OidcSettings(issuer=provider.issuer, client_id=CLIENT, client_secret=SECRET,
                          ca_file=provider.ca.cert, username_claim="email",
                          groups_claim="groups", groups_prefix="oidc:",
                          extra_scopes=("groups",), provider_name="Test IdP"))


async def provider_sign_in(page: Page, password: str) -> None:
    await page.wait_for_selector("#provider-submit", timeout=60_000)
    await page.fill("#login", "alice")
    await page.fill("#password", password)
    await page.click("#provider-submit")


async def test_sign_in_at_the_provider_open_a_console_and_sign_out(
        make_relay: RelayFactory, xvnc: XvncServer, browser: Browser,
        provider: OidcProvider, relay_port: int) -> None:
    routes = [Route("lab", "mine", "127.0.0.1", xvnc.port, access=Access(groups=("oidc:devs",))),
              Route("lab", "theirs", "127.0.0.1", xvnc.port, access=Access(groups=("devs",)))]
    async with make_relay(routes=routes, auth=oidc_auth(provider, relay_port),
                          listen=Address("127.0.0.1", relay_port)) as relay:
        # The provider's certificate is from the test's CA, which chromium does not know.
        context = await browser.new_context(ignore_https_errors=True)
        page = await context.new_page()
        try:
            xvnc.paint("#ff0000")
            await page.goto(f"{relay.public_url}/t/lab/mine/")
            await page.wait_for_url(f"{relay.public_url}/login?next=t/lab/mine/",
                                    timeout=60_000)
            # Only the provider's button: no users file, so no password form of the relay.
            assert await page.locator("form.login").count() == 0
            assert await page.text_content("#provider") == "Sign in with Test IdP"
            await page.screenshot(path=str(ARTIFACTS / "oidc-sign-in.png"))
            await page.click("#provider")
            await page.wait_for_url(f"{provider.issuer}/interaction/**", timeout=60_000)
            await provider_sign_in(page, "a wrong password")
            assert await page.text_content("#provider-message") == "Wrong login or password."
            await provider_sign_in(page, PASSWORD)
            await page.wait_for_url(f"{relay.public_url}/t/lab/mine/", timeout=60_000)
            await page.wait_for_selector("body[data-state=connected]", timeout=60_000)
            await wait_for_pixel(page, (255, 0, 0))
            # The group without the prefix is not the person's group.
            other = await context.new_page()
            await other.goto(f"{relay.public_url}/t/lab/theirs/")
            await other.wait_for_selector("body[data-state=failed]", timeout=60_000)
            assert "alice@example.test" in (await other.text_content("#status") or "")
            # Sign out from the list: the relay's session, the open console, the provider's.
            await other.goto(f"{relay.public_url}/")
            await other.click("form[action=logout] button")
            await other.wait_for_url(f"{provider.issuer}/session/end**", timeout=60_000)
            await other.click("#logout-yes")
            await other.wait_for_url(f"{relay.public_url}/**", timeout=60_000)
            # The open console ended (4401), and its viewer went to the sign-in page.
            await page.wait_for_url(f"{relay.public_url}/login?next=t/lab/mine/",
                                    timeout=60_000)
            # Signed out at the provider too: signing in again asks for the password.
            await other.goto(f"{relay.public_url}/login")
            await other.click("#provider")
            await other.wait_for_selector("#provider-submit", timeout=60_000)
        finally:
            await context.close()


async def session_claims(context: BrowserContext) -> dict[str, object]:
    """What the browser's sign-in cookie says (its signed payload)."""
    cookie = next(c for c in await context.cookies() if c["name"] == "vncgate_session")
    return dict(json.loads(unb64(cookie["value"].partition(".")[0])))


def renewed_until(relay: RelayServer, sid: str) -> float:
    renewals = relay.state.renewals
    assert renewals is not None
    known = renewals._latest.get(sid)
    return known.person.expires if known is not None else 0.0


@pytest.mark.parametrize("provider", [True], ids=["refresh-tokens"], indirect=True)
async def test_a_console_outlives_its_id_token_when_the_provider_issues_refresh_tokens(
        make_relay: RelayFactory, xvnc: XvncServer, browser: Browser,
        provider: OidcProvider, relay_port: int) -> None:
    routes = [Route("lab", "mine", "127.0.0.1", xvnc.port, access=Access(groups=("oidc:devs",)))]
    async with make_relay(routes=routes, auth=oidc_auth(provider, relay_port),
                          listen=Address("127.0.0.1", relay_port)) as relay:
        context = await browser.new_context(ignore_https_errors=True)
        page = await context.new_page()
        try:
            xvnc.paint("#ff0000")
            await page.goto(f"{relay.public_url}/login/oidc?next=t/lab/mine/")
            await provider_sign_in(page, PASSWORD)
            await page.wait_for_url(f"{relay.public_url}/t/lab/mine/", timeout=60_000)
            await page.wait_for_selector("body[data-state=connected]", timeout=60_000)
            first = await session_claims(context)
            first_expiry, sid = first["ie"], str(first["sid"])
            assert isinstance(first_expiry, int)
            # The relay renews the open console's sign-in when its ID token expires, and again.
            await eventually(lambda: renewed_until(relay, sid) > first_expiry,
                             "the relay to renew the console's sign-in", timeout=120)
            second = renewed_until(relay, sid)
            await eventually(lambda: renewed_until(relay, sid) > second,
                             "the relay to renew the console's sign-in again", timeout=120)
            assert time.time() > first_expiry
            # The console never closed: still connected, still drawing the server's screen.
            assert await page.get_attribute("body", "data-state") == "connected"
            xvnc.paint("#0000ff")
            await wait_for_pixel(page, (0, 0, 255))
            # The list page, with the browser's cookie (whose ID token expired): signed in, and
            # the browser now holds a renewed cookie of the same sign-in.
            other = await context.new_page()
            await other.goto(f"{relay.public_url}/")
            assert "lab/mine" in await other.content()
            renewed = await session_claims(context)
            assert renewed["sid"] == sid and renewed["ie"] > first_expiry  # type: ignore[operator]
            assert await page.get_attribute("body", "data-state") == "connected"
            # Signing out ends the renewable sign-in for as long as its cookie would have
            # lasted (--session-ttl), not only its current ID token, and closes the console.
            await other.click("form[action=logout] button")
            await other.wait_for_url(f"{provider.issuer}/session/end**", timeout=60_000)
            await other.click("#logout-yes")
            await other.wait_for_url(f"{relay.public_url}/**", timeout=60_000)
            await page.wait_for_url(f"{relay.public_url}/login?next=t/lab/mine/",
                                    timeout=60_000)
            kept = relay.state.revoked._until[revocation_key(sid)]
            assert kept >= renewed["exp"] > renewed["ie"]  # type: ignore[operator]
        finally:
            xvnc.paint("#ff0000")  # the session's server, as the other tests expect it
            await context.close()
