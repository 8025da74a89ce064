"""The README's demo command serves a real desktop: the URL it prints opens it in a browser."""

from __future__ import annotations

import asyncio
import re
import signal
import sys

from playwright.async_api import Browser

from harness import reaper
from harness.waiting import eventually
from tests.conftest import ROOT
from tests.e2e.test_viewer import wait_for_pixel

DEMO_BLUE = (0x15, 0x65, 0xC0)


# A digest of the whole canvas: the sum of the pixel values weighted by position.
CANVAS_DIGEST = """() => {
  const canvas = document.querySelector('#screen canvas');
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let digest = 0;
  for (let i = 0; i < data.length; i += 4) {
    digest = (digest * 31 + data[i] + data[i + 1]) % 1000000007;
  }
  return digest;
}"""


async def test_demo_prints_a_url_that_shows_the_desktop(browser: Browser) -> None:
    proc = await reaper.exec_async(
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
            await page.wait_for_selector("body[data-state=connected]", timeout=60_000)
            await wait_for_pixel(page, DEMO_BLUE)
            # Something alive: the clock and the terminal change the picture every second.
            first = await page.evaluate(CANVAS_DIGEST)
            async def changed() -> bool:
                return bool(await page.evaluate(CANVAS_DIGEST) != first)

            await eventually(changed, "the demo desktop changing", timeout=15, interval=0.2)
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
        reaper.kill_group(proc.pid, signal.SIGKILL)  # anything it left in its group
    assert proc.returncode == 0
