"""The console list in a real browser against real Xvnc servers: the status follows what the
relay's connections find (and changes on the open page when an Xvnc stops), it says who is on
a console and how, search and filters live in the URL, consoles are grouped by namespace and
paged, and the keyboard gets around; the viewer says who is on its console."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from playwright.async_api import Browser, Page

from harness.cluster import free_port
from harness.waiting import eventually
from harness.xvnc import XvncServer
from tests.conftest import ARTIFACTS, RelayFactory
from vncgate.common.model import Route
from vncgate.common.spec import Interactive, SessionMode, SessionPolicy


async def row_state(page: Page, key: str) -> tuple[str, str]:
    row = page.locator(f'tr.console[data-key="{key}"]')
    return (await row.locator(".phase").inner_text(), await row.locator(".reason").inner_text())


async def test_status_and_viewers_follow_the_servers(make_relay: RelayFactory,
                                                     browser: Browser) -> None:
    desk = XvncServer(colour="#336699").start()
    routes = [Route("lab", "desk", "127.0.0.1", desk.port, display_name="Lab desk"),
              Route("lab", "bmc", "127.0.0.1", free_port(), display_name="Lab BMC"),
              Route("ops", "vm", "127.0.0.1", desk.port, display_name="Ops VM")]
    try:
        async with make_relay(routes=routes) as relay:
            base = relay.public_url
            viewer = await browser.new_page()
            bmc = await browser.new_page()
            listing = await browser.new_page()
            try:
                await viewer.goto(f"{base}/t/lab/desk/")
                await viewer.wait_for_selector("body[data-state=connected]", timeout=60_000)
                await bmc.goto(f"{base}/t/lab/bmc/")
                await bmc.wait_for_selector("body[data-state=disconnected]", timeout=60_000)
                await bmc.close()

                await listing.goto(f"{base}/")
                assert await row_state(listing, "lab/desk") == ("Ready", "InUse")
                assert await row_state(listing, "lab/bmc") == ("Unreachable",
                                                               "ConnectionRefused")
                assert await row_state(listing, "ops/vm") == ("Unknown", "NotOpenedYet")
                viewers = listing.locator('tr.console[data-key="lab/desk"] .viewers')
                assert await viewers.inner_text() == "anonymous (control)"
                groups = await listing.locator("tbody.group").evaluate_all(
                    "gs => gs.map(g => g.dataset.namespace)")
                assert groups == ["lab", "ops"]
                await listing.screenshot(path=str(ARTIFACTS / "list-status.png"))

                # The Xvnc stops: the viewer's reconnects are refused, and the open list page
                # shows it by itself (it refreshes from /api/v1/consoles).
                desk.stop()
                await listing.wait_for_selector(
                    'tr.console[data-key="lab/desk"][data-phase=Unreachable]', timeout=60_000)
                assert await row_state(listing, "lab/desk") == ("Unreachable",
                                                                "ConnectionRefused")
                assert await viewers.inner_text() == ""
                await listing.screenshot(path=str(ARTIFACTS / "list-unreachable.png"))
            finally:
                await viewer.close()
                await listing.close()
    finally:
        desk.stop()


async def test_search_filters_pages_and_keys(make_relay: RelayFactory, xvnc: XvncServer,
                                             browser: Browser) -> None:
    routes = [Route(f"team-{i % 2}", f"desk-{i:03}", "127.0.0.1", xvnc.port)
              for i in range(120)]
    routes.append(Route("lab", "special", "127.0.0.1", xvnc.port, display_name="Special desk"))
    async with make_relay(routes=routes) as relay:
        base = relay.public_url
        page = await browser.new_page(viewport={"width": 1100, "height": 800})
        try:
            await page.goto(f"{base}/")
            assert await page.locator("tr.console").count() == 50
            summary = await page.inner_text("#summary")
            assert summary.startswith("Consoles 1\u201350 of 121 (page 1 of 3)."), summary
            # "]" goes to the next page; the page number is in the URL.
            await page.keyboard.press("]")
            await page.wait_for_url("**/?page=2")
            assert (await page.inner_text("#summary")).startswith("Consoles 51\u2013100 of 121")

            # "/" focuses the search; Enter searches; the search is in the URL.
            await page.keyboard.press("/")
            assert await page.evaluate("document.activeElement.id") == "search"
            await page.keyboard.type("special")
            await page.keyboard.press("Enter")
            await page.wait_for_url("**/?q=special*")
            assert parse_qs(urlsplit(page.url).query)["q"] == ["special"]
            assert await page.locator("tr.console").count() == 1
            assert await page.locator("tr.console a.open").inner_text() == "Special desk"

            # Filters from the URL alone (a bookmark): a namespace, and a status.
            await page.goto(f"{base}/?namespace=team-1&per=25")
            keys = await page.locator("tr.console").evaluate_all(
                "rs => rs.map(r => r.dataset.key)")
            assert len(keys) == 25 and all(k.startswith("team-1/") for k in keys)
            assert await page.input_value("#namespace") == "team-1"
            await page.select_option("#phase", "Ready")  # applies at once
            await page.wait_for_url("**phase=Ready*")
            assert await page.locator("tr.console").count() == 0
            assert "No console matches" in await page.inner_text("#summary")
            await page.click("#clear")  # the filters go, the page size stays
            await page.wait_for_url(f"{base}/?per=25")
            assert await page.locator("tr.console").count() == 25

            # Arrow keys move between consoles; Enter opens the one with the focus.
            await page.keyboard.press("ArrowDown")
            await page.keyboard.press("ArrowDown")
            focused = await page.evaluate("document.activeElement.getAttribute('href')")
            second = await page.locator("tr.console a.open").nth(1).get_attribute("href")
            assert focused == second
            await page.keyboard.press("Enter")
            await page.wait_for_selector("body[data-state=connected]", timeout=60_000)
            assert page.url == f"{base}/{second}"
        finally:
            await page.close()


async def test_the_viewer_shows_who_is_on_the_console(make_relay: RelayFactory,
                                                      xvnc: XvncServer,
                                                      browser: Browser) -> None:
    # The first viewer may type, the next ones watch (spec.sessions.interactive: first).
    route = Route("lab", "desk", "127.0.0.1", xvnc.port,
                  sessions=SessionPolicy(interactive=Interactive.FIRST))
    async with make_relay(routes=[route]) as relay:
        first, second = await browser.new_page(), await browser.new_page()
        try:
            await first.goto(f"{relay.public_url}/t/lab/desk/")
            # Asked at connect and every 15 s: room for a second turn on a loaded machine.
            await first.wait_for_selector("#others[data-count='1']", timeout=45_000)
            assert await first.inner_text("#others") == "1 on this console: anonymous (control)"
            await second.goto(f"{relay.public_url}/t/lab/desk/")
            await second.wait_for_selector("#others[data-count='2']", timeout=45_000)
            assert await second.inner_text("#others") == (
                "2 on this console: anonymous (control), anonymous (view)")
        finally:
            await first.close()
            await second.close()


THUMBNAIL_CENTRE = """(img) => {
  if (!img.complete || !img.naturalWidth) return null;
  const canvas = document.createElement('canvas');
  [canvas.width, canvas.height] = [img.naturalWidth, img.naturalHeight];
  const context = canvas.getContext('2d');
  context.drawImage(img, 0, 0);
  const [x, y] = [Math.floor(canvas.width / 2), Math.floor(canvas.height / 2)];
  return Array.from(context.getImageData(x, y, 1, 1).data.slice(0, 3));
}"""


async def test_thumbnails_show_the_desktop_for_consoles_that_opt_in(
        make_relay: RelayFactory, browser: Browser) -> None:
    desk = XvncServer(geometry="1024x768", colour="#00c000").start()
    routes = [Route("lab", "desk", "127.0.0.1", desk.port, thumbnail=True),
              Route("lab", "held", "127.0.0.1", desk.port, thumbnail=True,
                    sessions=SessionPolicy(mode=SessionMode.EXCLUSIVE)),
              Route("lab", "plain", "127.0.0.1", desk.port)]
    try:
        async with make_relay(routes=routes) as relay:
            page = await browser.new_page()
            try:
                await page.goto(f"{relay.public_url}/")
                thumb = page.locator('tr[data-key="lab/desk"] img.thumb')
                seen: list[object] = [None]

                async def green() -> bool:
                    seen[0] = await thumb.evaluate(THUMBNAIL_CENTRE)
                    rgb = seen[0]
                    return isinstance(rgb, list) and rgb[1] > 150 and rgb[0] < 60 and rgb[2] < 60

                await eventually(green, "the thumbnail shows the desktop's green",
                                 context=lambda: seen[0])
                size = await thumb.evaluate("i => [i.naturalWidth, i.naturalHeight]")
                assert size == [320, 240]  # reduced, in proportion
                # An exclusive console gets none (its image is hidden), a console that did
                # not opt in has no image at all.
                held = page.locator('tr[data-key="lab/held"] img.thumb')
                await eventually(lambda: held.evaluate("i => i.hidden"), "no thumbnail (held)")
                assert await page.locator('tr[data-key="lab/plain"] img').count() == 0
                await page.screenshot(path=str(ARTIFACTS / "list-thumbnails.png"))
                assert relay.state.thumbnails.grabs == 1  # one look at the desk, none at held
            finally:
                await page.close()
    finally:
        desk.stop()
