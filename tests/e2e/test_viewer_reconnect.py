"""The viewer comes back by itself after a drop that is not final, in a real browser against a
real Xvnc: the Xvnc stops (the session ends, the retries are refused with 4502) and starts again
on the same port; the viewer says what it is doing meanwhile and connects again. After a final
refusal (4409 here: the console is held by someone else) it does not retry."""

from __future__ import annotations

from playwright.async_api import Browser

from harness.waiting import eventually
from harness.xvnc import XvncServer
from tests.conftest import RelayFactory
from tests.e2e.test_viewer import wait_for_pixel
from vncgate.common.model import Route
from vncgate.common.spec import SessionMode, SessionPolicy


async def test_reconnects_after_the_vnc_server_restarts(make_relay: RelayFactory,
                                                        browser: Browser) -> None:
    first = XvncServer(colour="#ff0000").start()
    port = first.port
    second: XvncServer | None = None
    route = Route("lab", "vm", "127.0.0.1", port)
    try:
        async with make_relay(routes=[route]) as relay:
            page = await browser.new_page()
            try:
                await page.goto(f"{relay.public_url}/t/lab/vm/")
                await page.wait_for_selector("body[data-state=connected]", timeout=60_000)
                await wait_for_pixel(page, (255, 0, 0))

                first.stop()  # the VM "reboots": its VNC server goes away
                await page.wait_for_selector("body[data-state=disconnected]", timeout=60_000)
                status = await page.text_content("#status")
                assert status is not None and "Reconnecting in" in status, status
                assert await page.is_visible("#reconnect")  # "Reconnect now"
                assert await page.is_visible("#stop-retry")
                # At least one retry while nothing listens: refused (4502), and retried again.
                await eventually(
                    lambda: page.evaluate(
                        "window.vncgate.retries.some(r => r.code === 4502)"),
                    "a retry refused with 4502", timeout=60,
                    context=lambda: page.evaluate("JSON.stringify(window.vncgate.retries)"))
                assert await page.evaluate(
                    "document.body.dataset.state") in ("disconnected", "connecting")

                second = XvncServer(colour="#0000ff", port=port).start()
                await page.wait_for_selector("body[data-state=connected]", timeout=90_000)
                await wait_for_pixel(page, (0, 0, 255))
                delays = await page.evaluate("window.vncgate.retries.map(r => r.delay)")
                assert delays == sorted(delays) and delays[0] == 1, delays  # backing off
                assert not await page.is_visible("#stop-retry")
            finally:
                await page.close()
    finally:
        first.stop()
        if second is not None:
            second.stop()


async def test_no_retry_after_a_final_refusal(make_relay: RelayFactory, xvnc: XvncServer,
                                              browser: Browser) -> None:
    # An exclusive console that nobody may take over: the second viewer is refused with 4409,
    # which retrying cannot change (it would only knock on the holder's door every few seconds).
    route = Route("lab", "held", "127.0.0.1", xvnc.port,
                  sessions=SessionPolicy(mode=SessionMode.EXCLUSIVE))
    async with make_relay(routes=[route]) as relay:
        holder = await browser.new_page()
        page = await browser.new_page()
        try:
            await holder.goto(f"{relay.public_url}/t/lab/held/")
            await holder.wait_for_selector("body[data-state=connected]", timeout=60_000)
            await page.goto(f"{relay.public_url}/t/lab/held/")
            await page.wait_for_selector("body[data-state=failed]", timeout=60_000)
            assert await page.evaluate("window.vncgate.lastClose.code") == 4409
            assert await page.evaluate("window.vncgate.retries.length") == 0
            assert not await page.is_visible("#stop-retry")
        finally:
            await page.close()
            await holder.close()
