"""Signing in with a real browser: token mode's login page, then a console; a refusal in words."""

from __future__ import annotations

from playwright.async_api import Browser

from harness.xvnc import XvncServer
from tests.conftest import ARTIFACTS, RelayFactory
from tests.e2e.test_viewer import wait_for_pixel
from vncgate.common.model import Route
from vncgate.common.spec import Access
from vncgate.relay.access import links
from vncgate.relay.access.identity import AuthMode
from vncgate.relay.access.passwords import hash_secret
from vncgate.relay.access.users import User
from vncgate.relay.settings import AuthSettings

PASSWORD = "a browser-typed password"
KEY = b"e" * 40


async def test_login_then_console_and_a_forbidden_target_says_why(
        make_relay: RelayFactory, xvnc: XvncServer, browser: Browser) -> None:
    routes = [Route("lab", "mine", "127.0.0.1", xvnc.port, access=Access(users=("alice",))),
              Route("lab", "theirs", "127.0.0.1", xvnc.port, access=Access(users=("bob",)))]
    auth = AuthSettings(mode=AuthMode.TOKEN, users={"alice": User("alice", hash_secret(PASSWORD))},
                        session_secret=b"b" * 32)
    async with make_relay(routes=routes, auth=auth) as relay:
        page = await browser.new_page()
        try:
            xvnc.paint("#ff0000")
            await page.goto(f"{relay.public_url}/t/lab/mine/")
            # Not signed in: the viewer's 4401 sends the browser to the login page.
            await page.wait_for_url(f"{relay.public_url}/login?next=t/lab/mine/", timeout=60_000)
            await page.fill("input[name=user]", "alice")
            await page.fill("input[name=password]", PASSWORD)
            await page.click("button[type=submit]")
            await page.wait_for_url(f"{relay.public_url}/t/lab/mine/", timeout=60_000)
            await page.wait_for_selector("body[data-state=connected]", timeout=60_000)
            await wait_for_pixel(page, (255, 0, 0))
            await page.goto(f"{relay.public_url}/t/lab/theirs/")
            await page.wait_for_selector("body[data-state=failed]", timeout=60_000)
            status = await page.text_content("#status")
            assert status is not None
            assert "alice is not in the access list of lab/theirs" in status
            await page.screenshot(path=str(ARTIFACTS / "viewer-forbidden.png"))
        finally:
            await page.close()


async def test_share_link_opens_a_view_only_console_without_signing_in(
        make_relay: RelayFactory, xvnc: XvncServer, browser: Browser) -> None:
    routes = [Route("lab", "shared", "127.0.0.1", xvnc.port, access=Access(users=("bob",)))]
    auth = AuthSettings(mode=AuthMode.TOKEN, users={"bob": User("bob", hash_secret(PASSWORD))},
                        link_keys=(KEY,))
    token, _ = links.mint(KEY, "lab/shared", 600, view_only=True)
    async with make_relay(routes=routes, auth=auth) as relay:
        page = await browser.new_page()
        try:
            xvnc.paint("#ff0000")
            await page.goto(f"{relay.public_url}/t/lab/shared/#link={token}")
            await page.wait_for_selector("body[data-state=connected]", timeout=60_000)
            assert await page.text_content("#status") == "Connected (view only)"
            assert "#link=" not in page.url  # the token left the address bar
            await wait_for_pixel(page, (255, 0, 0))
            expired, _ = links.mint(KEY, "lab/shared", 60, now=1_000_000)
            await page.goto(f"{relay.public_url}/t/lab/shared/?again#link={expired}")
            await page.wait_for_selector("body[data-state=failed]", timeout=60_000)
            assert "expired" in (await page.text_content("#status") or "")
        finally:
            await page.close()
