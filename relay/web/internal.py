"""The internal port: the registration API (bearer token) and Prometheus metrics (or, with
--metrics-listen, the metrics on a port of their own).

Never behind the Ingress; in a cluster a NetworkPolicy lets only the operator (and the metrics
scraper) reach it. Every error is a JSON body `{"error": "..."}` that says what to fix.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vncgate.common.model import route_from_json, table_from_json
from vncgate.common.spec import SpecError, check_key, parse_duration
from vncgate.relay.access import links
from vncgate.relay.session.bridge import Session
from vncgate.relay.state import STATE, RelayState
from vncgate.relay.web.control import end_local, local_sessions

log = logging.getLogger("vncgate.api")
audit = logging.getLogger("vncgate.audit")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/api/"):
        token = request.app[STATE].settings.api_token
        if token is None:
            return _error(401, "the registration API is disabled: start the relay with "
                               "--api-token-file")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
            return _error(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return _error(500, "internal error in the relay; see its log")


async def _json_body(request: web.Request) -> Any:
    """The body as JSON; bad JSON, bad UTF-8 or nesting too deep for the parser -> 400."""
    try:
        async with asyncio.timeout(request.app[STATE].settings.http_read_timeout):
            raw = await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(text=json.dumps({"error": "the body came too slowly"}),
                                     content_type="application/json") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"the body is not valid JSON: {reason}"}),
            content_type="application/json") from None


def _path_key(request: web.Request) -> tuple[str, str]:
    try:
        return check_key(request.match_info["namespace"], request.match_info["name"])
    except SpecError as exc:
        raise web.HTTPBadRequest(text=json.dumps({"error": str(exc)}),
                                 content_type="application/json") from None


async def put_target(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    namespace, name = _path_key(request)
    body = await _json_body(request)
    if isinstance(body, dict):
        for field, expected in (("namespace", namespace), ("name", name)):
            if field in body and body[field] != expected:
                return _error(400, f"{field}: the body says {body[field]!r}, the path "
                                   f"{expected!r}; they must agree")
    try:
        route = route_from_json(body, namespace, name)
    except SpecError as exc:
        return _error(400, str(exc))
    changed = state.registry.put(route)
    if changed:
        log.info("route registered", extra={"fields": {"target": route.key,
                                                       "endpoint": route.address}})
    return web.json_response({"target": route.key, "changed": changed,
                              "revision": state.registry.revision, "boot": state.registry.boot})


async def delete_target(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    namespace, name = _path_key(request)
    deleted = state.registry.delete(namespace, name)
    if deleted:
        log.info("route removed", extra={"fields": {"target": f"{namespace}/{name}"}})
    return web.json_response({"target": f"{namespace}/{name}", "deleted": deleted,
                              "revision": state.registry.revision, "boot": state.registry.boot})


async def replace_targets(request: web.Request) -> web.StreamResponse:
    """Replace the table; with `If-Match: "<revision>"` only if the table is still at that
    revision (412 otherwise), so that a table computed from a stale view never lands."""
    state = request.app[STATE]
    try:
        routes = table_from_json(await _json_body(request))
    except SpecError as exc:
        return _error(400, str(exc))
    expected = request.headers.get("If-Match")
    if expected is not None and expected.strip().strip('"') != state.registry.revision:
        return web.json_response(
            {"error": f"the table changed (revision {state.registry.revision}, not "
                      f"{expected.strip()}): read it again and resend",
             "revision": state.registry.revision, "boot": state.registry.boot}, status=412)
    added, changed, removed = state.registry.replace(routes)
    if added or changed or removed:
        log.info("route table replaced", extra={"fields": {
            "routes": len(routes), "added": added, "changed": changed, "removed": removed}})
    return web.json_response({"revision": state.registry.revision, "routes": len(routes),
                              "added": added, "changed": changed, "removed": removed,
                              "boot": state.registry.boot})


async def list_targets(request: web.Request) -> web.StreamResponse:
    """The table; `?view=summary`: only its revision, who views what, and the last login per
    route that has credentials or TLS or a kubevirt endpoint (`logins`: result
    ok/refused/unreadable/forbidden/held, Unix time, reason).

    The operator's periodic resync reads the summary, O(open sessions) instead of O(routes):
    at 100,000 routes the full table is ~18 MB per replica per pass.
    """
    state = request.app[STATE]
    viewing = state.sessions.by_target()
    if request.query.get("view") == "summary":
        return web.json_response({
            "revision": state.registry.revision, "synced": state.registry.synced,
            "boot": state.registry.boot, "routes": len(state.registry),
            "sessions": {key: len(group) for key, group in viewing.items()},
            "viewers": {key: _viewers(group) for key, group in viewing.items()},
            "logins": {key: outcome.to_json()
                       for key, outcome in state.logins.outcomes.items()}})
    targets = []
    for route in state.registry:
        item = route.to_json()
        group = viewing.get(route.key, [])
        item["activeSessions"] = len(group)
        item["viewers"] = _viewers(group)
        targets.append(item)
    return web.json_response({"revision": state.registry.revision,
                              "synced": state.registry.synced, "boot": state.registry.boot,
                              "targets": targets})


def _viewers(sessions: list[Session]) -> list[str]:
    return sorted({session.user for session in sessions})


async def mint_link(request: web.Request) -> web.StreamResponse:
    """`POST /api/v1/links` `{"namespace", "name", "ttl": "10m", "viewOnly", "once"}`."""
    state = request.app[STATE]
    keys = state.settings.auth.link_keys
    if not keys:
        return _error(409, "share links are off: start the relay with --link-key-file")
    body = await _json_body(request)
    if not isinstance(body, dict):
        return _error(400, "the body must be a JSON object")
    try:
        namespace, name = check_key(body.get("namespace"), body.get("name"))
        ttl = parse_duration(str(body.get("ttl", "1h")), "ttl")
        view_only, once = body.get("viewOnly", False), body.get("once", False)
        if not isinstance(view_only, bool) or not isinstance(once, bool):
            raise SpecError("viewOnly/once", "must be true or false")
        token, grant = links.mint(keys[0], f"{namespace}/{name}", ttl, view_only, once)
    except (SpecError, ValueError) as exc:
        return _error(400, str(exc))
    audit.info("link mint", extra={"fields": {
        "event": "link mint", "via": "api", "target": grant.target, "link": grant.link_id,
        "expires": grant.expires, "view_only": view_only, "once": once,
        "key": links.key_id(keys[0])}})
    path = f"/t/{namespace}/{name}/#link={token}"
    base = state.settings.auth.public_url
    return web.json_response({"target": grant.target, "expires": grant.expires,
                              "path": path, "url": f"{base}{path}" if base else None,
                              "token": token})


async def replica_sessions(request: web.Request) -> web.StreamResponse:
    """This replica's sessions (`?namespace=`), for the replica that answers kubectl vnc."""
    state = request.app[STATE]
    return web.json_response({"replica": state.settings.identity, "sessions": local_sessions(
        state, request.query.get("namespace") or None)})


async def end_replica_sessions(request: web.Request) -> web.StreamResponse:
    """`POST /api/v1/sessions/end` `{"namespace", "name", "session": id|null, "by": user}`: the
    replica that checked the caller's RBAC ends a target's sessions here too."""
    state = request.app[STATE]
    body = await _json_body(request)
    if not isinstance(body, dict):
        return _error(400, "the body must be a JSON object")
    try:
        namespace, name = check_key(body.get("namespace"), body.get("name"))
    except SpecError as exc:
        return _error(400, str(exc))
    session, by = body.get("session"), body.get("by", "")
    if not (session is None or isinstance(session, str)) or not isinstance(by, str):
        return _error(400, "session: a session id or null; by: who ends it")
    ended = end_local(state, f"{namespace}/{name}", session, by[:200])
    return web.json_response({"replica": state.settings.identity, "ended": ended})


async def target_viewers(request: web.Request) -> web.StreamResponse:
    """`GET /api/v1/viewers/{namespace}/{name}`: this replica's sessions of one target, for a
    peer that counts them all (maxViewers, interactive: first)."""
    state = request.app[STATE]
    namespace, name = _path_key(request)
    return web.json_response({"replica": state.settings.identity,
                              "sessions": state.sessions.count_for(f"{namespace}/{name}")})


async def failure_ages(request: web.Request) -> web.StreamResponse:
    """`POST /api/v1/failures` `{"checks": {"login"|"account"|"device"|"bearer": key}}`: the
    ages of this replica's failures of each key (sign-ins; bearer tokens and share links), for
    the peer that checks a sign-in or counts a failed credential."""
    state = request.app[STATE]
    body = await _json_body(request)
    checks = body.get("checks") if isinstance(body, dict) else None
    limiters = state.sign_in_limits.limiters
    if not isinstance(checks, dict) or not checks or not all(
            name in limiters and isinstance(key, str) and len(key) <= 1024
            for name, key in checks.items()):
        return _error(400, "checks: an object of " + ", ".join(sorted(limiters))
                      + " to a key (a string)")
    return web.json_response({"replica": state.settings.identity,
                              "ages": state.sign_in_limits.local_ages(checks)})


async def learn_revocation(request: web.Request) -> web.StreamResponse:
    """`POST /api/v1/revocations` `{"key", "expires"}`: a peer's sign-out, refused here too
    (its consoles here close with 4401) until it would have expired."""
    state = request.app[STATE]
    body = await _json_body(request)
    key = body.get("key") if isinstance(body, dict) else None
    expires = body.get("expires") if isinstance(body, dict) else None
    if not isinstance(key, str) or not re.fullmatch(r"[0-9a-f]{40}", key) or \
            not isinstance(expires, int) or isinstance(expires, bool):
        return _error(400, "key: 40 lower-case hex digits; expires: Unix seconds")
    state.revocations.learn(key, float(expires))
    return web.json_response({"replica": state.settings.identity, "revoked": True})


async def metrics(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.metrics.routes.set(len(state.registry))
    return web.Response(body=generate_latest(state.metrics.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_internal_app(state: RelayState) -> web.Application:
    app = web.Application(middlewares=[require_token],
                          client_max_size=64 * 1024 * 1024)  # a full table of 100,000 routes
    app[STATE] = state
    app.router.add_put("/api/v1/targets/{namespace}/{name}", put_target)
    app.router.add_delete("/api/v1/targets/{namespace}/{name}", delete_target)
    app.router.add_put("/api/v1/targets", replace_targets)
    app.router.add_get("/api/v1/targets", list_targets)
    app.router.add_post("/api/v1/links", mint_link)
    app.router.add_get("/api/v1/sessions", replica_sessions)
    app.router.add_post("/api/v1/sessions/end", end_replica_sessions)
    app.router.add_post("/api/v1/revocations", learn_revocation)
    app.router.add_get("/api/v1/viewers/{namespace}/{name}", target_viewers)
    app.router.add_post("/api/v1/failures", failure_ages)
    if state.settings.metrics_listen is None:
        app.router.add_get("/metrics", metrics)
    return app


def make_metrics_app(state: RelayState) -> web.Application:
    """/metrics alone, for --metrics-listen: a scraper admitted to this port reaches nothing
    else (the registration API stays on the internal port)."""
    app = web.Application()
    app[STATE] = state
    app.router.add_get("/metrics", metrics)
    return app
