"""Cross-site request forgery: the double-submit token of forms, the header of fetches."""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping

from aiohttp import web

from vncgate.relay.web.origin import origin_not_foreign

CSRF_COOKIE = "vncgate_csrf"


def csrf_token(request: web.Request) -> str:
    """The double-submit token of this browser: its cookie's value, or a new one."""
    return request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(24)


def set_csrf_cookie(response: web.StreamResponse, token: str, *, secure: bool = False) -> None:
    response.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="Strict", secure=secure)


def form_from_our_page(request: web.Request, form: Mapping[str, object]) -> bool:
    """A form post came from one of our pages: its hidden token matches the browser's cookie.

    A foreign site can make a browser post a form but can neither read nor set our cookie.
    """
    cookie = request.cookies.get(CSRF_COOKIE, "")
    given = str(form.get("csrf", ""))
    return bool(cookie) and hmac.compare_digest(cookie, given) and origin_not_foreign(request)


def script_from_our_page(request: web.Request) -> bool:
    """A fetch() from our viewer: a custom header, which a foreign page cannot send without a
    CORS preflight that this relay never answers."""
    return request.headers.get("X-Requested-With") == "vncgate" and origin_not_foreign(request)
