"""What the public and internal apps of one relay share."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from aiohttp import web

from relay import closecodes
from relay.bridge import Sessions
from relay.metrics import RelayMetrics
from relay.model import Route
from relay.registry import Registry
from relay.settings import RelaySettings


@dataclass
class RelayState:
    settings: RelaySettings
    registry: Registry = field(default_factory=Registry)
    sessions: Sessions = field(default_factory=Sessions)
    metrics: RelayMetrics = field(default_factory=RelayMetrics.create)
    shutting_down: bool = False

    def __post_init__(self) -> None:
        self.registry.add_listener(self._route_changed)

    def _route_changed(self, old: Route, new: Route | None) -> None:
        """Sessions follow their route: removed -> closed; endpoint changed -> reconnect."""
        if new is None:
            for session in self.sessions.for_target(old.key):
                session.stop(closecodes.UNKNOWN_TARGET, f"{old.key} was removed")
            with contextlib.suppress(KeyError):  # a route nobody opened has no series
                self.metrics.sessions_active.remove(old.namespace, old.name)
        elif (old.host, old.port, old.view_only) != (new.host, new.port, new.view_only):
            for session in self.sessions.for_target(old.key):
                session.stop(closecodes.SERVICE_RESTART,
                             f"{old.key} changed its endpoint or access; reconnect")


STATE = web.AppKey("vncgate_state", RelayState)
