"""TLS on the public port in chromium: a certificate made by the test, trusted by its key
(chromium's SPKI pin; Debian's chromium has no certutil here to add a CA to its store), https
and wss to a real Xvnc, HSTS and a Secure sign-in cookie."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.async_api import Browser, Error, async_playwright

from harness.certs import make_ca, make_server_cert
from harness.xvnc import XvncServer
from tests.conftest import ARTIFACTS, RelayFactory
from tests.e2e.conftest import CHROMIUM, CHROMIUM_ARGS
from tests.e2e.test_viewer import wait_for_pixel
from vncgate.common.model import Route
from vncgate.relay.access.passwords import hash_secret
from vncgate.relay.access.users import User
from vncgate.relay.settings import AuthSettings

PASSWORD = "a password typed over https"


async def test_https_viewer_over_wss_with_hsts_and_a_secure_cookie(
        make_relay: RelayFactory, xvnc: XvncServer, browser: Browser, tmp_path: Path) -> None:
    pem = make_server_cert(make_ca(tmp_path / "ca"), tmp_path / "server", "relay")
    auth = AuthSettings(mode="token", users={"alice": User("alice", hash_secret(PASSWORD))},
                        session_secret=b"t" * 32)
    async with make_relay(routes=[Route("lab", "desk", "127.0.0.1", xvnc.port)], auth=auth,
                          tls_cert=pem.cert, tls_key=pem.key) as relay:
        url = relay.public_url
        assert url.startswith("https://")
        # Without trust, chromium refuses the test's certificate: the trust below is what counts.
        page = await browser.new_page()
        with pytest.raises(Error, match="ERR_CERT_AUTHORITY_INVALID"):
            await page.goto(f"{url}/login")
        await page.close()
        async with async_playwright() as playwright:
            trusting = await playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=[
                    *CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={pem.spki_sha256()}"])
            try:
                context = await trusting.new_context()
                page = await context.new_page()
                xvnc.paint("#ff0000")
                response = await page.goto(f"{url}/login?next=t/lab/desk/")
                assert response is not None and response.ok
                assert response.headers["strict-transport-security"] == "max-age=31536000"
                await page.fill("input[name=user]", "alice")
                await page.fill("input[name=password]", PASSWORD)
                await page.click("button[type=submit]")
                await page.wait_for_url(f"{url}/t/lab/desk/", timeout=60_000)
                await page.wait_for_selector("body[data-state=connected]", timeout=60_000)
                await wait_for_pixel(page, (255, 0, 0))  # over wss://
                cookies = {c["name"]: c for c in await context.cookies()}
                # Host-only names under https: a sibling host cannot plant them.
                assert cookies["__Host-vncgate_session"]["secure"] is True
                assert cookies["__Host-vncgate_csrf"]["secure"] is True
                assert not any(name.startswith("vncgate_") for name in cookies)
                await page.screenshot(path=str(ARTIFACTS / "viewer-https.png"))
            finally:
                await trusting.close()
