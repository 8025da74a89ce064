"""The sign-in page in chromium: the product, the console about to open, aligned fields, an
error that keeps the user name, and the viewer's look; screenshots in test-artifacts/."""

from __future__ import annotations

from playwright.async_api import Browser, Page

from harness.xvnc import XvncServer
from tests.conftest import ARTIFACTS, RelayFactory
from vncgate.common.model import Route
from vncgate.relay.access.passwords import hash_secret
from vncgate.relay.access.users import User
from vncgate.relay.settings import AuthSettings

PASSWORD = "the right password"


async def box(page: Page, selector: str) -> dict[str, float]:
    found = await page.locator(selector).bounding_box()
    assert found is not None, f"{selector} is not on screen"
    return found


BAR_STYLE = """() => { const s = getComputedStyle(document.querySelector('#bar'));
  return [s.backgroundColor, s.color, getComputedStyle(document.body).fontFamily]; }"""


async def test_sign_in_page_names_product_and_console_and_keeps_the_user_after_an_error(
        make_relay: RelayFactory, xvnc: XvncServer, browser: Browser) -> None:
    auth = AuthSettings(mode="token", users={"alice": User("alice", hash_secret(PASSWORD))},
                        session_secret=b"s" * 32)
    routes = [Route("lab", "desk", "127.0.0.1", xvnc.port, display_name="Lab desk")]
    async with make_relay(routes=routes, auth=auth) as relay:
        page = await browser.new_page(viewport={"width": 1000, "height": 700})
        try:
            await page.goto(f"{relay.public_url}/t/lab/desk/")
            await page.wait_for_url(f"{relay.public_url}/login?next=t/lab/desk/",
                                    timeout=60_000)
            assert await page.text_content("#title") == "vncgate"
            assert await page.is_visible("#title")
            assert await page.text_content("#target") == "lab/desk"
            assert await page.is_visible("#target")
            assert not await page.is_visible("#message")  # no error before a try
            login_look = await page.evaluate(BAR_STYLE)
            assert await page.evaluate("document.activeElement.id") == "user"
            user, password = await box(page, "#user"), await box(page, "#password")
            user_label, password_label = (await box(page, "label[for=user]"),
                                          await box(page, "label[for=password]"))
            submit = await box(page, "button[type=submit]")
            # One column of fields, one of labels, each label on its field's line.
            assert user["x"] == password["x"] == submit["x"]
            assert user["width"] == password["width"] > 150
            assert user_label["x"] == password_label["x"]
            assert user_label["x"] + user_label["width"] < user["x"]
            assert password["y"] > user["y"] + user["height"] and submit["y"] > password["y"]
            for label, field in ((user_label, user), (password_label, password)):
                centre = label["y"] + label["height"] / 2
                assert field["y"] < centre < field["y"] + field["height"]
            await page.screenshot(path=str(ARTIFACTS / "login.png"))

            await page.fill("#user", "alice")
            await page.fill("#password", "not the password")
            await page.click("button[type=submit]")
            await page.wait_for_selector("#message:not([hidden])", timeout=60_000)
            assert await page.text_content("#message") == "Wrong user or password."
            assert await page.input_value("#user") == "alice"  # kept; the password is not
            assert await page.input_value("#password") == ""
            assert await page.evaluate("document.activeElement.id") == "password"
            assert await page.text_content("#target") == "lab/desk"  # still the same console
            await page.screenshot(path=str(ARTIFACTS / "login-error.png"))

            await page.fill("#password", PASSWORD)
            await page.click("button[type=submit]")
            await page.wait_for_url(f"{relay.public_url}/t/lab/desk/", timeout=60_000)
            await page.wait_for_selector("body[data-state=connected]", timeout=60_000)
            assert await page.evaluate(BAR_STYLE) == login_look  # the viewer's bar and type
            await page.goto(f"{relay.public_url}/")
            assert await page.text_content("#title") == "vncgate"
            assert await page.evaluate(BAR_STYLE) == login_look  # and the list's
        finally:
            await page.close()
