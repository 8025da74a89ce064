"""An exclusive console in two browser tabs: the second sees who holds it, then takes over."""

from __future__ import annotations

from playwright.async_api import Browser

from harness.xvnc import XvncServer
from tests.conftest import ARTIFACTS, RelayFactory
from vncgate.common.model import Route
from vncgate.common.spec import SessionMode, SessionPolicy, Takeover


async def test_in_use_page_and_takeover(make_relay: RelayFactory, xvnc: XvncServer,
                                        browser: Browser) -> None:
    route = Route("lab", "solo", "127.0.0.1", xvnc.port,
                  sessions=SessionPolicy(mode=SessionMode.EXCLUSIVE, takeover=Takeover.ALLOW))
    async with make_relay(routes=[route]) as relay:
        holder = await browser.new_page()
        taker = await browser.new_page()
        try:
            await holder.goto(f"{relay.public_url}/t/lab/solo/")
            await holder.wait_for_selector("body[data-state=connected]", timeout=60_000)
            await taker.goto(f"{relay.public_url}/t/lab/solo/")
            await taker.wait_for_selector("body[data-state=failed]", timeout=60_000)
            status = await taker.text_content("#status") or ""
            assert "in use by 127.0.0.1 since" in status and "take it over" in status
            assert await taker.is_visible("#takeover")
            await taker.screenshot(path=str(ARTIFACTS / "viewer-in-use.png"))
            await taker.click("#takeover")
            await taker.wait_for_selector("body[data-state=connected]", timeout=60_000)
            await holder.wait_for_selector("body[data-state=failed]", timeout=60_000)
            assert "taken over by 127.0.0.1" in (await holder.text_content("#status") or "")
            assert not await holder.is_visible("#takeover")  # no automatic fight back
        finally:
            await holder.close()
            await taker.close()
