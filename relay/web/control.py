"""Administering consoles on the public port: share links, who is connected, ending sessions.

For `kubectl vnc` and scripts (JSON, with `Authorization: Bearer <token>`), and for the list page
(its "end session" form, CSRF-checked). Each action is an RBAC verb on `vnctargets`, decided by
a SubjectAccessReview with the caller's identity (relay/access/authz.py):

| route | verb |
|---|---|
| `POST /api/v1/links/{ns}/{name}` `{"ttl", "viewOnly", "once"}` | `share` |
| `GET /api/v1/sessions[?namespace=NS[&name=NAME]]` | `sessions` (per target) |
| `DELETE /api/v1/sessions/{ns}/{name}[?session=ID]` | `disconnect` |
| `POST /sessions/end` (form: namespace, name, session, csrf) | `disconnect` |
| `GET /api/v1/auth` | none: the tokens the relay takes (Kubernetes audiences, an OIDC issuer) |

Sessions are listed and ended on every replica: this one, and its peers over their internal port
(relay/session/peers.py). The viewer of an ended session is closed with 4409 and "ended by <user>".
A caller who may see the sessions of no target there is refused (403, naming the role to ask
for), not shown an empty list. The JSON API takes a bearer token (or a trusted proxy's
headers), never the sign-in cookie, so a foreign page cannot make a signed-in browser call it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from vncgate.common.model import Route
from vncgate.common.spec import SpecError, check_key, parse_duration
from vncgate.relay import closecodes
from vncgate.relay.access import links
from vncgate.relay.access.identity import Identity
from vncgate.relay.session.bridge import Session
from vncgate.relay.state import STATE, RelayState
from vncgate.relay.web.audit import audit_event
from vncgate.relay.web.bodies import read_form, read_json
from vncgate.relay.web.csrf import form_from_our_page
from vncgate.relay.web.origin import check_host, origin_not_foreign, request_scheme
from vncgate.relay.web.requester import identify

log = logging.getLogger("vncgate.control")
CHECK_CONCURRENCY = 20


_ERRORS: dict[int, type[web.HTTPException]] = {
    400: web.HTTPBadRequest, 401: web.HTTPUnauthorized, 403: web.HTTPForbidden,
    404: web.HTTPNotFound, 409: web.HTTPConflict, 503: web.HTTPServiceUnavailable}


def _error(status: int, message: str) -> web.HTTPException:
    return _ERRORS[status](text=json.dumps({"error": message}), content_type="application/json")


# -- this replica's sessions (also served to peers by relay/web/internal.py) -----------------

def describe(session: Session, replica: str) -> dict[str, Any]:
    return {"id": session.session_id, "namespace": session.route.namespace,
            "name": session.route.name, "user": session.user, "client": session.client,
            "since": int(session.started_at), "viewOnly": session.view_only,
            "replica": replica}


def local_sessions(state: RelayState, namespace: str | None = None) -> list[dict[str, Any]]:
    """This replica's sessions in the order they started (`since` is whole seconds: two
    sessions of one second keep their order through all_sessions' stable sort)."""
    return [describe(s, state.settings.identity)
            for s in sorted(state.sessions, key=lambda s: s.started_at)
            if namespace is None or s.route.namespace == namespace]


def end_local(state: RelayState, target: str, session_id: str | None, by: str) -> int:
    """End this replica's sessions of `target` (one of them with `session_id`); how many."""
    ended = 0
    for session in state.sessions.for_target(target):
        if session_id is None or session.session_id == session_id:
            session.stop(closecodes.CONFLICT, f"ended by {by}" if by else "ended by an admin")
            ended += 1
    return ended


async def all_sessions(state: RelayState, namespace: str | None
                       ) -> tuple[list[dict[str, Any]], list[str]]:
    """Sessions on every replica (each replica once), and the replicas that did not answer."""
    found = {state.settings.identity: local_sessions(state, namespace)}
    query = f"?namespace={namespace}" if namespace else ""
    answers, missing = await state.peers.ask("GET", f"/api/v1/sessions{query}")
    for answer in answers:
        body = answer.body if isinstance(answer.body, dict) else {}
        replica = str(body.get("replica", answer.url))
        items = body.get("sessions")
        if replica not in found and isinstance(items, list):
            found[replica] = [i for i in items if isinstance(i, dict) and isinstance(
                i.get("namespace"), str) and isinstance(i.get("name"), str)]
    merged = [item for items in found.values() for item in items]
    merged.sort(key=lambda i: (str(i.get("namespace")), str(i.get("name")), i.get("since", 0)))
    return merged, missing


async def end_everywhere(state: RelayState, target: str, session_id: str | None, by: str
                         ) -> tuple[int, list[str]]:
    ended = end_local(state, target, session_id, by)
    namespace, _, name = target.partition("/")
    answers, missing = await state.peers.ask("POST", "/api/v1/sessions/end", {
        "namespace": namespace, "name": name, "session": session_id, "by": by})
    for answer in answers:
        if isinstance(answer.body, dict) and isinstance(answer.body.get("ended"), int):
            ended += answer.body["ended"]
    return ended, missing


async def targets_allowed(state: RelayState, identity: Identity, verb: str,
                          targets: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
    """The targets (namespace, name) on which `identity` may `verb` (one check per target)."""
    ordered = sorted(set(targets))
    allowed: set[tuple[str, str]] = set()
    for start in range(0, len(ordered), CHECK_CONCURRENCY):
        batch = ordered[start:start + CHECK_CONCURRENCY]
        decisions = await asyncio.gather(*(
            state.authorizer.decide_action(identity, ns, name, verb) for ns, name in batch))
        allowed.update(t for t, d in zip(batch, decisions, strict=True) if d.allowed)
    return allowed


async def sessions_visible_to(state: RelayState, identity: Identity,
                              sessions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sessions of the targets whose sessions `identity` may see (one check per target)."""
    allowed = await targets_allowed(state, identity, "sessions",
                                    ((str(s["namespace"]), str(s["name"])) for s in sessions))
    return [s for s in sessions if (s["namespace"], s["name"]) in allowed]


# -- the JSON API ----------------------------------------------------------------------------------

async def _caller(request: web.Request) -> Identity:
    state = request.app[STATE]
    check_host(request)
    if not origin_not_foreign(request):
        raise _error(403, "foreign Origin: call this API from a script or kubectl vnc")
    identity = await identify(request)
    if identity is None or identity.method == "cookie":
        audiences = state.settings.auth.token_audiences
        minted = (f"minted for the audience {audiences[0]} (kubectl create token NAME "
                  f"--audience {audiences[0]})" if audiences else "(kubectl create token ...)")
        raise _error(401, f"send Authorization: Bearer <token> with a Kubernetes token {minted} "
                          "or a token of the relay's users file")
    audit_event("api", request, state, user=identity.label, path=request.path)
    return identity


async def token_audiences(request: web.Request) -> web.StreamResponse:
    """Which Kubernetes tokens this relay takes, asked by kubectl vnc before it picks one: a
    token minted for one of `audiences`, or (an empty list) a token for the API server itself,
    which is then sent only because the relay's operator chose to accept those."""
    state = request.app[STATE]
    check_host(request)
    body: dict[str, object] = {"kubernetesTokens": state.token_reviewer is not None,
                               "audiences": list(state.settings.auth.token_audiences)}
    if state.oidc is not None:
        # --auth oidc: the provider's ID tokens for these clients are taken as bearer tokens.
        oidc = state.oidc.settings
        body["oidc"] = {"issuer": oidc.issuer,
                        "audiences": [oidc.client_id, *oidc.bearer_audiences]}
    return web.json_response(body)


def _key(request: web.Request) -> tuple[str, str]:
    try:
        return check_key(request.match_info["namespace"], request.match_info["name"])
    except SpecError as exc:
        raise _error(400, str(exc)) from None


async def _allow(state: RelayState, identity: Identity, namespace: str, name: str,
                 verb: str) -> None:
    decision = await state.authorizer.decide_action(identity, namespace, name, verb)
    if not decision.allowed:
        raise _error(decision.status, decision.reason)


def _base_url(request: web.Request, state: RelayState) -> str:
    return state.settings.auth.public_url or f"{request_scheme(request, state)}://{request.host}"


async def mint_link(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    identity = await _caller(request)
    namespace, name = _key(request)
    await _allow(state, identity, namespace, name, "share")
    keys = state.settings.auth.link_keys
    if not keys:
        raise _error(409, "share links are off on this relay: start it with --link-key-file")
    route: Route | None = state.registry.get(namespace, name)
    if route is None:
        raise _error(404, f"{namespace}/{name} is not a target of this relay")
    body = await read_json(request) if request.can_read_body else {}
    if not isinstance(body, dict):
        raise _error(400, "the body must be a JSON object: {\"ttl\": \"30m\", ...}")
    try:
        ttl = parse_duration(str(body.get("ttl", "1h")), "ttl")
        view_only, once = body.get("viewOnly", False), body.get("once", False)
        if not isinstance(view_only, bool) or not isinstance(once, bool):
            raise SpecError("viewOnly/once", "must be true or false")
        token, grant = links.mint(keys[0], route.key, ttl, view_only, once)
    except (SpecError, ValueError) as exc:
        raise _error(400, str(exc)) from None
    audit_event("link mint", request, state, via="kubectl", user=identity.label,
                target=grant.target, link=grant.link_id, expires=grant.expires,
                view_only=view_only, once=once, key=links.key_id(keys[0]))
    url = f"{_base_url(request, state)}/t/{namespace}/{name}/#link={token}"
    return web.json_response({"target": grant.target, "expires": grant.expires,
                              "viewOnly": view_only, "once": once, "url": url})


async def list_sessions(request: web.Request) -> web.StreamResponse:
    """The sessions the caller may see (`?namespace=`, `&name=` narrow it). Nothing to show to
    someone without the right is a refusal that names the role, not an empty list: one target
    (`name`) is checked first; otherwise, when no session is visible, the namespace (or the
    cluster) is, and then, for a Role limited to some targets (resourceNames), the targets this
    relay serves there: an empty list only for a caller who may see the sessions of one."""
    state = request.app[STATE]
    identity = await _caller(request)
    namespace = request.query.get("namespace") or None
    name = request.query.get("name") or None
    if name is not None and namespace is None:
        raise _error(400, "name needs a namespace: ?namespace=NS&name=NAME")
    if namespace is not None:
        try:
            check_key(namespace, name or "x")
        except SpecError as exc:
            raise _error(400, str(exc)) from None
    if name is not None:
        assert namespace is not None
        await _allow(state, identity, namespace, name, "sessions")
    sessions, missing = await all_sessions(state, namespace)
    if name is not None:
        sessions = [s for s in sessions if s["name"] == name]
    visible = await sessions_visible_to(state, identity, sessions)
    if not visible and name is None:
        scope = await state.authorizer.decide_action(identity, namespace or "", "", "sessions")
        if not scope.allowed and not await targets_allowed(
                state, identity, "sessions", ((r.namespace, r.name) for r in state.registry
                                              if namespace is None or r.namespace == namespace)):
            raise _error(403, scope.reason)
    return web.json_response({"sessions": visible, "unreachable": missing})


async def end_sessions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    identity = await _caller(request)
    namespace, name = _key(request)
    await _allow(state, identity, namespace, name, "disconnect")
    session_id = request.query.get("session") or None
    ended, missing = await end_everywhere(state, f"{namespace}/{name}", session_id,
                                          identity.label)
    audit_event("session end", request, state, user=identity.label,
                target=f"{namespace}/{name}", session=session_id or "*", ended=ended)
    return web.json_response({"target": f"{namespace}/{name}", "ended": ended,
                              "unreachable": missing})


# -- the list page's "end session" button ----------------------------------------------------------

async def end_session_form(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    check_host(request)
    form = await read_form(request)
    identity = await identify(request)
    if identity is None:
        raise web.HTTPUnauthorized(text="sign in first\n")
    if not form_from_our_page(request, form, identity, state_changing=True):
        raise web.HTTPForbidden(text="end sessions from this relay's own list page\n")
    try:
        namespace, name = check_key(str(form.get("namespace", "")), str(form.get("name", "")))
    except SpecError as exc:
        raise web.HTTPBadRequest(text=f"{exc}\n") from None
    decision = await state.authorizer.decide_action(identity, namespace, name, "disconnect")
    if not decision.allowed:
        raise _ERRORS[decision.status](text=decision.reason + "\n")
    session_id = str(form.get("session", "")) or None
    ended, _ = await end_everywhere(state, f"{namespace}/{name}", session_id, identity.label)
    audit_event("session end", request, state, user=identity.label, via="list page",
                target=f"{namespace}/{name}", session=session_id or "*", ended=ended)
    raise web.HTTPSeeOther(location="../")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/links/{namespace}/{name}", mint_link)
    app.router.add_get("/api/v1/sessions", list_sessions)
    app.router.add_get("/api/v1/auth", token_audiences)
    app.router.add_delete("/api/v1/sessions/{namespace}/{name}", end_sessions)
    app.router.add_post("/sessions/end", end_session_form)
