"""What the public and internal apps of one relay share."""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass, field

from aiohttp import web

from relay import closecodes
from relay.auth import FailureLimiter
from relay.authz import (
    Authorizer,
    KubernetesAuthorizer,
    ManifestAuthorizer,
    OpenAuthorizer,
    kube_connection,
)
from relay.bridge import Sessions
from relay.links import UsedLinks
from relay.metrics import RelayMetrics
from relay.model import Route
from relay.registry import Registry
from relay.settings import RelaySettings


def make_authorizer(settings: RelaySettings) -> Authorizer:
    if settings.auth.mode == "none":
        return OpenAuthorizer()
    if settings.auth.authorization == "kubernetes":
        return KubernetesAuthorizer(kube_connection(settings.auth.kubeconfig))
    return ManifestAuthorizer()


@dataclass
class RelayState:
    settings: RelaySettings
    registry: Registry = field(default_factory=Registry)
    sessions: Sessions = field(default_factory=Sessions)
    metrics: RelayMetrics = field(default_factory=RelayMetrics.create)
    shutting_down: bool = False
    authorizer: Authorizer = field(init=False)
    session_key: bytes = field(init=False)
    login_failures: FailureLimiter = field(default_factory=FailureLimiter)
    used_links: UsedLinks = field(default_factory=UsedLinks)
    # sha256(bearer token) -> (user, valid until): scrypt is too slow to run per request.
    bearer_cache: dict[str, tuple[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.registry.add_listener(self._route_changed)
        self.authorizer = make_authorizer(self.settings)
        # Without --session-secret-file a fresh key per process: logins end at a restart and
        # do not carry across replicas (the CLI warns).
        self.session_key = self.settings.auth.session_secret or secrets.token_bytes(32)

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
