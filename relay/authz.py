"""What a viewer may open: one decision per (identity, target), from RBAC or from manifests.

- In a cluster (`--kubeconfig` or in-cluster credentials), the relay asks the Kubernetes API with
  a SubjectAccessReview whether the user and groups may `connect` to `vnctargets` (group
  vncgate.io) with that name in that namespace, and caches the answer briefly. An API error
  denies: an outage must never open consoles.
- Standalone, a target's `spec.access` lists users and groups; without one, anyone signed in
  may open it.
- A share link opens exactly its own target, whatever RBAC says: minting it was the decision.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from relay.auth import Identity
from relay.model import Route
from relay.spec import API_GROUP, PLURAL

log = logging.getLogger("vncgate.authz")

SAR_PATH = "/apis/authorization.k8s.io/v1/subjectaccessreviews"
ALLOW_TTL = 30.0
DENY_TTL = 10.0


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str = ""


class Authorizer(Protocol):
    async def decide(self, identity: Identity, route: Route) -> Decision: ...

    async def close(self) -> None: ...


def _link_decision(identity: Identity, route: Route) -> Decision | None:
    if identity.link_target is None:
        return None
    if identity.link_target == route.key:
        return Decision(True, "share link")
    return Decision(False, f"your share link opens {identity.link_target}, not {route.key}")


class OpenAuthorizer:
    """`--auth none`: every console is open to everyone who reaches the relay."""

    async def decide(self, identity: Identity, route: Route) -> Decision:
        return _link_decision(identity, route) or Decision(True, "authentication is off")

    async def close(self) -> None:
        return None


class ManifestAuthorizer:
    """Standalone: `spec.access` of the target decides; none means anyone signed in."""

    async def close(self) -> None:
        return None

    async def decide(self, identity: Identity, route: Route) -> Decision:
        linked = _link_decision(identity, route)
        if linked is not None:
            return linked
        if route.access is None:
            return Decision(True, "the target has no access list")
        if route.access.admits(identity.user, identity.groups):
            return Decision(True, "listed in spec.access")
        return Decision(False, f"{identity.label} is not in the access list of {route.key}")


@dataclass(frozen=True)
class KubeConnection:
    server: str
    ssl_context: ssl.SSLContext | bool
    configuration: Any  # kubernetes.client.Configuration: holds the token and its refresh hook

    def headers(self) -> dict[str, str]:
        # Runs the refresh hook first: in a pod it re-reads the projected ServiceAccount token.
        token = self.configuration.get_api_key_with_prefix("BearerToken")
        if not token:
            return {}
        # kubeconfig tokens come as "Bearer <token>" already; in-cluster ones may not.
        return {"Authorization": token if token.lower().startswith("bearer ")
                else f"Bearer {token}"}


def kube_connection(kubeconfig: Path | None) -> KubeConnection:
    """Credentials from a kubeconfig file, or the pod's own ServiceAccount in a cluster."""
    from kubernetes import client, config

    configuration = client.Configuration()
    if kubeconfig is not None:
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig), client_configuration=configuration)
    else:
        config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration)
    context: ssl.SSLContext | bool = False
    if configuration.host.startswith("https"):
        if configuration.verify_ssl:
            context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
        else:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if configuration.cert_file:
            context.load_cert_chain(configuration.cert_file, configuration.key_file)
    return KubeConnection(server=configuration.host.rstrip("/"), ssl_context=context,
                          configuration=configuration)


class KubernetesAuthorizer:
    """SubjectAccessReview per (user, groups, target), cached: allowed 30 s, denied 10 s."""

    def __init__(self, connection: KubeConnection, max_cached: int = 10_000) -> None:
        self.connection = connection
        self.max_cached = max_cached
        self._cache: OrderedDict[tuple[str, tuple[str, ...], str], tuple[Decision, float]] = \
            OrderedDict()
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def decide(self, identity: Identity, route: Route) -> Decision:
        linked = _link_decision(identity, route)
        if linked is not None:
            return linked
        if not identity.user:
            return Decision(False, "sign in first")
        key = (identity.user, tuple(sorted(identity.groups)), route.key)
        cached = self._cache.get(key)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0]
        decision, cacheable = await self._review(identity, route)
        if cacheable:
            self._cache[key] = (decision, now + (ALLOW_TTL if decision.allowed else DENY_TTL))
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return decision

    async def _review(self, identity: Identity, route: Route) -> tuple[Decision, bool]:
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": identity.user,
                "groups": list(identity.groups),
                "resourceAttributes": {"group": API_GROUP, "resource": PLURAL, "verb": "connect",
                                       "namespace": route.namespace, "name": route.name},
            },
        }
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        try:
            async with self._session.post(f"{self.connection.server}{SAR_PATH}", json=body,
                                          headers=self.connection.headers(),
                                          ssl=self.connection.ssl_context) as resp:
                if resp.status >= 400:
                    text = (await resp.text())[:300]
                    raise RuntimeError(f"HTTP {resp.status}: {text}")
                reply = await resp.json()
            status = reply.get("status") or {}
        except Exception as exc:  # any failure of the API denies; never allow on error
            log.warning("SubjectAccessReview failed; denying", extra={"fields": {
                "user": identity.user, "target": route.key, "error": str(exc)}})
            return Decision(False, "the relay could not check your access with Kubernetes; "
                                   "try again in a moment"), False
        if status.get("allowed") is True and not status.get("denied"):
            return Decision(True, "RBAC allows connect"), True
        why = status.get("reason") or status.get("evaluationError") or ""
        return Decision(False, f"{identity.label} may not connect to {route.key}; ask for a "
                               f"RoleBinding to vncgate-viewer in {route.namespace}"
                               + (f" ({why})" if why else "")), True
