"""The public port: the list of targets, the viewer, the WebSocket bridge, static files, health."""

from __future__ import annotations

import html
import json
import logging
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler

from relay import closecodes
from relay.bridge import Session
from relay.spec import SpecError, check_name, check_namespace
from relay.state import STATE, RelayState

log = logging.getLogger("vncgate.session")
STATIC = Path(__file__).parent / "static"
TEMPLATES = Path(__file__).parent / "templates"

# The viewer needs scripts and styles from 'self', WebSocket to 'self', and canvas images.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'self'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "SAMEORIGIN",
    "Cross-Origin-Opener-Policy": "same-origin",
}
_SLOT = re.compile(r"\{\{(\w+)\}\}")
# noVNC sends small messages; a WebSocket ping every 30 s finds browsers that vanished.
HEARTBEAT = 30.0


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
        response.headers.update(SECURITY_HEADERS)
        raise
    if not response.prepared:
        response.headers.update(SECURITY_HEADERS)
    return response


def render(template: str, **values: str) -> str:
    """Fill `{{name}}` slots in one pass, so a value can never be taken for another slot.

    The values are HTML already: every caller escapes what it puts in.
    """
    text = (TEMPLATES / template).read_text(encoding="utf-8")
    return _SLOT.sub(lambda m: values[m.group(1)], text)


def _target_key(request: web.Request) -> tuple[str, str]:
    try:
        return (check_namespace(request.match_info["namespace"], "namespace"),
                check_name(request.match_info["name"], "name"))
    except SpecError as exc:
        raise web.HTTPNotFound(text=f"no such target: {exc}") from None


def origin_allowed(request: web.Request, allowed: tuple[str, ...]) -> bool:
    """A browser's WebSocket must come from this page's own origin or an allowed one.

    Requests without Origin come from non-browser clients, which could send any Origin they
    like; the check exists against cross-site WebSocket hijacking, which needs a browser.
    """
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    origin = origin.rstrip("/")
    if origin in allowed:
        return True
    parts = urlsplit(origin)
    host = request.host
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    default_port = {"http": ":80", "https": ":443"}[parts.scheme]
    netloc = parts.netloc.lower().removesuffix(default_port)
    return netloc == host.lower().removesuffix(":80").removesuffix(":443")


async def websocket(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    namespace, name = _target_key(request)
    if not origin_allowed(request, state.settings.allowed_origins):
        log.warning("refused a WebSocket from a foreign origin",
                    extra={"fields": {"target": f"{namespace}/{name}",
                                      "origin": request.headers.get("Origin", ""),
                                      "client": request.remote or ""}})
        raise web.HTTPForbidden(text="Origin not allowed: open the viewer from this relay's own "
                                     "address, or add the origin with --allowed-origin\n")
    ws = web.WebSocketResponse(protocols=("binary",), compress=False, heartbeat=HEARTBEAT,
                               max_msg_size=state.settings.max_message_size, timeout=2.0)
    await ws.prepare(request)
    route = state.registry.get(namespace, name)
    client = request.remote or ""
    refusal = _refusal(state, f"{namespace}/{name}", route is None)
    if refusal is not None or route is None:
        code, reason = refusal or (closecodes.UNKNOWN_TARGET, "")
        started = time.monotonic()
        await ws.close(code=code, message=closecodes.clip_reason(reason).encode())
        known = route is not None
        _log_end(state, f"{namespace}/{name}", client, code, reason, started,
                 labels=(namespace, name) if known else ("", ""))
        return ws
    session = Session(route=route, ws=ws, client=client, settings=state.settings,
                      metrics=state.metrics)
    state.sessions.add(session)
    active = state.metrics.sessions_active.labels(namespace, name)
    active.inc()
    try:
        await session.run()
    finally:
        state.sessions.remove(session)
        active.dec()
        _log_end(state, route.key, client, session.code or closecodes.INTERNAL_ERROR,
                 session.reason, session.started, labels=(namespace, name),
                 to_server=session.to_server, to_client=session.to_client,
                 server_version=session.server_version)
    return ws


def _refusal(state: RelayState, key: str, unknown: bool) -> tuple[int, str] | None:
    settings = state.settings
    if state.shutting_down:
        return closecodes.GOING_AWAY, "the relay is shutting down; reconnect in a moment"
    if unknown:
        namespace = key.partition("/")[0]
        return (closecodes.UNKNOWN_TARGET,
                f"no console {key} here; list them with: kubectl get vnc -n {namespace}")
    if state.sessions.count >= settings.max_sessions:
        return (closecodes.OVER_CAPACITY,
                f"the relay is at its limit of {settings.max_sessions} sessions; try again later")
    if state.sessions.count_for(key) >= settings.max_sessions_per_target:
        return (closecodes.OVER_CAPACITY,
                f"{key} has its limit of {settings.max_sessions_per_target} viewers; try later")
    return None


def _log_end(state: RelayState, target: str, client: str, code: int, reason: str,
             started: float, labels: tuple[str, str], to_server: int = 0, to_client: int = 0,
             server_version: str = "") -> None:
    state.metrics.sessions_total.labels(*labels, str(code)).inc()
    log.info("session end", extra={"fields": {
        "target": target, "client": client, "code": code, "reason": reason,
        "bytes_to_server": to_server, "bytes_to_client": to_client,
        "duration_s": round(time.monotonic() - started, 3), "server_version": server_version}})


async def viewer(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    namespace, name = _target_key(request)
    route = state.registry.get(namespace, name)
    config = {"namespace": namespace, "name": name,
              "displayName": route.display_name if route else "",
              "viewOnly": route.view_only if route else False}
    title = (route.display_name if route and route.display_name else f"{namespace}/{name}")
    # The config goes into an HTML attribute, escaped; the page reads it with JSON.parse.
    page = render("viewer.html", title=html.escape(title),
                  config=html.escape(json.dumps(config), quote=True))
    return web.Response(text=page, content_type="text/html",
                        headers={"Cache-Control": "no-store"})


async def viewer_redirect(request: web.Request) -> web.StreamResponse:
    _target_key(request)
    # Relative, so it stays on this host and under whatever prefix the Ingress adds.
    raise web.HTTPFound(location=f"{request.match_info['name']}/")


async def index(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    rows = []
    for route in sorted(state.registry, key=lambda r: (r.namespace, r.name)):
        sessions = state.sessions.count_for(route.key)
        label = html.escape(route.display_name or route.name)
        rows.append(
            f'<tr><td><a href="t/{html.escape(route.namespace)}/{html.escape(route.name)}/">'
            f"{label}</a></td><td>{html.escape(route.namespace)}</td>"
            f"<td>{html.escape(route.name)}</td><td>{'view only' if route.view_only else ''}</td>"
            f"<td>{sessions}</td></tr>")
    body = "\n".join(rows) or '<tr><td colspan="5">No consoles are registered yet.</td></tr>'
    page = render("list.html", rows=body)
    return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-store"})


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


async def _on_shutdown(app: web.Application) -> None:
    state = app[STATE]
    state.shutting_down = True
    for session in state.sessions:
        session.stop(closecodes.GOING_AWAY, "the relay is shutting down; reconnect in a moment")


def make_public_app(state: RelayState) -> web.Application:
    app = web.Application(middlewares=[security_headers])
    app[STATE] = state
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/t/{namespace}/{name}", viewer_redirect)
    app.router.add_get("/t/{namespace}/{name}/", viewer)
    app.router.add_get("/t/{namespace}/{name}/websockify", websocket)
    app.router.add_static("/static/", STATIC, follow_symlinks=False, append_version=False)
    app.on_shutdown.append(_on_shutdown)
    return app
