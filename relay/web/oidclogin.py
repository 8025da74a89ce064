"""Signing in at the OpenID provider (`--auth oidc`): the authorization code flow with PKCE.

`GET /login/oidc?next=...` sends the browser to the provider with a fresh state, nonce and PKCE
challenge; the three secrets stay in a short-lived signed cookie of this browser (SameSite=Lax,
so it comes back on the provider's top-level redirect, and only to this relay). `GET
/login/oidc/callback` takes the code only with the state of that cookie, redeems it with the
verifier and the client secret, checks the ID token (vncgate.relay.access.oidc, with the nonce),
and sets the session cookie as the users-file sign-in does, lasting no longer than the ID token;
or, when the provider issued a refresh token, for --session-ttl with the refresh token sealed in
it, renewed whenever the ID token's names expire (vncgate.relay.access.renewals).
"""

from __future__ import annotations

import hmac
import secrets
import time

from aiohttp import web

from vncgate.relay.access.cookies import (
    MAX_COOKIE,
    SESSION_COOKIE,
    renewable_session_cookie,
    seal,
    session_cookie,
    sign,
    unsign,
)
from vncgate.relay.access.identity import AuthMode
from vncgate.relay.access.oidc import (
    OidcClient,
    OidcError,
    OidcUnavailable,
    RefreshGrant,
    SignedInPerson,
    Tokens,
    pkce_pair,
)
from vncgate.relay.state import STATE, RelayState
from vncgate.relay.web.audit import audit_event
from vncgate.relay.web.browsercookies import cookie_name, delete_cookie, set_cookie
from vncgate.relay.web.loginpage import login_page, safe_next
from vncgate.relay.web.origin import check_host

FLOW_COOKIE = "vncgate_oidc"
# How long a browser may spend at the provider's login page.
FLOW_TTL = 600
CALLBACK_PATH = "/login/oidc/callback"


def _client(state: RelayState) -> OidcClient:
    if state.settings.auth.mode != AuthMode.OIDC or state.oidc is None:
        raise web.HTTPNotFound(text="this relay does not sign in with an OpenID provider\n")
    return state.oidc


def redirect_uri(state: RelayState) -> str:
    """Where the provider sends browsers back: register exactly this URI at the provider."""
    return state.settings.auth.public_url + CALLBACK_PATH


async def start(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    check_host(request)
    oidc = _client(state)
    next_path = safe_next(request.query.get("next", ""))
    try:
        meta = await oidc.metadata()
    except OidcUnavailable as exc:
        audit_event("login", request, state, result=f"provider unavailable: {exc}", kind="oidc")
        return login_page(request, "The sign-in provider cannot be reached; try again in a "
                                   "minute.", next_path, status=503,
                          headers={"Retry-After": "30"})
    flow_state, nonce = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    verifier, challenge = pkce_pair()
    flow = sign(state.session_key, {"typ": "oidc-flow", "st": flow_state, "n": nonce,
                                    "v": verifier, "next": next_path,
                                    "exp": int(time.time()) + FLOW_TTL})
    response = web.HTTPSeeOther(location=oidc.authorization_url(
        meta, redirect_uri(state), flow_state, nonce, challenge))
    set_cookie(response, request, state, FLOW_COOKIE, flow, max_age=FLOW_TTL, samesite="Lax")
    raise response


async def callback(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    check_host(request)
    oidc = _client(state)
    flow = unsign((state.session_key,), request.cookies.get(
        cookie_name(request, state, FLOW_COOKIE), ""))
    expires = flow.get("exp") if flow is not None else None
    if flow is None or flow.get("typ") != "oidc-flow" or not isinstance(expires, int) \
            or expires <= time.time():
        audit_event("login", request, state, result="refused: no sign-in under way",
                    kind="oidc")
        return _refused(request, state, "This sign-in was not started here or took too long; "
                                        "sign in again.", "./", 400)
    next_path = safe_next(str(flow.get("next", "")))
    given = request.query.get("state", "")
    if not hmac.compare_digest(given.encode(), str(flow.get("st", "")).encode()):
        audit_event("login", request, state, result="refused: state does not match",
                    kind="oidc")
        return _refused(request, state, "This sign-in answer is not for the sign-in this "
                                        "browser started; sign in again.", next_path, 400)
    if "error" in request.query:
        error = request.query.get("error", "")[:100]
        audit_event("login", request, state, result=f"provider said {error}", kind="oidc")
        return _refused(request, state, f"The provider did not sign you in ({error}).",
                        next_path, 401)
    try:
        tokens = await oidc.exchange(request.query.get("code", ""), str(flow.get("v", "")),
                                     redirect_uri(state))
        person = await oidc.person(tokens.id_token, nonce=str(flow.get("n", "")))
    except OidcUnavailable as exc:
        audit_event("login", request, state, result=f"provider unavailable: {exc}",
                    kind="oidc")
        return _refused(request, state, "The sign-in provider cannot be reached; try again "
                                        "in a minute.", next_path, 503)
    except OidcError as exc:
        audit_event("login", request, state, result=f"refused: {exc}", kind="oidc")
        return _refused(request, state, f"Sign-in refused: {exc}.", next_path, 403)
    ttl = state.settings.auth.session_ttl
    cookie, ends = _session_cookie(request, state, person, tokens, ttl)
    if len(cookie) > MAX_COOKIE:
        audit_event("login", request, state, user=person.user[:64],
                    result="refused: too many groups for a cookie", kind="oidc")
        return _refused(request, state, "Sign-in refused: the provider names too many groups "
                                        "for one browser cookie; set --oidc-groups-claim to "
                                        "a shorter list.", next_path, 403)
    audit_event("login", request, state, user=person.user, result="ok", kind="oidc")
    response = web.HTTPSeeOther(location=f"{state.settings.auth.public_url}/{next_path}"
                                if next_path != "./" else f"{state.settings.auth.public_url}/")
    max_age = max(1, ends - time.time())
    set_cookie(response, request, state, SESSION_COOKIE, cookie, max_age=max_age,
               samesite="Lax")
    delete_cookie(response, request, state, FLOW_COOKIE, samesite="Lax")
    raise response


def _session_cookie(request: web.Request, state: RelayState, person: SignedInPerson,
                    tokens: Tokens, ttl: float) -> tuple[str, float]:
    """The sign-in cookie and when it ends: with the ID token, or, renewable with the refresh
    token the provider issued, after --session-ttl."""
    now = time.time()
    plain = session_cookie(state.session_key, person.user, ttl, now=now, groups=person.groups,
                           expires=person.expires)
    if tokens.refresh_token is None:
        return plain, min(now + ttl, person.expires)
    ends = int(now + ttl)
    if ends <= person.expires:  # the ID token outlasts the sign-in: nothing to renew
        return plain, min(now + ttl, person.expires)
    sid = secrets.token_hex(8)
    grant = RefreshGrant(tokens.refresh_token, person.subject, person.nonce)
    cookie = renewable_session_cookie(state.session_key, person.user, person.groups, sid,
                                      person.expires, ends,
                                      seal(state.session_key, sid, grant.as_dict()))
    if len(cookie) > MAX_COOKIE and len(plain) <= MAX_COOKIE:
        # A long refresh token (Entra ID's run to kilobytes) with many groups: sign in
        # without renewal rather than not at all; the sign-in ends with its ID token.
        audit_event("login", request, state, user=person.user[:64],
                    result="refresh token too long for a cookie: not renewable", kind="oidc")
        return plain, min(now + ttl, person.expires)
    return cookie, ends


def _refused(request: web.Request, state: RelayState, message: str, next_path: str,
             status: int) -> web.Response:
    response = login_page(request, message, next_path, status=status)
    delete_cookie(response, request, state, FLOW_COOKIE, samesite="Lax")
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/login/oidc", start)
    app.router.add_get(CALLBACK_PATH, callback)
