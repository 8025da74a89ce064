"""The browser never sees the VNC password: the relay logs in to a VncAuth Xvnc for it."""

from __future__ import annotations

from pathlib import Path

from playwright.async_api import Browser

from harness.xvnc import XvncServer
from tests.conftest import ARTIFACTS, RelayFactory
from tests.e2e.test_viewer import wait_for_pixel
from tests.relay.test_upstream_security import (  # noqa: F401 - module-scoped fixtures
    secrets_dir,
    vncauth_xvnc,
)
from vncgate.common.model import Route
from vncgate.common.spec import Credentials


async def test_password_server_shows_red_desktop_without_a_prompt(
        make_relay: RelayFactory, vncauth_xvnc: XvncServer, secrets_dir: Path,  # noqa: F811
        browser: Browser) -> None:
    route = Route("lab", "desk", "127.0.0.1", vncauth_xvnc.port,
                  credentials=Credentials(password_file=str(secrets_dir / "password")))
    async with make_relay(routes=[route]) as relay:
        page = await browser.new_page(viewport={"width": 1000, "height": 760})
        try:
            await page.goto(f"{relay.public_url}/t/lab/desk/")
            await page.wait_for_selector("body[data-state=connected]", timeout=60_000)
            await wait_for_pixel(page, (255, 0, 0))
            assert await page.is_hidden("#credentials")  # no password prompt, ever
            await page.screenshot(path=str(ARTIFACTS / "viewer-vncauth-red.png"))
        finally:
            await page.close()


async def test_a_wrong_stored_password_shows_its_reason(
        make_relay: RelayFactory, vncauth_xvnc: XvncServer, secrets_dir: Path,  # noqa: F811
        browser: Browser) -> None:
    route = Route("lab", "desk", "127.0.0.1", vncauth_xvnc.port,
                  credentials=Credentials(password_file=str(secrets_dir / "wrong")))
    async with make_relay(routes=[route]) as relay:
        page = await browser.new_page()
        try:
            await page.goto(f"{relay.public_url}/t/lab/desk/")
            await page.wait_for_selector("body[data-state=failed]", timeout=60_000)
            status = await page.text_content("#status") or ""
            assert "refused the stored credential" in status, status
            assert "not-it" not in (await page.content())
            assert await page.is_hidden("#credentials")
            await page.screenshot(path=str(ARTIFACTS / "viewer-vncauth-wrong.png"))
        finally:
            await page.close()
