"""Typing into screens without a clipboard, in a real browser against a real Xvnc: "Type text"
makes its text appear in an xterm on the VNC desktop (read back from what xterm wrote), refuses
a text with characters that have no keysym before sending any of it, and the on-screen keys,
tapped on a touch screen, reach an X client as the keys they name."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser

from harness.waiting import eventually
from harness.xvnc import XvncServer
from tests.conftest import RelayFactory
from tests.support.xdesktop import KeyLog, TypedText
from vncgate.common.model import Route


@pytest.fixture
def desktop() -> Iterator[XvncServer]:
    with XvncServer(geometry="1024x768", colour="#202020") as vnc:
        yield vnc


async def test_type_text_appears_in_an_xterm(make_relay: RelayFactory, desktop: XvncServer,
                                            browser: Browser, tmp_path: Path) -> None:
    xterm = TypedText(desktop.display, tmp_path / "typed.txt")
    route = Route("lab", "bios", "127.0.0.1", desktop.port)
    try:
        async with make_relay(routes=[route]) as relay:
            page = await browser.new_page(viewport={"width": 1000, "height": 760})
            try:
                await page.goto(f"{relay.public_url}/t/lab/bios/")
                await page.wait_for_selector("body[data-state=connected]", timeout=60_000)
                await page.click("#type-toggle")
                # Shifted characters, symbols, Latin-1 and beyond: each goes as its keysym, so
                # xterm gets the characters whatever this browser's keyboard layout is.
                line = "Hello, World! ~{}|<>\"'@#$%^&*()_+ 1+1=2 déjà vu €\n"
                await page.fill("#type-text", line)
                await page.fill("#type-delay", "5")
                await page.click("#type-send")
                await eventually(lambda: xterm.text() == line, "the line in the xterm",
                                 context=xterm.text)
                await page.wait_for_selector("#type-status[data-state=done]")

                # A control character has no keysym: the text is refused whole, naming it.
                await page.fill("#type-text", "rm -rf\u0007 /\u0000\n")
                await page.click("#type-send")
                await page.wait_for_selector("#type-status[data-state=refused]")
                status = await page.text_content("#type-status")
                assert status is not None
                assert "U+0007" in status and "U+0000" in status
                assert "Nothing was typed" in status
                # Nothing of it was sent: the next text follows the first line directly.
                await page.fill("#type-text", "next\n")
                await page.click("#type-send")
                await eventually(lambda: xterm.text() == line + "next\n",
                                 "only the next line after the refused one", context=xterm.text)
            finally:
                await page.close()
    finally:
        xterm.close()


OSK_KEYS = {
    "escape": "Escape", **{f"f{n}": f"F{n}" for n in range(1, 13)}, "left": "Left",
    "up": "Up", "right": "Right", "down": "Down", "delete": "Delete", "home": "Home",
    "end": "End", "pageup": "Prior", "pagedown": "Next", "enter": "Return", "tab": "Tab",
    "backspace": "BackSpace", "insert": "Insert",
}


async def test_on_screen_keys_reach_the_x_client_by_touch(
        make_relay: RelayFactory, desktop: XvncServer, browser: Browser) -> None:
    keys = KeyLog(desktop.display)
    route = Route("lab", "bios", "127.0.0.1", desktop.port)
    try:
        async with make_relay(routes=[route]) as relay:
            context = await browser.new_context(viewport={"width": 800, "height": 700},
                                                has_touch=True, is_mobile=True)
            page = await context.new_page()
            try:
                await page.goto(f"{relay.public_url}/t/lab/bios/")
                await page.wait_for_selector("body[data-state=connected]", timeout=60_000)
                await page.tap("#osk-toggle")
                await page.wait_for_selector("#osk:not([hidden])")
                for key, name in OSK_KEYS.items():
                    keys.events.clear()
                    await page.tap(f"#osk button[data-key={key}]")
                    want = [("down", name), ("up", name)]
                    await eventually(lambda w=want: keys.events == w,  # type: ignore[misc]
                                     f"{key}: the X client getting {want}",
                                     context=lambda: f"it got {keys.events}")
                # Ctrl-Alt-Del in one tap; a latched modifier applies to the next key only.
                keys.events.clear()
                await page.tap("#osk button[data-combo=ctrl-alt-del]")
                names = ["Control_L", "Alt_L", "Delete"]
                want = [("down", n) for n in names] + [("up", n) for n in reversed(names)]
                await eventually(lambda: keys.events == want, "Ctrl-Alt-Del",
                                 context=lambda: f"it got {keys.events}")
                keys.events.clear()
                await page.tap("#osk button[data-mod=alt]")
                assert await page.get_attribute("#osk button[data-mod=alt]",
                                                "aria-pressed") == "true"
                await page.tap("#osk button[data-key=f2]")
                await page.tap("#osk button[data-key=f3]")
                want = [("down", "Alt_L"), ("down", "F2"), ("up", "F2"), ("up", "Alt_L"),
                        ("down", "F3"), ("up", "F3")]
                await eventually(lambda: keys.events == want, "Alt-F2, then F3 alone",
                                 context=lambda: f"it got {keys.events}")
                assert await page.get_attribute("#osk button[data-mod=alt]",
                                                "aria-pressed") == "false"
            finally:
                await context.close()
    finally:
        keys.close()
