"""The README's demo command serves a real desktop: the URL it prints opens it in a browser."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time

from playwright.async_api import Browser

from tests.conftest import ROOT
from tests.e2e.test_viewer import wait_for_pixel

DEMO_BLUE = (0x15, 0x65, 0xC0)


async def test_demo_prints_a_url_that_shows_the_desktop(browser: Browser) -> None:
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts/demo.py"), "--port", "0",
                             "--exit-after", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        url, deadline = None, time.monotonic() + 30
        while url is None and time.monotonic() < deadline:
            line = await asyncio.to_thread(proc.stdout.readline)
            if not line and proc.poll() is not None:
                break
            found = re.search(r"Open\s+(http://127\.0\.0\.1:\d+/t/default/demo-desktop/)", line)
            url = found.group(1) if found else None
        assert url, f"the demo printed no URL; stderr: {proc.stderr.read() if proc.stderr else ''}"
        page = await browser.new_page()
        try:
            await page.goto(url)
            await page.wait_for_selector("body[data-state=connected]", timeout=15_000)
            await wait_for_pixel(page, DEMO_BLUE)
        finally:
            await page.close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
