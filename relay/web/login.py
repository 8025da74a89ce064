"""The sign-in pages and handlers: login, logout, and the share-link exchange."""

from __future__ import annotations

import logging
import time

from aiohttp import web

from vncgate.relay.access import links
from vncgate.relay.access.cookies import (
    DEVICE_COOKIE,
    DEVICE_TTL,
    SESSION_COOKIE,
    device_cookie,
    read_device_cookie,
    session_cookie,
)
from vncgate.relay.access.identity import AuthMode
from vncgate.relay.access.oidc import OidcUnavailable
from vncgate.relay.access.passwords import DerivationsBusy
from vncgate.relay.access.users import check_login
from vncgate.relay.replicas import SharedStateUnavailable
from vncgate.relay.state import STATE
from vncgate.relay.web.audit import audit_event, client_address
from vncgate.relay.web.bodies import read_form, read_json
from vncgate.relay.web.browsercookies import (
    cookie_name,
    delete_cookie,
    set_cookie,
)
from vncgate.relay.web.csrf import form_from_our_page, script_from_our_page
from vncgate.relay.web.loginpage import login_page, safe_next
from vncgate.relay.web.origin import check_host
from vncgate.relay.web.requester import busy, identify, refuse_failure

log = logging.getLogger("vncgate.login")


async def login_form(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    check_host(request)
    if state.settings.auth.mode not in (AuthMode.TOKEN, AuthMode.OIDC):
        raise web.HTTPNotFound(text="sign-in is handled by the proxy in front of this relay\n")
    return login_page(request, next_path=safe_next(request.query.get("next", "")))


ACCOUNT_PREFIX = "user:"


async def login(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    check_host(request)
    auth = state.settings.auth
    if auth.mode != AuthMode.TOKEN and not (auth.mode == AuthMode.OIDC and state.users.current):
        raise web.HTTPNotFound(text="sign in with the button of the sign-in page\n"
                               if auth.mode == AuthMode.OIDC else
                               "sign-in is handled by the proxy in front of this relay\n")
    client = client_address(request, state)
    form = await read_form(request)
    if not form_from_our_page(request, form, None):
        audit_event("login", request, state, result="refused: not from our login page")
        raise web.HTTPForbidden(text="sign in from this relay's own login page\n")
    next_path = safe_next(str(form.get("next", "")))
    name, secret = str(form.get("user", "")), str(form.get("password", ""))
    # Per address, and per account whatever the address: a sign-in of one's own resets
    # neither, so guesses between one's own sign-ins count too. A browser that signed in as
    # this user before (its device cookie) is counted on its own instead: guesses from
    # elsewhere, or from everyone behind the same Ingress address, never keep it out.
    account = ACCOUNT_PREFIX + name[:256]
    device = read_device_cookie(
        state.session_key, request.cookies.get(cookie_name(request, state, DEVICE_COOKIE), ""))
    known_device = DEVICE_PREFIX + device.device if device is not None and \
        device.user == name else None
    # Counted on every replica (relay/replicas.py): a replica that cannot be asked refuses.
    checks = {"device": known_device} if known_device is not None else {
        "login": client, "account": account}
    try:
        wait = await state.sign_in_limits.retry_after(checks)
    except SharedStateUnavailable as exc:
        log.error("could not count failed sign-ins on every replica",
                  extra={"fields": {"error": str(exc)}})
        audit_event("login", request, state, user=name[:64], result="refused: uncounted")
        return login_page(request, "Sign-in cannot be checked right now; try again in a "
                          "moment.", next_path, status=503, headers={"Retry-After": "5"},
                          user=name)
    if wait > 0:
        audit_event("login", request, state, user=name[:64], result="rate limited")
        return login_page(request, f"Too many failed sign-ins; try again in {int(wait) + 1} s.",
                          next_path, status=429, headers={"Retry-After": str(int(wait) + 1)},
                          user=name)
    try:
        user = await state.derivations.run(check_login, state.users.current, name, secret)
    except DerivationsBusy:
        raise busy() from None
    if user is None:
        state.login_failures.failed(client)
        state.account_failures.failed(account)
        if known_device is not None:
            state.device_failures.failed(known_device)
        audit_event("login", request, state, user=name[:64], result="failed")
        return login_page(request, "Wrong user or password.", next_path, status=401, user=name)
    audit_event("login", request, state, user=user.name, result="ok")
    response = web.HTTPSeeOther(location=next_path)
    set_cookie(response, request, state, SESSION_COOKIE,
               session_cookie(state.session_key, user.name, state.settings.auth.session_ttl),
               max_age=state.settings.auth.session_ttl, samesite="Lax")
    if known_device is None:
        set_cookie(response, request, state, DEVICE_COOKIE,
                   device_cookie(state.session_key, user.name), max_age=DEVICE_TTL)
    raise response


DEVICE_PREFIX = "device:"


async def logout(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    check_host(request)
    form = await read_form(request)
    identity = await identify(request)
    if not form_from_our_page(request, form, identity, state_changing=True):
        raise web.HTTPForbidden(text="sign out from this relay's own pages\n")
    ends = identity.credential_ends if identity is not None else None
    if identity is not None and identity.credential_id and ends is not None:
        await state.end_sign_in(identity.credential_id, ends, "you signed out")
    audit_event("logout", request, state, user=identity.label if identity else "")
    response = web.HTTPSeeOther(location=await provider_logout(request) or "./")
    delete_cookie(response, request, state, SESSION_COOKIE, samesite="Lax")
    raise response


async def provider_logout(request: web.Request) -> str | None:
    """In oidc mode, the provider's end-session URL (RP-initiated logout) that brings the
    browser back to the relay, if the provider offers one and can be asked."""
    state = request.app[STATE]
    if state.oidc is None:
        return None
    try:
        meta = await state.oidc.metadata()
    except OidcUnavailable:
        return None  # signed out here; the provider's session outlives an outage of it
    return state.oidc.logout_url(meta, f"{state.settings.auth.public_url}/")


async def exchange_link(request: web.Request) -> web.StreamResponse:
    """`POST /t/{ns}/{name}/link` with `{"token": ...}`: check a share link, set its cookie."""
    state = request.app[STATE]
    check_host(request)
    namespace, name = request.match_info["namespace"], request.match_info["name"]
    target = f"{namespace}/{name}"
    if not script_from_our_page(request):
        raise web.HTTPForbidden(text="open the link in the relay's own viewer\n")
    try:
        body = await read_json(request)
    except web.HTTPBadRequest:
        body = None
    try:
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str):
            raise links.LinkError("this link is not valid; ask for a new link")
        grant = links.verify(state.settings.auth.link_keys, token, target)
        if grant.once and not await state.link_claims.claim(grant):
            raise links.LinkError("this link was for one use only and has been used; "
                                  "ask for a new link")
    except SharedStateUnavailable as exc:
        # Whether the link was used cannot be known: refuse it (fail closed), uncounted.
        log.error("could not check a single-use link", extra={"fields": {"error": str(exc)}})
        audit_event("link use", request, state, target=target, result="refused: unchecked")
        return web.json_response(
            {"error": "this single-use link cannot be checked right now; try again in a "
                      "moment"}, status=503, headers={"Retry-After": "5"})
    except links.LinkError as exc:
        # A good link is never refused for others' failures; a bad one counts and, over the
        # limit, is a 429 (refuse_failure).
        reason = str(exc)
        try:
            await refuse_failure(request, state, "link use", result=f"refused: {reason}",
                                 target=target)
        except web.HTTPTooManyRequests as limited:
            retry = limited.headers["Retry-After"]
            return web.json_response({"error": f"too many bad links; try again in {retry} s"},
                                     status=429, headers={"Retry-After": retry})
        except web.HTTPServiceUnavailable as uncounted:
            return web.json_response(
                {"error": "this link cannot be checked right now; try again in a moment"},
                status=503, headers={"Retry-After": uncounted.headers["Retry-After"]})
        return web.json_response({"error": reason}, status=403)
    audit_event("link use", request, state, target=target, link=grant.link_id, result="ok",
                view_only=grant.view_only)
    response = web.json_response({"target": target, "viewOnly": grant.view_only,
                                  "expires": grant.expires})
    # Not the token: a credential of its own, made for this exchange (see link_identity).
    set_cookie(response, request, state, links.link_cookie(target),
               links.exchanged(state.session_key, grant),
               max_age=max(1, grant.expires - int(time.time())))
    return response
