"""Who is asking: the request's identity for the `--auth` mode, or a share link's."""

from __future__ import annotations

import logging
import time

from aiohttp import hdrs, web

from vncgate.relay.access import links
from vncgate.relay.access.cookies import (
    MAX_COOKIE,
    SESSION_COOKIE,
    SessionClaim,
    read_session_cookie,
    renewable_session_cookie,
    seal,
    unseal,
)
from vncgate.relay.access.identity import ANONYMOUS, AuthMode, Identity
from vncgate.relay.access.oidc import (
    OidcError,
    OidcRefused,
    OidcUnavailable,
    RefreshGrant,
    SignedInPerson,
    unverified_issuer,
)
from vncgate.relay.access.proxies import address_in
from vncgate.relay.access.tokenreview import TokenReviewUnavailable, looks_like_jwt
from vncgate.relay.access.users import find_bearer
from vncgate.relay.replicas import SharedStateUnavailable
from vncgate.relay.state import STATE, RelayState
from vncgate.relay.web.audit import audit_event, client_address
from vncgate.relay.web.browsercookies import cookie_name, set_cookie

log = logging.getLogger("vncgate.auth")
# Where a request keeps the cookie of a sign-in renewed while answering it (set_renewed_cookie).
RENEWED_COOKIE = web.RequestKey("vncgate.renewed_session", tuple[str, int])


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
    if auth.mode == AuthMode.NONE:
        return ANONYMOUS
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    bearer = token.strip() if scheme.lower() == "bearer" else ""
    if auth.mode == AuthMode.PROXY:
        # The proxy's headers first: a proxy may pass its own bearer token on as well.
        found = proxy_identity(request, state)
        if found is None and bearer and state.token_reviewer is not None:
            return await kubernetes_identity(request, state, bearer)
        return found
    if bearer:
        if state.oidc is not None and looks_like_jwt(bearer) and \
                unverified_issuer(bearer) == state.oidc.settings.issuer:
            return await oidc_identity(request, state, bearer)
        if state.token_reviewer is not None and looks_like_jwt(bearer):
            return await kubernetes_identity(request, state, bearer)
        return await _bearer_identity(request, state, bearer)
    cookie = request.cookies.get(cookie_name(request, state, SESSION_COOKIE))
    if cookie:
        claim = read_session_cookie(state.session_key, cookie)
        if claim is None or claim.sid in state.revoked:  # a cookie signed out of
            return None
        if claim.source == "oidc":
            # Names and groups the provider gave at sign-in; believed in oidc mode only.
            if auth.mode != AuthMode.OIDC:
                return None
            if claim.sealed:
                return await renewable_identity(request, state, claim)
            return Identity(user=claim.user, groups=claim.groups, method="cookie",
                            expires=claim.expires, credential_id=claim.sid)
        known = state.users.current.get(claim.user)
        # A user removed from the file is signed out.
        if known is not None:
            return Identity(user=known.name, groups=known.groups, method="cookie",
                            expires=claim.expires, credential_id=claim.sid,
                            account=known.name)
    return None


async def renewable_identity(request: web.Request, state: RelayState, claim: SessionClaim
                             ) -> Identity | None:
    """A sign-in that the provider's refresh token renews: its names while its ID token lasts,
    then the names of a renewed one (the response sets the renewed cookie). None when the
    provider refused to renew it (the sign-in is over, everywhere); HTTPServiceUnavailable
    while the provider cannot be asked."""
    assert claim.identity_expires is not None
    if not claim.needs_renewal:
        return Identity(user=claim.user, groups=claim.groups, method="cookie",
                        expires=claim.identity_expires, credential_id=claim.sid,
                        renewable_until=claim.expires, sealed=claim.sealed)
    try:
        person, grant = await renew_sign_in(request, state, claim.sid, claim.sealed,
                                            claim.expires)
    except OidcUnavailable as exc:
        raise web.HTTPServiceUnavailable(text=f"your sign-in needs renewing and the provider "
                                              f"cannot be asked: {exc}\n",
                                         headers={"Retry-After": "5"}) from None
    except OidcRefused:
        return None
    expires = min(person.expires, claim.expires)
    sealed = seal(state.session_key, claim.sid, grant.as_dict())
    cookie = renewable_session_cookie(state.session_key, person.user, person.groups, claim.sid,
                                      expires, claim.expires, sealed)
    if len(cookie) <= MAX_COOKIE:
        request[RENEWED_COOKIE] = (cookie, claim.expires)
    return Identity(user=person.user, groups=person.groups, method="cookie", expires=expires,
                    credential_id=claim.sid, renewable_until=claim.expires, sealed=sealed)


async def renew_sign_in(request: web.Request, state: RelayState, sid: str, sealed: str,
                        ends: float) -> tuple[SignedInPerson, RefreshGrant]:
    """Renew the OpenID sign-in `sid` with its sealed refresh grant. When the provider refuses
    (OidcRefused), the sign-in ends as a sign-out does: its cookie is refused and its consoles
    close (4401) on every replica. OidcUnavailable: the provider cannot be asked now."""
    assert state.renewals is not None
    opened = unseal(state.session_key, sid, sealed)
    grant = RefreshGrant.from_dict(opened) if opened is not None else None
    try:
        if grant is None:
            raise OidcRefused("the sign-in's refresh grant cannot be opened")
        return await state.renewals.renew(sid, grant, ends)
    except OidcRefused as exc:
        audit_event("renewal", request, state, result=f"refused: {exc}", kind="oidc")
        await state.end_sign_in(sid, ends, "the provider ended your sign-in; sign in again")
        raise
    except OidcUnavailable as exc:
        audit_event("renewal", request, state, result=f"provider unavailable: {exc}",
                    kind="oidc")
        raise


async def set_renewed_cookie(request: web.Request, response: web.StreamResponse) -> None:
    """On every response (a signal): the cookie of a sign-in renewed while answering, unless
    the response sets or deletes the sign-in cookie itself (sign-out)."""
    renewed = request.get(RENEWED_COOKIE)
    if renewed is None:
        return
    state = request.app[STATE]
    name = cookie_name(request, state, SESSION_COOKIE)
    if name in response.cookies or any(
            value.startswith(f"{name}=") for value in response.headers.getall(hdrs.SET_COOKIE, [])):
        return
    cookie, ends = renewed
    # Headers only: aiohttp has turned the response's cookies into headers by now.
    made = web.StreamResponse()
    set_cookie(made, request, state, SESSION_COOKIE, cookie,
               max_age=max(1, int(ends - time.time())), samesite="Lax")
    for morsel in made.cookies.values():
        response.headers.add(hdrs.SET_COOKIE, morsel.OutputString())


async def oidc_identity(request: web.Request, state: RelayState, token: str
                        ) -> Identity | None:
    """The person an ID token of the `--auth oidc` provider names, after the same checks as at
    sign-in (signature, issuer, audience, expiry; no nonce: the relay did not start this
    sign-in); None for a refused token, HTTPServiceUnavailable while the provider cannot be
    asked for its keys."""
    assert state.oidc is not None
    try:
        person = await state.oidc.person(token, bearer=True)
    except OidcUnavailable as exc:
        audit_event("bearer", request, state, result="provider unavailable", kind="oidc")
        raise web.HTTPServiceUnavailable(text=f"{exc}\n", headers={"Retry-After": "5"}) from None
    except OidcError as exc:
        await refuse_failure(request, state, "bearer", result=f"refused: {exc}", kind="oidc")
        return None
    return Identity(user=person.user, groups=person.groups, method="oidc",
                    expires=person.expires)


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


async def refuse_failure(request: web.Request, state: RelayState, event: str,
                         result: str = "failed", **fields: str) -> None:
    """Count a failed credential (a bearer token, a share link) of this client and, over its
    limit or the overall one, refuse it with 429 rather than 401.

    Only failures are refused: the credential was checked first, and a good one is never
    turned away because someone else (behind the same Ingress address, or anywhere) failed.
    These credentials are long random values, so answering the right one does not help a
    guesser; the limit slows and flags the failing source. The limits are the relay's, not a
    replica's: the failures of every ready replica count (relay/replicas.py), and while one
    cannot be asked the failure is refused with 503 (fail closed: a limit that a dead or
    partitioned replica could lift is no limit).
    """
    client = client_address(request, state)
    try:
        wait = await state.sign_in_limits.retry_after({"login": client, "bearer": ALL_BEARERS})
    except SharedStateUnavailable as exc:
        wait = None
        log.error("could not count failed credentials on every replica",
                  extra={"fields": {"error": str(exc)}})
    state.login_failures.failed(client)
    state.bearer_failures.failed(ALL_BEARERS)
    if wait is None:
        audit_event(event, request, state, result="refused: uncounted", **fields)
        raise web.HTTPServiceUnavailable(
            text="failed credentials cannot be counted right now; try again in a moment\n",
            headers={"Retry-After": "5"})
    if wait > 0:
        audit_event(event, request, state, result="rate limited", **fields)
        raise too_many(wait, "sign-ins")
    audit_event(event, request, state, result=result, **fields)


ALL_BEARERS = "*"


async def _bearer_identity(request: web.Request, state: RelayState, token: str
                           ) -> Identity | None:
    # Token entries of the users file only (never a password): one SHA-256, no derivation.
    found = find_bearer(state.users.current, token)
    if found is None:
        await refuse_failure(request, state, "bearer")
        return None
    return Identity(user=found.name, groups=found.groups, method="token", account=found.name)


async def kubernetes_identity(request: web.Request, state: RelayState, token: str
                              ) -> Identity | None:
    """The user and groups of a Kubernetes token (TokenReview), or None; an API error raises
    HTTPServiceUnavailable: nobody is let in while the API server cannot be asked."""
    reviewer = state.token_reviewer
    assert reviewer is not None
    try:
        found = await reviewer.review(token)
    except TokenReviewUnavailable as exc:
        audit_event("bearer", request, state, result="token review failed", kind="kubernetes")
        raise web.HTTPServiceUnavailable(text=f"{exc}\n", headers={"Retry-After": "5"}) from None
    if found is None:
        await refuse_failure(request, state, "bearer", kind="kubernetes")
        return None
    return found


def link_identity(request: web.Request, target: str) -> Identity | None:
    """A share-link holder for `target`, from the cookie the link exchange set.

    The cookie is its own credential, signed with the session key at the exchange; a link
    token presented as the cookie is not one, so a single-use link cannot skip its exchange.
    """
    state = request.app[STATE]
    value = request.cookies.get(cookie_name(request, state, links.link_cookie(target)))
    if not value or not state.settings.auth.link_keys:
        return None
    try:
        grant = links.verify_exchanged(state.session_key, value, target)
    except links.LinkError:
        return None
    return Identity(user=f"link:{grant.link_id}", method="link", link_target=target,
                    view_only=grant.view_only, expires=grant.expires)
