"""The embedding example (examples/embed_app.py) in a real browser against a real Xvnc."""

from __future__ import annotations

from playwright.async_api import Browser

from harness.xvnc import XvncServer
from tests.conftest import ARTIFACTS
from tests.e2e.test_viewer import wait_for_pixel
from tests.relay.test_embed import load_example, serving


async def test_embedded_bridge_shows_the_desktop_in_chromium(xvnc: XvncServer,
                                                             browser: Browser) -> None:
    app = load_example().make_app({"desk": f"127.0.0.1:{xvnc.port}"})
    async with serving(app) as url:
        context = await browser.new_context(viewport={"width": 900, "height": 700})
        try:
            # The example's stand-in for the application's own sign-in.
            await context.add_cookies([{"name": "user", "value": "alice", "url": url}])
            page = await context.new_page()
            xvnc.paint("#ff0000")
            await page.goto(f"{url}/desk/")
            await wait_for_pixel(page, (255, 0, 0))
            xvnc.paint("#0000ff")  # live: a change on the server reaches the canvas
            await wait_for_pixel(page, (0, 0, 255))
            await page.screenshot(path=str(ARTIFACTS / "embed-example.png"))
        finally:
            xvnc.paint("#ff0000")
            await context.close()
