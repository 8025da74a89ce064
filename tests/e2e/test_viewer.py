"""The viewer in a real browser: noVNC connects through the relay to Xvnc and draws its screen."""

from __future__ import annotations

from playwright.async_api import Browser, ConsoleMessage, Page

from harness.waiting import eventually
from harness.xvnc import XvncServer
from tests.conftest import ARTIFACTS, RelayFactory
from vncgate.common.model import Route

CENTRE_PIXEL = """() => {
  const canvas = document.querySelector('#screen canvas');
  if (!canvas || !canvas.width) return null;
  const [x, y] = [Math.floor(canvas.width / 2), Math.floor(canvas.height / 2)];
  return Array.from(canvas.getContext('2d').getImageData(x, y, 1, 1).data.slice(0, 3));
}"""


async def wait_for_pixel(page: Page, rgb: tuple[int, int, int], timeout: float = 60) -> None:
    seen: list[object] = [None]

    async def centre() -> bool:
        seen[0] = await page.evaluate(CENTRE_PIXEL)
        return bool(seen[0] == list(rgb))

    await eventually(centre, f"the canvas centre {list(rgb)}", timeout=timeout, interval=0.1,
                     context=lambda: f"canvas centre is {seen[0]}")


def csp_violations(messages: list[ConsoleMessage]) -> list[str]:
    return [m.text for m in messages if "Content Security Policy" in m.text]


async def test_viewer_shows_the_desktop_and_follows_changes(
        make_relay: RelayFactory, xvnc: XvncServer, browser: Browser) -> None:
    route = Route("lab", "xvnc", "127.0.0.1", xvnc.port, display_name="Lab <desk>")
    async with make_relay(routes=[route]) as relay:
        page = await browser.new_page(viewport={"width": 1000, "height": 760})
        console: list[ConsoleMessage] = []
        page.on("console", lambda message: console.append(message))
        try:
            xvnc.paint("#ff0000")
            await page.goto(f"{relay.public_url}/t/lab/xvnc/")
            await page.wait_for_selector("body[data-state=connected]", timeout=60_000)
            assert await page.text_content("#status") == "Connected"
            assert await page.text_content("#title") == "Lab <desk>"  # shown as text, not HTML
            await wait_for_pixel(page, (255, 0, 0))
            await page.screenshot(path=str(ARTIFACTS / "viewer-red.png"))
            # The picture is live: paint the desktop green and the canvas follows.
            xvnc.paint("#00ff00")
            await wait_for_pixel(page, (0, 255, 0))
            await page.screenshot(path=str(ARTIFACTS / "viewer-green.png"))
            assert relay.state.sessions.count == 1
            assert csp_violations(console) == []
        finally:
            xvnc.paint("#ff0000")
            await page.close()
        # Closing the tab ends the session in the relay.
        await eventually(lambda: relay.state.sessions.count == 0, "the session ended")


async def test_unknown_target_shows_its_close_reason(make_relay: RelayFactory,
                                                     browser: Browser) -> None:
    async with make_relay(routes=[]) as relay:
        page = await browser.new_page()
        try:
            await page.goto(f"{relay.public_url}/t/lab/nope/")
            await page.wait_for_selector("body[data-state=failed]", timeout=60_000)
            status = await page.text_content("#status")
            assert status is not None
            assert "no console lab/nope here" in status
            assert await page.is_visible("#reconnect")
            await page.screenshot(path=str(ARTIFACTS / "viewer-unknown.png"))
        finally:
            await page.close()


async def test_view_only_target_is_marked_and_hides_ctrl_alt_del(
        make_relay: RelayFactory, xvnc: XvncServer, browser: Browser) -> None:
    route = Route("lab", "watch", "127.0.0.1", xvnc.port, view_only=True)
    async with make_relay(routes=[route]) as relay:
        page = await browser.new_page()
        try:
            await page.goto(f"{relay.public_url}/t/lab/watch/")
            await page.wait_for_selector("body[data-state=connected]", timeout=60_000)
            assert await page.text_content("#status") == "Connected (view only)"
            assert await page.evaluate("window.vncgate.rfb.viewOnly") is True
            assert not await page.is_visible("#cad")
        finally:
            await page.close()


async def test_list_page_links_to_the_viewer(make_relay: RelayFactory, xvnc: XvncServer,
                                             browser: Browser) -> None:
    route = Route("lab", "xvnc", "127.0.0.1", xvnc.port, display_name="Lab desk")
    async with make_relay(routes=[route]) as relay:
        page = await browser.new_page()
        try:
            await page.goto(f"{relay.public_url}/")
            await page.click("text=Lab desk")
            await page.wait_for_selector("body[data-state=connected]", timeout=60_000)
            assert page.url == f"{relay.public_url}/t/lab/xvnc/"
        finally:
            await page.close()
