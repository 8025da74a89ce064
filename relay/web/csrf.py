"""Cross-site request forgery: the token of forms, bound to the sign-in; the header of fetches.

A form's token is an HMAC, with the relay's session key, of what the browser holds and a
sibling host cannot choose: the signed-in cookie's id for a signed-in form (sign-out, End
session), else a random value the relay signed into the `vncgate_csrf` cookie (the sign-in
page), with the user's name when a proxy names one. The relay never adopts a cookie value it
did not sign, so a page on `evil.example.test` that plants `vncgate_csrf=<known>;
Domain=example.test` knows no token; under https the cookies are `__Host-` names, which no
other host can set at all.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from vncgate.relay.access.cookies import sign, unsign
from vncgate.relay.access.identity import Identity
from vncgate.relay.access.passwords import b64
from vncgate.relay.state import STATE
from vncgate.relay.web.browsercookies import cookie_name, set_cookie
from vncgate.relay.web.origin import origin_not_foreign

CSRF_COOKIE = "vncgate_csrf"


@dataclass(frozen=True, slots=True)
class CsrfGrant:
    token: str  # for the page's hidden field
    cookie: str | None  # a new signed cookie to set, or None when the browser has one


def _signed_nonce(request: web.Request) -> str | None:
    state = request.app[STATE]
    value = request.cookies.get(cookie_name(request, state, CSRF_COOKIE), "")
    payload = unsign((state.session_key,), value) if value else None
    nonce = payload.get("n") if payload is not None and payload.get("typ") == "csrf" else None
    return nonce if isinstance(nonce, str) else None


def _token(request: web.Request, identity: Identity | None, nonce: str | None) -> str | None:
    if identity is not None and identity.method == "cookie" and identity.credential_id:
        binding = f"session\0{identity.credential_id}"
    elif nonce is not None:
        binding = f"browser\0{nonce}\0{identity.user if identity is not None else ''}"
    else:
        return None
    key = request.app[STATE].session_key
    return b64(hmac.new(key, f"csrf\0{binding}".encode(), hashlib.sha256).digest())


def csrf_for_page(request: web.Request, identity: Identity | None) -> CsrfGrant:
    """The token for a page's forms, posted by `identity` (None on the sign-in page)."""
    nonce = _signed_nonce(request)
    cookie = None
    if nonce is None:
        nonce = secrets.token_urlsafe(18)
        cookie = sign(request.app[STATE].session_key, {"typ": "csrf", "n": nonce})
    token = _token(request, identity, nonce)
    assert token is not None
    return CsrfGrant(token=token, cookie=cookie)


def set_csrf_cookie(response: web.StreamResponse, request: web.Request, grant: CsrfGrant) -> None:
    if grant.cookie is not None:
        set_cookie(response, request, request.app[STATE], CSRF_COOKIE, grant.cookie)


def form_from_our_page(request: web.Request, form: Mapping[str, object],
                       identity: Identity | None, *, state_changing: bool = False) -> bool:
    """A form post came from one of our pages: its hidden token is the one made for this
    browser and this sign-in. A foreign site can make a browser post a form, but cannot read
    our pages, and the token hangs on values it can neither read nor choose.

    `state_changing` (sign-out, End session) also refuses `Origin: null`: our pages are served
    with `Referrer-Policy: same-origin`, so the browser names our origin on their posts, and a
    page that hides its origin is not ours.
    """
    expected = _token(request, identity, _signed_nonce(request))
    given = str(form.get("csrf", ""))
    if expected is None or not hmac.compare_digest(expected.encode(), given.encode()):
        return False
    if state_changing and request.headers.get("Origin") == "null":
        return False
    return origin_not_foreign(request)


def script_from_our_page(request: web.Request) -> bool:
    """A fetch() from our viewer: a custom header, which a foreign page cannot send without a
    CORS preflight that this relay never answers."""
    return request.headers.get("X-Requested-With") == "vncgate" and origin_not_foreign(request)
