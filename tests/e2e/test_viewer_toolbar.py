"""The viewer's toolbar in a real browser against a real Xvnc: the view modes change how the
screen is drawn (and remote resize changes the X server's screen), and the keys menu's
combinations arrive at an X client on the server as key events."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.async_api import Browser, Page
from Xlib import display as xdisplay

from harness.waiting import eventually
from harness.xvnc import XvncServer
from tests.conftest import RelayFactory
from tests.support.xdesktop import KeyLog
from vncgate.common.model import Route

SIZES = """() => {
  const canvas = document.querySelector('#screen canvas');
  const screen = document.querySelector('#screen');
  return {fb: [canvas.width, canvas.height], shown: [canvas.clientWidth, canvas.clientHeight],
          box: [screen.clientWidth, screen.clientHeight]};
}"""


@pytest.fixture
def desktop() -> Iterator[XvncServer]:
    with XvncServer(geometry="1280x1024", colour="#ff0000") as vnc:
        yield vnc


def x_screen_size(display_number: int) -> tuple[int, int]:
    connection = xdisplay.Display(f":{display_number}")  # a new one: the size is read at connect
    try:
        screen = connection.screen()
        return screen.width_in_pixels, screen.height_in_pixels
    finally:
        connection.close()


async def until(page: Page, check: str, what: str, timeout: float = 60) -> dict[str, list[int]]:
    seen: list[dict[str, list[int]]] = [{}]

    async def sizes() -> dict[str, list[int]] | None:
        seen[0] = await page.evaluate(SIZES)
        return seen[0] if eval(check, {}, seen[0]) else None  # noqa: S307 - the test's own

    return await eventually(sizes, what, timeout=timeout, interval=0.1,
                            context=lambda: f"sizes {seen[0]}")


async def test_view_modes(make_relay: RelayFactory, desktop: XvncServer,
                          browser: Browser) -> None:
    route = Route("lab", "desk", "127.0.0.1", desktop.port)
    async with make_relay(routes=[route]) as relay:
        page = await browser.new_page(viewport={"width": 900, "height": 700})
        await page.goto(f"{relay.public_url}/t/lab/desk/")
        await page.wait_for_selector("body[data-state=connected]", timeout=60_000)
        # Scale to fit (the default): the 1280x1024 screen is drawn smaller than its box.
        sizes = await until(page, "fb == [1280, 1024] and shown[0] <= box[0] and "
                            "shown[1] <= box[1] and shown[0] < 1280", "scaled to fit")
        # 1:1: drawn at its real size, larger than the window, which scrolls.
        await page.select_option("#scale", "real")
        sizes = await until(page, "shown == [1280, 1024]", "drawn 1:1")
        assert await page.evaluate(
            "() => { const s = document.querySelector('#screen'); "
            "return getComputedStyle(s).overflow; }") == "auto"
        # Remote resize: the X server's screen takes the size of the viewer's box.
        await page.select_option("#scale", "remote")
        sizes = await until(page, "fb[0] != 1280 and fb[0] <= box[0] and fb[1] <= box[1]",
                            "remote screen resized to the window")
        assert x_screen_size(desktop.display) == tuple(sizes["fb"])
        await page.close()


async def test_keys_menu_sends_combinations(make_relay: RelayFactory, desktop: XvncServer,
                                            browser: Browser) -> None:
    keys = KeyLog(desktop.display)
    route = Route("lab", "desk", "127.0.0.1", desktop.port)
    try:
        async with make_relay(routes=[route]) as relay:
            page = await browser.new_page(viewport={"width": 900, "height": 700})
            await page.goto(f"{relay.public_url}/t/lab/desk/")
            await page.wait_for_selector("body[data-state=connected]", timeout=60_000)
            expected = {
                "ctrl-alt-f3": ["Control_L", "Alt_L", "F3"],
                "ctrl-alt-f12": ["Control_L", "Alt_L", "F12"],
                "alt-tab": ["Alt_L", "Tab"],
                "super": ["Super_L"],
                "ctrl-alt-del": ["Control_L", "Alt_L", "Delete"],
            }
            for value, names in expected.items():
                keys.events.clear()
                await page.select_option("#keys", value)
                want = [("down", n) for n in names] + [("up", n) for n in reversed(names)]
                await eventually(lambda w=want: keys.events[:len(w)] == w,  # type: ignore[misc]
                                 f"{value}: the X client getting {want}",
                                 context=lambda: f"it got {keys.events}")
                # The menu returns to its prompt, ready for the next combination.
                assert await page.input_value("#keys") == ""
            await page.close()
    finally:
        keys.close()
