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
from vncgate.relay.session.admission import Admission, Applicant, Refusal
from vncgate.relay.session.bridge import Sessions
from vncgate.relay.session.consoles import LocalConsoles
from vncgate.relay.settings import RelaySettings
from vncgate.relay.web.origin import same_origin
from vncgate.relay.web.websocket import RelayWebSocket

__all__ = ["Authorize", "Bridge", "BridgeSettings", "Denied", "Lookup", "Route",
           "SessionPolicy", "Viewer"]

log = logging.getLogger("vncgate.session")
_T = TypeVar("_T")
_INTERNAL_ERROR = (closecodes.INTERNAL_ERROR, "internal error in the server; see its log")


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
            max_sessions=self.settings.max_sessions,
            max_sessions_per_target=self.settings.max_sessions_per_target,
            deny_networks=parse_networks(self.settings.deny_cidrs, "deny_cidrs"))
        self.metrics = RelayMetrics.create(self.settings.metrics_registry)
        self._closing = False
        self._consoles_started = False
        self._sessions = Sessions()
        self._admission = Admission(
            sessions=self._sessions, consoles=LocalConsoles(), metrics=self.metrics,
            settings=self._relay_settings, closing=lambda: self._closing, server="server")

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
        route: Route | None = None
        refused: Refusal | None = None
        try:
            route = await _maybe_await(self._lookup(request))
        except Exception:  # the application's callback failed: refuse, say where to look
            log.exception("lookup or authorize failed for %s", request.path)
            refused = _INTERNAL_ERROR
        if route is not None and route.sessions.exclusive and not self._consoles_started:
            self._consoles_started = True
            await self._admission.consoles.start(self._admission.console_taken)

        async def decide(route: Route) -> Applicant | Refusal:
            try:
                viewer = await _maybe_await(self._authorize(request, route))
            except Exception:
                log.exception("lookup or authorize failed for %s", request.path)
                return _INTERNAL_ERROR
            if isinstance(viewer, Denied):
                code = closecodes.FORBIDDEN if viewer.signed_in else closecodes.UNAUTHENTICATED
                return code, viewer.reason
            if not isinstance(viewer, Viewer):
                log.error("authorize returned %r for %s, not a Viewer or Denied: refused",
                          viewer, route.key)
                return _INTERNAL_ERROR
            return Applicant(label=viewer.user, user=viewer.user, view_only=viewer.view_only)

        await self._admission.serve(request, ws, target=route.key if route else "",
                                    client=request.remote or "", route=route, decide=decide,
                                    refused=refused)
        return ws
