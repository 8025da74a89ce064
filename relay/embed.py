"""vncgate's WebSocket-to-VNC bridge for someone else's aiohttp application.

The stable, public surface is `__all__` below (docs/EMBEDDING.md); every other module of
`vncgate.relay` is internal and may change in any release. A test
(tests/relay/test_embed.py) holds these names and signatures still.

    bridge = Bridge(lookup=my_lookup, authorize=my_authorize)
    app.router.add_get("/vnc/{name}", bridge.handle)
    bridge.attach(app)  # closes the sessions when the app shuts down

`lookup(request)` names the VNC server (a `Route`) or None (4404); `authorize(request, route)`
returns a `Viewer` (who, and whether only to watch) or a `Denied` (4401 or 4403, with the
reason the user sees). Both are the application's; everything between them and the VNC server
is the same bridge as the relay's: the Origin check, the RFB greeting check, back-pressure both
ways, bounded memory, close codes with reasons, the view-only filter, the session policy of the
route (viewers, exclusive consoles with takeover, idle timeout, longest duration) and Prometheus
metrics.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry

from vncgate.common.model import Route
from vncgate.common.spec import SessionPolicy
from vncgate.relay import closecodes
from vncgate.relay.access.proxies import parse_networks
from vncgate.relay.metrics import RelayMetrics
from vncgate.relay.session.bridge import Session, Sessions
from vncgate.relay.session.consoles import Holder, LocalConsoles
from vncgate.relay.settings import RelaySettings
from vncgate.relay.web.origin import same_origin
from vncgate.relay.web.websocket import RelayWebSocket

__all__ = ["Authorize", "Bridge", "BridgeSettings", "Denied", "Lookup", "Route",
           "SessionPolicy", "Viewer"]

log = logging.getLogger("vncgate.session")
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who opens the console, as the application's `authorize` says; `view_only`: they may
    only watch (the bridge drops their keys and pointer, whatever their client sends)."""

    user: str
    view_only: bool = False


@dataclass(frozen=True, slots=True)
class Denied:
    """`authorize`'s refusal. The viewer sees `reason`; the close code is 4401 when
    `signed_in` is False (ask them to sign in), else 4403."""

    reason: str
    signed_in: bool = True


Lookup = Callable[[web.Request], Awaitable[Route | None] | Route | None]
Authorize = Callable[[web.Request, Route], Awaitable[Viewer | Denied] | Viewer | Denied]


@dataclass(frozen=True, slots=True)
class BridgeSettings:
    """Limits and timeouts; the defaults are the relay's."""

    connect_timeout: float = 5.0  # to connect and read the RFB greeting (else 4504)
    stall_timeout: float = 60.0  # a side that accepts no bytes this long ends the session
    heartbeat: float = 30.0  # seconds between pings to a quiet browser
    max_message_size: int = 4 * 1024 * 1024  # bytes of one message from the browser
    max_sessions: int = 10_000  # of this bridge, all targets
    max_sessions_per_target: int = 100
    # Browser origins allowed besides the page's own (scheme://host[:port]).
    allowed_origins: tuple[str, ...] = ()
    # CIDRs never dialled, checked after DNS resolution; 0.0.0.0/8 and :: never are.
    deny_cidrs: tuple[str, ...] = ()
    # For `/metrics` of the application: None, a registry of the bridge's own.
    metrics_registry: CollectorRegistry | None = field(default=None, compare=False)


async def _maybe_await(value: Awaitable[_T] | _T) -> _T:
    if inspect.isawaitable(value):
        return await value
    return value


class Bridge:
    """The WebSocket-to-VNC bridge as an aiohttp handler: `handle` is a GET route's handler."""

    def __init__(self, lookup: Lookup, authorize: Authorize,
                 settings: BridgeSettings | None = None) -> None:
        self.settings = settings or BridgeSettings()
        self._lookup = lookup
        self._authorize = authorize
        self._relay_settings = RelaySettings(
            connect_timeout=self.settings.connect_timeout,
            stall_timeout=self.settings.stall_timeout,
            heartbeat=self.settings.heartbeat,
            max_message_size=self.settings.max_message_size,
            deny_networks=parse_networks(self.settings.deny_cidrs, "deny_cidrs"))
        self.metrics = RelayMetrics.create(self.settings.metrics_registry)
        self._sessions = Sessions()
        self._consoles = LocalConsoles()
        self._consoles_started = False
        self._closing = False

    @property
    def registry(self) -> CollectorRegistry:
        """The Prometheus registry of the bridge's metrics (`vncgate_*`)."""
        return self.metrics.registry

    @property
    def session_count(self) -> int:
        return self._sessions.count

    def attach(self, app: web.Application) -> None:
        """Close this bridge's sessions (1001, with a reason) when `app` shuts down."""
        app.on_shutdown.append(self._shutdown)

    async def _shutdown(self, app: web.Application) -> None:
        self.close()

    def close(self) -> None:
        """End every session (1001) and refuse new ones."""
        self._closing = True
        for session in self._sessions:
            session.stop(closecodes.GOING_AWAY, "the server is shutting down; reconnect later")

    def _taken(self, target: str, session_id: str, taker: Holder) -> None:
        session = self._sessions.find(target, session_id)
        if session is not None:
            session.stop(closecodes.CONFLICT,
                         f"taken over by {taker.user or taker.client or 'another viewer'}")

    def _origin_allowed(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:  # not a browser: the check is against cross-site pages
            return True
        if origin.rstrip("/") in self.settings.allowed_origins:
            return True
        return same_origin(origin, request.host, "https" if request.secure else "http")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Accept the WebSocket (subprotocol `binary`) and bridge it to the route's server."""
        if not self._origin_allowed(request):
            raise web.HTTPForbidden(text="Origin not allowed: open the viewer from this site\n")
        settings = self.settings
        ws = RelayWebSocket(protocols=("binary",), compress=False, heartbeat=settings.heartbeat,
                            max_msg_size=settings.max_message_size, timeout=2.0)
        await ws.prepare(request)
        started = time.monotonic()
        client = request.remote or ""
        route: Route | None = None
        viewer: Viewer | Denied | None = None
        try:
            route = await _maybe_await(self._lookup(request))
            if route is not None and not self._closing:
                viewer = await _maybe_await(self._authorize(request, route))
        except Exception:  # the application's callback failed: refuse, say where to look
            log.exception("lookup or authorize failed for %s", request.path)
            route, viewer = None, None
            refusal: tuple[int, str] | None = (
                closecodes.INTERNAL_ERROR, "internal error in the server; see its log")
        else:
            refusal = self._refusal(route, viewer)
        if refusal is not None or route is None or not isinstance(viewer, Viewer):
            code, reason = refusal or (closecodes.INTERNAL_ERROR, "")
            await ws.close(code=code, message=closecodes.clip_reason(reason).encode())
            labels = (route.namespace, route.name) if route is not None else ("", "")
            self._log_end(labels, client, viewer, code, reason, started)
            return ws
        policy = route.sessions
        view_only = route.view_only or viewer.view_only or (
            policy.interactive == "first" and self._sessions.count_for(route.key) > 0)
        session = Session(route=route, ws=ws, client=client, settings=self._relay_settings,
                          metrics=self.metrics, request=request, user=viewer.user,
                          view_only=view_only,
                          idle_timeout=None if view_only else policy.idle_timeout,
                          max_duration=policy.max_duration)
        claimant = Holder(session_id=session.session_id, user=viewer.user, client=client,
                          since=session.started_at, replica="")
        labels = (route.namespace, route.name)
        if policy.exclusive:
            if not self._consoles_started:
                await self._consoles.start(self._taken)
                self._consoles_started = True
            takeover = request.query.get("takeover") == "1"
            holder = await self._consoles.acquire(route, claimant, lambda held: takeover and (
                policy.takeover == "allow" or (policy.takeover == "owner-only" and
                                               bool(viewer.user) and held.user == viewer.user)))
            if holder is not None:
                reason = f"in use by {holder.describe()}"
                await ws.close(code=closecodes.CONFLICT,
                               message=closecodes.clip_reason(reason).encode())
                self._log_end(labels, client, viewer, closecodes.CONFLICT, reason, started)
                return ws
        self._sessions.add(session)
        active = self.metrics.sessions_active.labels(*labels)
        active.inc()
        try:
            await session.run()
        finally:
            self._sessions.remove(session)
            active.dec()
            if policy.exclusive:
                await self._consoles.release(route, claimant)
            self._log_end(labels, client, viewer, session.code or closecodes.INTERNAL_ERROR,
                          session.reason, started, session)
        return ws

    def _refusal(self, route: Route | None, viewer: Viewer | Denied | None
                 ) -> tuple[int, str] | None:
        settings = self.settings
        if self._closing:
            return closecodes.GOING_AWAY, "the server is shutting down; reconnect later"
        if route is None:
            return closecodes.UNKNOWN_TARGET, "no such console here"
        if isinstance(viewer, Denied):
            code = closecodes.FORBIDDEN if viewer.signed_in else closecodes.UNAUTHENTICATED
            return code, viewer.reason
        if not isinstance(viewer, Viewer):
            log.error("authorize returned %r for %s, not a Viewer or Denied: refused",
                      viewer, route.key)
            return closecodes.INTERNAL_ERROR, "internal error in the server; see its log"
        if self._sessions.count >= settings.max_sessions:
            return closecodes.OVER_CAPACITY, "the server is at its limit of sessions; try later"
        viewers = route.sessions.max_viewers
        count = self._sessions.count_for(route.key)
        if viewers is not None and not route.sessions.exclusive and count >= viewers:
            return closecodes.CONFLICT, f"{route.key} already has {viewers} viewers, its most"
        if count >= settings.max_sessions_per_target:
            return closecodes.OVER_CAPACITY, f"{route.key} has its limit of viewers; try later"
        return None

    def _log_end(self, labels: tuple[str, str], client: str, viewer: Viewer | Denied | None,
                 code: int, reason: str, started: float, session: Session | None = None) -> None:
        self.metrics.sessions_total.labels(*labels, str(code)).inc()
        log.info("session end", extra={"fields": {
            "target": "/".join(labels) if labels[0] else "", "client": client,
            "user": viewer.user if isinstance(viewer, Viewer) else "", "code": code,
            "reason": reason,
            "bytes_to_server": session.to_server if session else 0,
            "bytes_to_client": session.to_client if session else 0,
            "duration_s": round(time.monotonic() - started, 3),
            "server_version": session.server_version if session else ""}})
