"""The README's demo command serves a real desktop: the URL it prints opens it in a browser."""

from __future__ import annotations

import asyncio
import re
import signal
import sys

from playwright.async_api import Browser

from tests.conftest import ROOT
from tests.e2e.test_viewer import wait_for_pixel

DEMO_BLUE = (0x15, 0x65, 0xC0)


async def test_demo_prints_a_url_that_shows_the_desktop(browser: Browser) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "scripts/demo.py"), "--port", "0", "--exit-after", "60",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT)
    try:
        assert proc.stdout is not None
        url = None
        async with asyncio.timeout(30):
            while url is None and (line := await proc.stdout.readline()):
                found = re.search(rb"Open\s+(http://127\.0\.0\.1:\d+/t/default/demo-desktop/)",
                                  line)
                url = found.group(1).decode() if found else None
        assert url, "the demo printed no URL to open"
        page = await browser.new_page()
        try:
            await page.goto(url)
            await page.wait_for_selector("body[data-state=connected]", timeout=15_000)
            await wait_for_pixel(page, DEMO_BLUE)
        finally:
            await page.close()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(15):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
