"""The public pages: list, viewer, redirects, static assets, escaping and security headers."""

from __future__ import annotations

import html
import json
import re
from collections.abc import AsyncIterator

import aiohttp
import markupsafe
import pytest

from tests.conftest import RelayFactory
from tests.relay.test_auth import sign_in
from vncgate.common.model import Route
from vncgate.relay.access.identity import AuthMode
from vncgate.relay.access.proxies import parse_networks
from vncgate.relay.settings import AuthSettings
from vncgate.relay.web.server import RelayServer

EVIL = '<img src=x onerror="alert(1)">{{config}}'


@pytest.fixture
async def relay(make_relay: RelayFactory) -> AsyncIterator[RelayServer]:
    routes = [Route("lab", "desk-1", "10.0.0.5", 5900, display_name=EVIL),
              Route("ops", "bmc", "10.0.0.6", 5900, view_only=True)]
    async with make_relay(routes=routes) as server:
        yield server


async def test_list_links_every_target_relatively_and_escapes_names(
        relay: RelayServer, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{relay.public_url}/") as resp:
        page = await resp.text()
    assert resp.status == 200
    assert 'href="t/lab/desk-1/"' in page and 'href="t/ops/bmc/"' in page
    assert "<img" not in page and str(markupsafe.escape(EVIL)) in page
    assert "view only" in page


async def test_viewer_page_carries_an_escaped_config(relay: RelayServer,
                                                     http: aiohttp.ClientSession) -> None:
    async with http.get(f"{relay.public_url}/t/lab/desk-1/") as resp:
        page = await resp.text()
    assert resp.status == 200
    assert "<img" not in page
    match = re.search(r'data-config="([^"]*)"', page)
    assert match is not None
    config = json.loads(html.unescape(match.group(1)))
    assert config == {"namespace": "lab", "name": "desk-1", "displayName": EVIL,
                      "viewOnly": False, "exclusive": False, "takeover": "deny",
                      "idleTimeout": None, "auth": "none", "user": "", "login": ""}
    # Assets are relative, so an Ingress prefix in front keeps working.
    assert 'src="../../../static/novnc/viewer.js"' in page


async def test_viewer_without_trailing_slash_redirects_relatively(
        relay: RelayServer, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{relay.public_url}/t/lab/desk-1", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "desk-1/"


@pytest.mark.parametrize("path", ["//evil.example/", "//evil.example/t/lab/desk-1",
                                  "/t/lab//evil.example", "/%2F%2Fevil.example/",
                                  "/t/..%2F..%2Fetc/passwd/", "/static/../web/public.py"])
async def test_no_path_redirects_off_site_or_escapes(relay: RelayServer,
                                                     http: aiohttp.ClientSession,
                                                     path: str) -> None:
    async with http.get(f"{relay.public_url}{path}", allow_redirects=False) as resp:
        location = resp.headers.get("Location", "")
        body = await resp.text()
    assert "evil.example" not in location and not location.startswith("//")
    assert resp.status in (302, 400, 403, 404), resp.status
    assert "def make_public_app" not in body


async def test_static_assets_and_the_novnc_core_are_served(relay: RelayServer,
                                                           http: aiohttp.ClientSession) -> None:
    for asset in ("static/novnc/viewer.js", "static/novnc/viewer.css",
                  "static/novnc/core/rfb.js"):
        async with http.get(f"{relay.public_url}/{asset}") as resp:
            assert resp.status == 200, f"{asset}: {resp.status} (run scripts/setup for noVNC)"
    async with http.get(f"{relay.public_url}/static/novnc/core/rfb.js") as resp:
        assert "javascript" in resp.headers["Content-Type"]


async def test_security_headers_on_pages(relay: RelayServer,
                                         http: aiohttp.ClientSession) -> None:
    for path in ("/", "/t/lab/desk-1/", "/no/such/page"):
        async with http.get(f"{relay.public_url}{path}") as resp:
            csp = resp.headers.get("Content-Security-Policy", "")
            assert "frame-ancestors 'self'" in csp and "script-src 'self'" in csp, path
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert resp.headers["Referrer-Policy"] == "same-origin"


async def test_invalid_names_are_404(relay: RelayServer, http: aiohttp.ClientSession) -> None:
    for path in ("/t/LAB/desk/", "/t/lab/desk_1/", "/t/lab/-x/websockify"):
        async with http.get(f"{relay.public_url}{path}") as resp:
            assert resp.status == 404, path


# Jinja2 syntax and markup: a name must come out as text, never as a tag or a template.
HOSTILE = '"><script>alert(1)</script>{{ 7*7 }}{% raw %}<img src=x onerror=alert(2)>'


def _no_markup_from(page: str) -> None:
    assert "<script>" not in page and "<img" not in page
    # {{ 7*7 }} is never evaluated; random tokens in the page (CSRF) may hold a "49" of their own.
    assert "49" not in re.sub(r"[A-Za-z0-9_-]{20,}", "", page)


async def test_hostile_names_are_escaped_in_every_page(make_relay: RelayFactory,
                                                       http: aiohttp.ClientSession) -> None:
    """Every page Jinja2 renders (list, viewer, login) with a hostile display name, user name
    and sign-in `next`: each comes out escaped, in text and in attributes, and reads back as
    itself (the desktop name comes from the VNC server to the page's script, which sets it
    with textContent: tests/e2e/test_viewer.py)."""
    routes = [Route("lab", "evil", "10.0.0.5", 5900, display_name=HOSTILE)]
    auth = AuthSettings(mode=AuthMode.PROXY, trusted_proxies=parse_networks(["127.0.0.0/8"], "t"))
    headers = {"X-Forwarded-User": HOSTILE, "X-Forwarded-Groups": HOSTILE}
    async with make_relay(routes=routes, auth=auth) as relay:
        async with http.get(f"{relay.public_url}/", headers=headers) as resp:
            listing = await resp.text()
        async with http.get(f"{relay.public_url}/t/lab/evil/", headers=headers) as resp:
            viewer = await resp.text()
    assert resp.status == 200
    for page in (listing, viewer):
        _no_markup_from(page)
        assert str(markupsafe.escape(HOSTILE)) in page
    assert f"Signed in as {markupsafe.escape(HOSTILE)}." in listing
    match = re.search(r'data-config="([^"]*)"', viewer)
    assert match is not None
    config = json.loads(html.unescape(match.group(1)))
    assert config["displayName"] == HOSTILE and config["user"] == HOSTILE

    token = AuthSettings(mode=AuthMode.TOKEN, users={}, session_secret=b"s" * 32)
    # `next` is checked (safe_next) before it is shown; the message is ours. Both are
    # rendered through the template's autoescape all the same.
    async with (make_relay(routes=routes, auth=token) as relay,
                http.get(f"{relay.public_url}/login", params={"next": HOSTILE}) as resp):
        login = await resp.text()
    assert resp.status == 200
    _no_markup_from(login)
    assert 'name="next" value="./"' in login


async def test_a_failed_sign_in_shows_the_user_name_back_escaped(
        make_relay: RelayFactory) -> None:
    token = AuthSettings(mode="token", users={}, session_secret=b"s" * 32)
    async with make_relay(routes=[], auth=token) as relay, aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:  # cookies of 127.0.0.1
        resp = await sign_in(http, relay, HOSTILE, "wrong password", next_path="t/lab/desk/")
        page = await resp.text()
    assert resp.status == 401
    _no_markup_from(page)
    assert f'value="{markupsafe.escape(HOSTILE)}"' in page  # kept for the next try, escaped
    assert '<strong id="target">lab/desk</strong>' in page
