"""The public port: the list of targets, the viewer, the WebSocket bridge, static files, health."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from vncgate.common.model import Route
from vncgate.common.spec import SpecError, check_key
from vncgate.relay import closecodes
from vncgate.relay.access.cookies import seal
from vncgate.relay.access.identity import Identity
from vncgate.relay.access.oidc import LEEWAY as OIDC_LEEWAY
from vncgate.relay.access.oidc import OidcRefused, OidcUnavailable
from vncgate.relay.session.admission import Applicant
from vncgate.relay.session.bridge import Renew
from vncgate.relay.session.consoles import Holder
from vncgate.relay.session.health import PHASES
from vncgate.relay.session.thumbnails import NoThumbnail
from vncgate.relay.state import STATE, RelayState
from vncgate.relay.web.audit import audit_event, client_address
from vncgate.relay.web.consolelist import (
    PER_PAGE,
    ConsolePage,
    ListQuery,
    ListQueryError,
    build_page,
    viewers_by_target,
)
from vncgate.relay.web.control import add_routes as add_control_routes
from vncgate.relay.web.control import all_sessions
from vncgate.relay.web.csrf import csrf_for_page, set_csrf_cookie
from vncgate.relay.web.login import exchange_link, login, login_form, logout
from vncgate.relay.web.oidclogin import add_routes as add_oidc_routes
from vncgate.relay.web.origin import check_host, origin_allowed
from vncgate.relay.web.pages import render_page, setup_templates
from vncgate.relay.web.playback import add_routes as add_playback_routes
from vncgate.relay.web.requester import (
    identify,
    link_identity,
    renew_sign_in,
    set_renewed_cookie,
)
from vncgate.relay.web.tls import HSTS
from vncgate.relay.web.websocket import RelayWebSocket

log = logging.getLogger("vncgate.session")
STATIC = Path(__file__).parent.parent / "static"

# The viewer needs scripts and styles from 'self', WebSocket to 'self', and canvas images.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'self'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    # Our own form posts then carry our Origin (no-referrer made browsers send `Origin: null`,
    # which a foreign page can send too); other sites get no referrer at all.
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "SAMEORIGIN",
    "Cross-Origin-Opener-Policy": "same-origin",
}
LIST_CONCURRENCY = 20
# How often a console's replica asks a provider that could not be asked to renew its sign-in.
RENEWAL_RETRY = 5.0


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every response, errors included. A signal rather than a middleware: a middleware's
    frame would stay alive for the whole of every WebSocket session."""
    response.headers.update(SECURITY_HEADERS)
    oidc = request.app[STATE].oidc
    if oidc is not None:
        # Signing out is a form post that the relay answers with a redirect to the provider's
        # end-session page (RP-initiated logout); browsers hold redirects of a form to
        # form-action too.
        response.headers["Content-Security-Policy"] = CSP.replace(
            "form-action 'self'", f"form-action 'self' {' '.join(oidc.form_targets())}")
    if request.secure and request.transport is not None and \
            request.transport.get_extra_info("sslcontext") is not None:
        # This listener's own TLS (--tls-cert); behind an Ingress, HSTS is the Ingress's.
        response.headers["Strict-Transport-Security"] = HSTS


def _target_key(request: web.Request) -> tuple[str, str]:
    try:
        return check_key(request.match_info["namespace"], request.match_info["name"])
    except SpecError as exc:
        raise web.HTTPNotFound(text=f"no such target: {exc}") from None


async def websocket(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    namespace, name = _target_key(request)
    target = f"{namespace}/{name}"
    client = client_address(request, state)
    check_host(request)
    if not origin_allowed(request, state.settings.allowed_origins):
        audit_event("denied", request, state, target=target, result="foreign origin",
                    origin=request.headers.get("Origin", ""))
        raise web.HTTPForbidden(text="Origin not allowed: open the viewer from this relay's own "
                                     "address, or add the origin with --allowed-origin\n")
    ws = RelayWebSocket(protocols=("binary",), compress=False, heartbeat=state.settings.heartbeat,
                               max_msg_size=state.settings.max_message_size, timeout=2.0)
    await ws.prepare(request)
    refused: tuple[int, str] | None = None
    try:
        identity = link_identity(request, target) or await identify(request)
    except web.HTTPException as exc:  # too many failed tokens (429), busy (503), bad headers
        identity = None
        refused = (int(f"4{exc.status}"), exc.text.strip() if exc.text else exc.reason)

    async def decide(route: Route) -> Applicant | tuple[int, str]:
        assert identity is not None
        decision = await state.authorizer.decide(identity, route)
        if not decision.allowed:
            return (closecodes.UNAVAILABLE if decision.unavailable else closecodes.FORBIDDEN,
                    decision.reason)
        renew = _renewal(request, identity, namespace, name) if identity.sealed else None
        return Applicant(label=identity.label, user=identity.user, view_only=identity.view_only,
                         expires_at=identity.expires, credential_id=identity.credential_id,
                         account=identity.account, renew=renew,
                         **_expiry(identity))

    def audit_refusal(code: int, reason: str) -> None:
        if code in (closecodes.UNAUTHENTICATED, closecodes.FORBIDDEN):
            audit_event("denied", request, state, target=target, code=code, reason=reason,
                        user=identity.label if identity else "")

    def audit_takeover(claimant: Holder) -> None:
        audit_event("takeover", request, state, target=target, user=claimant.user)

    await state.admission.serve(
        request, ws, target=target, client=client, route=state.registry.get(namespace, name),
        decide=decide, refused=refused,
        signed_out=(closecodes.UNAUTHENTICATED, "sign in first") if identity is None else None,
        unknown=f"no console {target} here; list them with: kubectl get vnc -n {namespace}",
        user=identity.label if identity else "", on_refusal=audit_refusal,
        on_takeover=audit_takeover)
    return ws


def _renewal(request: web.Request, identity: Identity, namespace: str, name: str) -> Renew:
    """How a console opened with a renewable OpenID sign-in outlives its ID token: at its
    expiry this replica renews the sign-in (vncgate.relay.access.renewals) and asks again
    whether the renewed names may open the console (their groups may have changed)."""
    state = request.app[STATE]
    assert identity.renewable_until is not None
    ends = identity.renewable_until
    sealed = [identity.sealed]  # the newest grant: a provider may rotate refresh tokens

    expired = [identity.expires or 0.0]  # the current ID token's expiry

    async def sign_in_again(granted_until: float) -> Identity | tuple[int, str]:
        while True:
            try:
                person, grant = await renew_sign_in(request, state, identity.credential_id,
                                                    sealed[0], ends)
                break
            except OidcRefused:
                return (closecodes.UNAUTHENTICATED,
                        "the provider ended your sign-in; sign in again")
            except OidcUnavailable:
                # A provider that is briefly away does not close consoles: ask again for as
                # long as the expired ID token would still pass its checks (their leeway).
                left = granted_until - time.time()
                if left <= 0:
                    return (closecodes.UNAUTHENTICATED, "your sign-in expired and the "
                                                        "provider cannot be asked to renew it; "
                                                        "sign in again")
                await asyncio.sleep(min(RENEWAL_RETRY, left))
        expired[0] = min(person.expires, ends)
        sealed[0] = seal(state.session_key, identity.credential_id, grant.as_dict())
        return Identity(user=person.user, groups=person.groups, method="cookie",
                        expires=expired[0], credential_id=identity.credential_id,
                        renewable_until=ends, sealed=sealed[0])

    async def decide_again(renewed: Identity, granted_until: float) -> tuple[int, str] | None:
        """None: the renewed names may open the console. While the API server cannot be
        asked, the access granted before holds as long as the expired ID token would still
        pass its checks: ask again until then."""
        while True:
            route = state.registry.get(namespace, name)
            if route is None:
                return closecodes.FORBIDDEN, f"the console {namespace}/{name} was removed"
            decision = await state.authorizer.decide(renewed, route)
            left = granted_until - time.time()
            if not decision.unavailable or left <= 0:
                break
            await asyncio.sleep(min(RENEWAL_RETRY, left))
        if decision.unavailable:
            return closecodes.UNAVAILABLE, decision.reason
        if not decision.allowed:
            audit_event("denied", request, state, target=f"{namespace}/{name}",
                        code=closecodes.FORBIDDEN, reason=decision.reason, user=renewed.label)
            return closecodes.FORBIDDEN, decision.reason
        return None

    async def renew() -> float | tuple[int, str]:
        while True:
            if time.time() >= ends:
                return closecodes.UNAUTHENTICATED, "your sign-in expired; sign in again"
            granted_until = expired[0] + OIDC_LEEWAY
            renewed = await sign_in_again(granted_until)
            if isinstance(renewed, tuple):
                return renewed
            assert renewed.expires is not None
            came_valid = renewed.expires > time.time()
            refused = await decide_again(renewed, granted_until)
            if refused is not None:
                return refused
            if renewed.expires > time.time() or not came_valid:
                # Still valid; or it came expired (a provider's clock), and renewing again
                # would only bring another such token: the session ends (Session._renewing).
                return renewed.expires
            # It was valid when it came and expired while the API server was asked again
            # (decide_again waits out an API server that is away): renew once more.

    return renew


def _expiry(identity: Identity) -> dict[str, Any]:
    """How a session ends when its credential expires: the viewer shows the reason."""
    if identity.method == "link":
        return {"expiry_code": closecodes.FORBIDDEN,
                "expiry_reason": "the share link expired; ask for a new link"}
    if identity.method == "kubernetes":
        return {"expiry_code": closecodes.UNAUTHENTICATED,
                "expiry_reason": "your Kubernetes token expired; connect again with a new one"}
    return {"expiry_code": closecodes.UNAUTHENTICATED,
            "expiry_reason": "your sign-in expired; sign in again"}


async def viewer(request: web.Request) -> web.StreamResponse:
    """The viewer page, for anyone: it holds no secret, and the WebSocket checks access.

    It must load without a sign-in so that a share link (in the URL fragment, which only the
    page can read) can be exchanged; the display name is shown only to those who may open it.
    """
    state = request.app[STATE]
    namespace, name = _target_key(request)
    target = f"{namespace}/{name}"
    route = state.registry.get(namespace, name)
    check_host(request)
    identity = link_identity(request, target) or await identify(request)
    visible = route is not None and identity is not None and (
        await state.authorizer.decide(identity, route)).allowed
    policy = route.sessions if route else None
    config = {"namespace": namespace, "name": name,
              "displayName": route.display_name if route and visible else "",
              "viewOnly": bool(route and route.view_only),
              "exclusive": bool(policy and policy.exclusive),
              "takeover": policy.takeover if policy else "deny",
              "idleTimeout": policy.idle_timeout if policy else None,
              "auth": state.settings.auth.mode,
              "user": identity.label if identity and identity.user else "",
              "login": f"../../../login?next=t/{namespace}/{name}/"
                       if state.settings.auth.mode in ("token", "oidc") else ""}
    title = route.display_name if route and visible and route.display_name else target
    return render_page(request, "viewer.html", {"title": title, "config": json.dumps(config)})


class NotOpenable(Exception):
    """The requester may not open the URL's console: HTTP `status`, and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


async def openable_route(request: web.Request) -> Route:
    """The console of `/t/{ns}/{name}/...` if the requester (a share link's, or the signed-in
    one) may open it; NotOpenable (401 nobody signed in, 503 the API server could not be
    asked, 404 otherwise) if not."""
    state = request.app[STATE]
    namespace, name = _target_key(request)
    target = f"{namespace}/{name}"
    check_host(request)
    identity = link_identity(request, target) or await identify(request)
    if identity is None:
        raise NotOpenable(401, "sign in first")
    route = state.registry.get(namespace, name)
    decision = None if route is None else await state.authorizer.decide(identity, route)
    if decision is not None and decision.unavailable:
        raise NotOpenable(503, decision.reason)
    if route is None or decision is None or not decision.allowed:
        raise NotOpenable(404, f"no console {target} that you may open")
    return route


async def viewer_peers(request: web.Request) -> web.StreamResponse:
    """`GET /t/{ns}/{name}/viewers`: who is on this console and how (control or view), across
    replicas, for those who may open it; the viewer shows it."""
    state = request.app[STATE]
    try:
        route = await openable_route(request)
    except NotOpenable as exc:
        return web.json_response({"error": str(exc)}, status=exc.status)
    namespace, name, target = route.namespace, route.name, route.key
    sessions, _ = await all_sessions(state, namespace)
    viewers = viewers_by_target(s for s in sessions if s.get("name") == name)
    return web.json_response({"viewers": viewers.get(target, [])},
                             headers={"Cache-Control": "no-store"})


async def thumbnail(request: web.Request) -> web.StreamResponse:
    """`GET /t/{ns}/{name}/thumbnail`: a small JPEG of the console's screen (spec.thumbnail),
    for those who may open the console; 404 with the reason otherwise."""
    state = request.app[STATE]
    try:
        route = await openable_route(request)
    except NotOpenable as exc:
        error = {401: web.HTTPUnauthorized, 503: web.HTTPServiceUnavailable}.get(
            exc.status, web.HTTPNotFound)
        raise error(text=f"{exc}\n") from None
    target = route.key
    try:
        image = await state.thumbnails.get(route)
    except NoThumbnail as exc:
        raise web.HTTPNotFound(text=f"no thumbnail of {target}: {exc}\n") from None
    return web.Response(body=image.jpeg, content_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=30"})


async def viewer_redirect(request: web.Request) -> web.StreamResponse:
    check_host(request)
    _target_key(request)
    # Relative, so it stays on this host and under whatever prefix the Ingress adds.
    raise web.HTTPFound(location=f"{request.match_info['name']}/")


async def _console_page(request: web.Request, identity: Identity
                        ) -> tuple[ConsolePage, list[dict[str, Any]]]:
    """The page of consoles `identity` may open that the URL's query asks for, and the
    sessions on every replica (one fan-out per request)."""
    state = request.app[STATE]
    try:
        query = ListQuery.parse(request.query)
    except ListQueryError as exc:
        raise web.HTTPBadRequest(text=f"{exc}\n") from None
    allowed, unchecked = await _allowed_routes(state, identity, list(state.registry))
    sessions, _ = await all_sessions(state, None)
    return build_page(query, allowed, state.health, viewers_by_target(sessions),
                      unchecked), sessions


async def index(request: web.Request) -> web.StreamResponse:
    """The consoles this viewer may open, searched, filtered and paged by the URL's query;
    nobody signed in: the way to sign in."""
    state = request.app[STATE]
    check_host(request)
    identity = await identify(request)
    if identity is None:
        if state.settings.auth.mode in ("token", "oidc"):
            raise web.HTTPFound(location="login")
        raise web.HTTPUnauthorized(text="sign in through the proxy in front of this relay\n")
    listing, sessions = await _console_page(request, identity)
    # The session records and the End buttons only for the rows shown, and only where RBAC
    # lets this user see them: O(page) checks, not O(consoles).
    live, can_end = await _sessions_for_admins(state, identity,
                                               [row.route for row in listing.rows], sessions)
    for row in listing.rows:
        row.live = live.get(row.route.key) or None
        row.can_end = row.route.key in can_end
    csrf = csrf_for_page(request, identity)
    response = render_page(request, "list.html", {
        "listing": listing, "query": listing.query, "phases": PHASES,
        "per_page": PER_PAGE, "user": identity.user, "csrf": csrf.token,
        "signed_in_by_cookie": identity.method == "cookie"})
    set_csrf_cookie(response, request, csrf)
    return response


async def consoles_json(request: web.Request) -> web.StreamResponse:
    """`GET /api/v1/consoles?q=&namespace=&phase=&label=&page=&per=`: the list page's rows as
    JSON (the page refreshes its status from it; scripts may use it too)."""
    check_host(request)
    identity = await identify(request)
    if identity is None:
        return web.json_response({"error": "sign in first"}, status=401,
                                 headers={"Cache-Control": "no-store"})
    try:
        listing, _ = await _console_page(request, identity)
    except web.HTTPBadRequest as exc:
        return web.json_response({"error": (exc.text or "").strip()}, status=400)
    return web.json_response(listing.to_json(), headers={"Cache-Control": "no-store"})


async def _sessions_for_admins(state: RelayState, identity: Identity, routes: list[Route],
                               sessions: list[dict[str, Any]]
                               ) -> tuple[dict[str, list[dict[str, Any]]], set[str]]:
    """The sessions (on every replica) of the routes whose sessions `identity` may see (RBAC
    `sessions`), by target; and the targets among them whose sessions it may end
    (`disconnect`)."""
    may_see: list[Route] = []
    for start in range(0, len(routes), LIST_CONCURRENCY):
        batch = routes[start:start + LIST_CONCURRENCY]
        decisions = await asyncio.gather(*(state.authorizer.decide_action(
            identity, r.namespace, r.name, "sessions") for r in batch))
        may_see.extend(r for r, d in zip(batch, decisions, strict=True) if d.allowed)
    if not may_see:
        return {}, set()
    live: dict[str, list[dict[str, Any]]] = {route.key: [] for route in may_see}
    for item in sessions:
        key = f"{item.get('namespace')}/{item.get('name')}"
        if key in live:
            item["started"] = time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                            time.gmtime(float(item.get("since", 0))))
            live[key].append(item)
    busy = [route for route in may_see if live[route.key]]
    decisions = await asyncio.gather(*(state.authorizer.decide_action(
        identity, r.namespace, r.name, "disconnect") for r in busy))
    return live, {r.key for r, d in zip(busy, decisions, strict=True) if d.allowed}


async def _allowed_routes(state: RelayState, identity: Identity, routes: list[Route]
                          ) -> tuple[list[Route], int]:
    """The routes `identity` may open, and how many could not be checked. First one question
    per namespace (may they open all of it?), then one per console only in the namespaces
    where the answer was no; a few at a time, answers cached (with RBAC each question may be a
    SubjectAccessReview). Once a question goes unanswered (the API server is away or
    overloaded), the rest are not asked: they are left out and counted, and the page says so,
    rather than waiting a review's timeout for each batch of them."""
    namespaces = sorted({route.namespace for route in routes})
    whole: set[str] = set()
    for start in range(0, len(namespaces), LIST_CONCURRENCY):
        names = namespaces[start:start + LIST_CONCURRENCY]
        answers = await asyncio.gather(*(state.authorizer.may_open_all(identity, ns)
                                         for ns in names))
        whole.update(ns for ns, yes in zip(names, answers, strict=True) if yes)
    allowed: list[Route] = []
    rest: list[Route] = []
    decide_now = state.authorizer.decide_now
    for route in routes:
        if route.namespace in whole:
            allowed.append(route)
            continue
        known = decide_now(identity, route)  # in memory or cached: no task per console
        if known is None:
            rest.append(route)
        elif known.allowed:
            allowed.append(route)
    for start in range(0, len(rest), LIST_CONCURRENCY):
        batch = rest[start:start + LIST_CONCURRENCY]
        decisions = await asyncio.gather(*(state.authorizer.decide(identity, r) for r in batch))
        allowed.extend(r for r, d in zip(batch, decisions, strict=True) if d.allowed)
        unanswered = sum(1 for d in decisions if d.unavailable)
        if unanswered:
            return allowed, unanswered + len(rest) - start - len(batch)
    return allowed, 0


async def healthz(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if state.shutting_down:
        return web.json_response({"status": "shutting down"}, status=503)
    if state.settings.wait_for_sync and not state.registry.synced:
        return web.json_response({"status": "waiting for the operator's first full table"},
                                 status=503)
    return web.json_response({"status": "ready", "routes": len(state.registry)})


async def _on_cleanup(app: web.Application) -> None:
    app[STATE].derivations.close()
    await app[STATE].authorizer.close()
    reviewer = app[STATE].token_reviewer
    if reviewer is not None:
        await reviewer.close()
    await app[STATE].peers.close()
    # Every session has ended: write what the recording thread still holds.
    await asyncio.to_thread(app[STATE].recorder.writer.stop)


async def _on_shutdown(app: web.Application) -> None:
    state = app[STATE]
    state.shutting_down = True
    for session in state.sessions:
        session.stop(closecodes.GOING_AWAY, "the relay is shutting down; reconnect in a moment")


def make_public_app(state: RelayState) -> web.Application:
    app = web.Application()
    app.on_response_prepare.append(security_headers)
    app.on_response_prepare.append(set_renewed_cookie)
    app[STATE] = state
    setup_templates(app)
    app.router.add_get("/", index)
    app.router.add_get("/api/v1/consoles", consoles_json)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/t/{namespace}/{name}", viewer_redirect)
    app.router.add_get("/t/{namespace}/{name}/", viewer)
    app.router.add_get("/t/{namespace}/{name}/websockify", websocket)
    app.router.add_get("/t/{namespace}/{name}/viewers", viewer_peers)
    app.router.add_get("/t/{namespace}/{name}/thumbnail", thumbnail)
    app.router.add_static("/static/", STATIC, follow_symlinks=False, append_version=False)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    add_oidc_routes(app)
    app.router.add_post("/t/{namespace}/{name}/link", exchange_link)
    add_playback_routes(app)  # /recordings/ (relay/web/playback.py)
    add_control_routes(app)  # /api/v1/links, /api/v1/sessions, /sessions/end (relay/web/control.py)
    app.on_shutdown.append(_on_shutdown)
    app.on_cleanup.append(_on_cleanup)
    app.cleanup_ctx.append(state.recorder.retention)
    return app
