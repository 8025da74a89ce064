"""Access control on the public port: who is asking, may they open this, and the pages for it.

`identify` resolves the request's identity for the configured `--auth` mode; `link_identity`
admits a share-link holder to one target. The login, logout and link-exchange handlers live
here too. Every sign-in, refusal and link use goes to the `vncgate.audit` log.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import json
import logging
import re
import secrets
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from vncgate.relay import closecodes, links
from vncgate.relay.auth import (
    ANONYMOUS,
    SESSION_COOKIE,
    DerivationsBusy,
    Identity,
    address_in,
    canonical_ip,
    check_login,
    find_bearer,
    read_session_cookie,
    session_cookie,
)
from vncgate.relay.state import STATE, RelayState

audit = logging.getLogger("vncgate.audit")

# A `next` after login: a relative path on this site (no scheme, no `//`, no backslash).
_SAFE_NEXT = re.compile(r"^(?!/)(?!.*//)[A-Za-z0-9._~/-]*$")
BEARER_CACHE_TTL = 60.0
CSRF_COOKIE = "vncgate_csrf"


def client_address(request: web.Request, state: RelayState) -> str:
    """The viewer's address: X-Forwarded-For's last untrusted hop when a trusted proxy sent it."""
    remote = request.remote or ""
    proxies = state.settings.auth.trusted_proxies
    forwarded = request.headers.get("X-Forwarded-For")
    if forwarded and address_in(remote, proxies):
        for hop in reversed([h.strip() for h in forwarded.split(",") if h.strip()]):
            if not address_in(hop, proxies):
                return hop
    return remote


def audit_event(event: str, request: web.Request, state: RelayState, **fields: Any) -> None:
    audit.info(event, extra={"fields": {"event": event,
                                        "client": client_address(request, state), **fields}})


def _secure(request: web.Request, state: RelayState) -> bool:
    proto = request.headers.get("X-Forwarded-Proto", "")
    behind_tls_proxy = proto == "https" and address_in(request.remote,
                                                       state.settings.auth.trusted_proxies)
    return request.secure or behind_tls_proxy or state.settings.auth.public_url.startswith(
        "https://")


def too_many(wait: float, what: str) -> web.HTTPTooManyRequests:
    seconds = int(wait) + 1
    return web.HTTPTooManyRequests(text=f"too many failed {what}; try again in {seconds} s\n",
                                   headers={"Retry-After": str(seconds)})


def busy() -> web.HTTPServiceUnavailable:
    return web.HTTPServiceUnavailable(text="too many sign-ins are being checked at once; "
                                           "try again in a second\n",
                                      headers={"Retry-After": "1"})


async def identify(request: web.Request) -> Identity | None:
    """The signed-in identity, ANONYMOUS with `--auth none`, or None when nobody is signed in.

    Raises HTTPTooManyRequests for a client over its limit of failed bearer tokens, and
    HTTPServiceUnavailable while the key derivations are saturated.
    """
    state = request.app[STATE]
    auth = state.settings.auth
    if auth.mode == "none":
        return ANONYMOUS
    if auth.mode == "proxy":
        return proxy_identity(request, state)
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token:
        return await _bearer_identity(request, state, token.strip())
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        claim = read_session_cookie(state.session_key, cookie)
        known = state.settings.auth.users.get(claim.user) if claim else None
        # A user removed from the file is signed out; so is a cookie signed out of.
        if claim is not None and known is not None and claim.sid not in state.revoked:
            return Identity(user=known.name, groups=known.groups, method="cookie",
                            expires=claim.expires, credential_id=claim.sid)
    return None


def proxy_identity(request: web.Request, state: RelayState) -> Identity | None:
    """The user and groups an auth proxy names, believed only from a --trusted-proxy."""
    auth = state.settings.auth
    if not address_in(request.remote, auth.trusted_proxies):
        return None  # headers from anyone else are ignored
    users = request.headers.getall(auth.user_header, [])
    group_headers = request.headers.getall(auth.groups_header, [])
    if len(users) > 1 or len(group_headers) > 1:
        # Two proxies (or a client and a proxy that appends) disagree: believe neither.
        audit_event("denied", request, state, result=f"duplicate {auth.user_header} or "
                                                     f"{auth.groups_header} header")
        raise web.HTTPBadRequest(text=f"the request carries {auth.user_header} or "
                                      f"{auth.groups_header} more than once; the auth proxy "
                                      "must replace these headers, not append to them\n")
    user = users[0].strip() if users else ""
    if not user:
        return None
    groups = [g.strip() for g in (group_headers[0] if group_headers else "").split(",")
              if g.strip()]
    if not auth.proxy_system_groups:
        groups = [g for g in groups if not g.startswith("system:")]
    user = auth.proxy_user_prefix + user
    if user.startswith("system:"):
        audit_event("denied", request, state, user=user[:64],
                    result="a system: user name from a header")
        return None
    return Identity(user=user, groups=tuple(auth.proxy_groups_prefix + g for g in groups),
                    method="proxy")


async def _bearer_identity(request: web.Request, state: RelayState, token: str
                           ) -> Identity | None:
    # Verifying against scrypt hashes is slow on purpose; remember good tokens for a minute.
    digest = hashlib.sha256(token.encode()).hexdigest()
    cached = state.bearer_cache.get(digest)
    now = time.monotonic()
    users = state.settings.auth.users
    if cached is not None and cached[1] > now and cached[0] in users:
        user = users[cached[0]]
        return Identity(user=user.name, groups=user.groups, method="token")
    client = client_address(request, state)
    wait = state.login_failures.retry_after(client)
    if wait > 0:
        audit_event("bearer", request, state, result="rate limited")
        raise too_many(wait, "sign-ins")
    try:
        found = await state.derivations.run(find_bearer, users, token)
    except DerivationsBusy:
        raise busy() from None
    if found is None:
        state.login_failures.failed(client)
        audit_event("bearer", request, state, result="failed")
        return None
    if len(state.bearer_cache) > 10_000:
        state.bearer_cache.clear()
    state.bearer_cache[digest] = (found.name, time.monotonic() + BEARER_CACHE_TTL)
    return Identity(user=found.name, groups=found.groups, method="token")


def link_identity(request: web.Request, target: str) -> Identity | None:
    """A share-link holder for `target`, from the cookie the link exchange set.

    The cookie is its own credential, signed with the session key at the exchange; a link
    token presented as the cookie is not one, so a single-use link cannot skip its exchange.
    """
    state = request.app[STATE]
    value = request.cookies.get(links.link_cookie(target))
    if not value or not state.settings.auth.link_keys:
        return None
    try:
        grant = links.verify_exchanged(state.session_key, value, target)
    except links.LinkError:
        return None
    return Identity(user=f"link:{grant.link_id}", method="link", link_target=target,
                    view_only=grant.view_only, expires=grant.expires)


def host_allowed(request: web.Request, state: RelayState) -> bool:
    """The Host header names this relay (DNS rebinding: a page on a name rebound to the relay's
    address reaches it with that name, and with a matching Origin).

    IP addresses always pass: a rebinding page has a name of its own, never an address.
    """
    names = state.host_names
    if names is None:
        return True
    host = request.headers.get("Host", "")
    if host.startswith("["):
        name = host[1:].partition("]")[0]
    else:
        name = host.rpartition(":")[0] if host.count(":") == 1 else host
    if canonical_ip(name) is not None:
        return True
    return name.lower().rstrip(".") in names


def check_host(request: web.Request) -> None:
    state = request.app[STATE]
    if not host_allowed(request, state):
        audit_event("denied", request, state, result="unknown Host",
                    host=request.headers.get("Host", "")[:100])
        raise web.HTTPMisdirectedRequest(
            text="this relay does not answer to that host name: open it by its own address, "
                 "or add the name with --allowed-host\n")


def request_scheme(request: web.Request, state: RelayState) -> str:
    """http or https, as the browser sees it (a trusted proxy's X-Forwarded-Proto counts)."""
    if request.secure:
        return "https"
    proto = request.headers.get("X-Forwarded-Proto", "").strip().lower()
    if proto in ("http", "https") and address_in(request.remote,
                                                 state.settings.auth.trusted_proxies):
        return proto
    return "http"


def origin_allowed(request: web.Request, allowed: tuple[str, ...]) -> bool:
    """A browser's request must come from this page's own origin or an allowed one.

    Requests without Origin come from non-browser clients, which could send any Origin they
    like; the check exists against cross-site requests (WebSocket hijacking, login CSRF), which
    need a browser, and browsers always send Origin on those.
    """
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    origin = origin.rstrip("/")
    if origin in allowed:
        return True
    state = request.app[STATE]
    public = state.settings.auth.public_url
    if public and origin.lower() == public_origin(public):
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    # The scheme counts too: an http:// page is not the https:// one (TLS stripped).
    scheme = request_scheme(request, state)
    if parts.scheme != scheme:
        return False
    default_port = {"http": ":80", "https": ":443"}[scheme]
    netloc = parts.netloc.lower().removesuffix(default_port)
    return netloc == request.host.lower().removesuffix(default_port)


def public_origin(url: str) -> str:
    """`https://vnc.example.com/prefix` -> `https://vnc.example.com`."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _origin_not_foreign(request: web.Request) -> bool:
    # With `Referrer-Policy: no-referrer` browsers send `Origin: null` on their own posts, so
    # "null" proves nothing either way; a real foreign origin is refused.
    if request.headers.get("Origin") == "null":
        return True
    return origin_allowed(request, request.app[STATE].settings.allowed_origins)


def csrf_token(request: web.Request) -> str:
    """The double-submit token of this browser: its cookie's value, or a new one."""
    return request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(24)


def set_csrf_cookie(response: web.StreamResponse, token: str) -> None:
    response.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="Strict")


def form_from_our_page(request: web.Request, form: Mapping[str, object]) -> bool:
    """A form post came from one of our pages: its hidden token matches the browser's cookie.

    A foreign site can make a browser post a form but can neither read nor set our cookie.
    """
    cookie = request.cookies.get(CSRF_COOKIE, "")
    given = str(form.get("csrf", ""))
    return bool(cookie) and hmac.compare_digest(cookie, given) and _origin_not_foreign(request)


def script_from_our_page(request: web.Request) -> bool:
    """A fetch() from our viewer: a custom header, which a foreign page cannot send without a
    CORS preflight that this relay never answers."""
    return request.headers.get("X-Requested-With") == "vncgate" and _origin_not_foreign(request)


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sign in · vncgate</title><link rel="stylesheet" href="static/novnc/viewer.css"></head>
<body class="list"><h1>Sign in</h1>
<p id="message" role="alert">{message}</p>
<form method="post" action="login" class="login">
<input type="hidden" name="next" value="{next}"><input type="hidden" name="csrf" value="{csrf}">
<p><label>User <input name="user" autocomplete="username" required autofocus></label></p>
<p><label>Password or token <input name="password" type="password"
 autocomplete="current-password" required></label></p>
<p><button type="submit">Sign in</button></p>
</form></body></html>
"""


def login_page(request: web.Request, message: str = "", next_path: str = "", status: int = 200,
               headers: dict[str, str] | None = None) -> web.Response:
    csrf = csrf_token(request)
    body = LOGIN_PAGE.format(message=html.escape(message), next=html.escape(next_path),
                             csrf=html.escape(csrf))
    response = web.Response(text=body, content_type="text/html", status=status, headers=headers)
    set_csrf_cookie(response, csrf)
    return response


def safe_next(value: str) -> str:
    return value if value and len(value) < 512 and _SAFE_NEXT.match(value) else "./"


async def login_form(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    check_host(request)
    if state.settings.auth.mode != "token":
        raise web.HTTPNotFound(text="sign-in is handled by the proxy in front of this relay\n")
    return login_page(request, next_path=safe_next(request.query.get("next", "")))


ACCOUNT_PREFIX = "user:"


async def login(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    check_host(request)
    if state.settings.auth.mode != "token":
        raise web.HTTPNotFound(text="sign-in is handled by the proxy in front of this relay\n")
    client = client_address(request, state)
    form = await read_form(request)
    if not form_from_our_page(request, form):
        audit_event("login", request, state, result="refused: not from our login page")
        raise web.HTTPForbidden(text="sign in from this relay's own login page\n")
    next_path = safe_next(str(form.get("next", "")))
    name, secret = str(form.get("user", "")), str(form.get("password", ""))
    # Per address, and per account whatever the address: a sign-in of one's own resets
    # neither, so guesses between one's own sign-ins count too.
    account = ACCOUNT_PREFIX + name[:256]
    wait = max(state.login_failures.retry_after(client),
               state.account_failures.retry_after(account))
    if wait > 0:
        audit_event("login", request, state, user=name[:64], result="rate limited")
        return login_page(request, f"Too many failed sign-ins; try again in {int(wait) + 1} s.",
                          next_path, status=429, headers={"Retry-After": str(int(wait) + 1)})
    try:
        user = await state.derivations.run(check_login, state.settings.auth.users, name, secret)
    except DerivationsBusy:
        raise busy() from None
    if user is None:
        state.login_failures.failed(client)
        state.account_failures.failed(account)
        audit_event("login", request, state, user=name[:64], result="failed")
        return login_page(request, "Wrong user or password.", next_path, status=401)
    audit_event("login", request, state, user=user.name, result="ok")
    response = web.HTTPSeeOther(location=next_path)
    # Path=/ covers every prefix an Ingress may put in front of the relay.
    response.set_cookie(SESSION_COOKIE, session_cookie(state.session_key, user.name,
                                                       state.settings.auth.session_ttl),
                        max_age=state.settings.auth.session_ttl, httponly=True, samesite="Lax",
                        secure=_secure(request, state))
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    check_host(request)
    if not form_from_our_page(request, await read_form(request)):
        raise web.HTTPForbidden(text="sign out from this relay's own pages\n")
    identity = await identify(request)
    if identity is not None and identity.credential_id and identity.expires is not None:
        # The cookie stops working here even if it is replayed, and its consoles close.
        state.revoked.revoke(identity.credential_id, identity.expires)
        state.end_sessions_of(identity.credential_id, closecodes.UNAUTHENTICATED,
                              "you signed out")
    audit_event("logout", request, state, user=identity.label if identity else "")
    response = web.HTTPSeeOther(location="./")
    response.del_cookie(SESSION_COOKIE)
    raise response


async def read_form(request: web.Request) -> Mapping[str, object]:
    """A form body, read within the HTTP read timeout (a body sent slowly holds an fd)."""
    try:
        async with asyncio.timeout(request.app[STATE].settings.http_read_timeout):
            return await request.post()
    except TimeoutError:
        raise web.HTTPRequestTimeout(text="the request body came too slowly\n") from None


async def read_json(request: web.Request) -> object:
    """A JSON body within the HTTP read timeout; bad JSON, bad UTF-8 or too deep -> 400."""
    try:
        async with asyncio.timeout(request.app[STATE].settings.http_read_timeout):
            raw = await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(text="the request body came too slowly\n") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise web.HTTPBadRequest(text=json.dumps({"error": f"the body is not valid JSON: "
                                                           f"{reason}"}),
                                 content_type="application/json") from None


async def exchange_link(request: web.Request) -> web.StreamResponse:
    """`POST /t/{ns}/{name}/link` with `{"token": ...}`: check a share link, set its cookie."""
    state = request.app[STATE]
    check_host(request)
    namespace, name = request.match_info["namespace"], request.match_info["name"]
    target = f"{namespace}/{name}"
    client = client_address(request, state)
    if not script_from_our_page(request):
        raise web.HTTPForbidden(text="open the link in the relay's own viewer\n")
    wait = state.login_failures.retry_after(client)
    if wait > 0:
        return web.json_response({"error": f"too many bad links; try again in {int(wait) + 1} s"},
                                 status=429, headers={"Retry-After": str(int(wait) + 1)})
    try:
        body = await read_json(request)
    except web.HTTPBadRequest:
        body = None
    try:
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str):
            raise links.LinkError("this link is not valid; ask for a new link")
        grant = links.verify(state.settings.auth.link_keys, token, target)
        if grant.once and not state.used_links.claim(grant):
            raise links.LinkError("this link was for one use only and has been used; "
                                  "ask for a new link")
    except links.LinkError as exc:
        state.login_failures.failed(client)
        reason = str(exc)
        audit_event("link use", request, state, target=target, result=f"refused: {reason}")
        return web.json_response({"error": reason}, status=403)
    audit_event("link use", request, state, target=target, link=grant.link_id, result="ok",
                view_only=grant.view_only)
    response = web.json_response({"target": target, "viewOnly": grant.view_only,
                                  "expires": grant.expires})
    # Not the token: a credential of its own, made for this exchange (see link_identity).
    response.set_cookie(links.link_cookie(target), links.exchanged(state.session_key, grant),
                        max_age=max(1, grant.expires - int(time.time())), httponly=True,
                        samesite="Strict", secure=_secure(request, state))
    return response
