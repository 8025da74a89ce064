"""What a viewer may open: one decision per (identity, target), from RBAC or from manifests.

- In a cluster (`--kubeconfig` or in-cluster credentials), the relay asks the Kubernetes API with
  a SubjectAccessReview whether the user and groups may `connect` to `vnctargets` (group
  vncgate.io) with that name in that namespace, and caches the answer briefly. An API error
  denies: an outage must never open consoles.
- Standalone, a target's `spec.access` lists users and groups; without one, anyone signed in
  may open it.
- A share link opens exactly its own target, whatever RBAC says: minting it was the decision.

Recordings of a target (relay/web/playback.py) are decided apart: `get` on the subresource
`vnctargets/recordings` in a cluster, `spec.access` standalone (a target the relay no longer
knows: nobody), and never by a share link.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from vncgate.common.kube import KubeClient
from vncgate.common.model import Route
from vncgate.common.spec import API_GROUP, PLURAL
from vncgate.common.tasks import SharedAnswers
from vncgate.relay.access.identity import Identity
from vncgate.relay.access.roles import RoleNames

log = logging.getLogger("vncgate.authz")

SAR_PATH = "/apis/authorization.k8s.io/v1/subjectaccessreviews"
ALLOW_TTL = 30.0
DENY_TTL = 10.0
# How long a viewer waits for a review; past it, refused for now (4503, ask again in a moment).
ANSWER_WITHIN = 5.0
# How long a review that was sent may take, when the viewer stopped waiting for it: its answer
# is cached for the viewer's next try, and its connection is not given up (which would cost the
# API server a new TLS handshake when it is already slow).
REVIEW_SENT_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Decision:
    """`allowed` or not, and why. `unavailable`: not allowed because the answer could not be
    had (the API server did not answer the review): refused all the same (fail closed), but
    worth asking again in a moment, so callers say so (503, close code 4503), not 403."""

    allowed: bool
    reason: str = ""
    unavailable: bool = False

    @property
    def status(self) -> int:
        """A refusal's HTTP status: 503 (ask again in a moment) or 403."""
        return 503 if self.unavailable else 403


# What the actions are called in RBAC (verbs on vnctargets) and in words; the ClusterRole that
# grants each (named in refusals) is configured (roles.RoleNames.for_verb).
ACTIONS = {
    "connect": "connect to",
    "share": "make share links for",
    "sessions": "see the sessions of",
    "disconnect": "end sessions of",
}


_UNANSWERED = Decision(False, "the relay could not check your access with Kubernetes; try "
                              "again in a moment", unavailable=True)


class Authorizer(Protocol):
    async def decide(self, identity: Identity, route: Route) -> Decision: ...

    async def decide_action(self, identity: Identity, namespace: str, name: str,
                            verb: str) -> Decision: ...

    async def close(self) -> None: ...

    async def decide_recordings(self, identity: Identity, namespace: str, name: str,
                                route: Route | None) -> Decision: ...

    async def may_open_all(self, identity: Identity, namespace: str) -> bool:
        """Whether `identity` may open every console of `namespace` (one question instead of
        one per console, for the list); False: ask per console."""
        ...

    def decide_now(self, identity: Identity, route: Route) -> Decision | None:
        """`decide`'s answer if it needs no I/O (in memory, or cached); None: await `decide`."""
        ...


def _no_link(identity: Identity) -> Decision | None:
    if identity.link_target is not None:
        return Decision(False, "a share link opens a console, not its recordings; sign in")
    return None


def _no_action_by_link(identity: Identity) -> Decision | None:
    if identity.link_target is not None:
        return Decision(False, "a share link opens a console, nothing more; sign in")
    return None


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

    async def decide_action(self, identity: Identity, namespace: str, name: str,
                            verb: str) -> Decision:
        return _no_action_by_link(identity) or Decision(True, "authentication is off")

    async def decide_recordings(self, identity: Identity, namespace: str, name: str,
                                route: Route | None) -> Decision:
        return _no_link(identity) or Decision(True, "authentication is off")

    async def may_open_all(self, identity: Identity, namespace: str) -> bool:
        return identity.link_target is None

    def decide_now(self, identity: Identity, route: Route) -> Decision | None:
        return _link_decision(identity, route) or Decision(True, "authentication is off")

    async def close(self) -> None:
        return None


class ManifestAuthorizer:
    """Standalone: `spec.access` of the target decides; none means anyone signed in."""

    async def close(self) -> None:
        return None

    async def decide_action(self, identity: Identity, namespace: str, name: str,
                            verb: str) -> Decision:
        # spec.access says who may open a console, not who may administer it: only RBAC does.
        return Decision(False, f"{ACTIONS[verb]} consoles needs Kubernetes RBAC (the relay "
                               "with --authorization kubernetes); standalone, use "
                               "vncgate-relay link on the relay's machine")

    async def may_open_all(self, identity: Identity, namespace: str) -> bool:
        return False  # each target has its own access list

    async def decide(self, identity: Identity, route: Route) -> Decision:
        return self.decide_now(identity, route)

    def decide_now(self, identity: Identity, route: Route) -> Decision:
        linked = _link_decision(identity, route)
        if linked is not None:
            return linked
        if route.access is None:
            return Decision(True, "the target has no access list")
        if route.access.admits(identity.user, identity.groups):
            return Decision(True, "listed in spec.access")
        return Decision(False, f"{identity.label} is not in the access list of {route.key}")

    async def decide_recordings(self, identity: Identity, namespace: str, name: str,
                                route: Route | None) -> Decision:
        refused = _no_link(identity)
        if refused is not None:
            return refused
        if route is None:  # its access list is gone with it: fail closed
            return Decision(False, f"{namespace}/{name} is not a target of this relay any more; "
                                   "its recordings are listed by vncgate-relay recordings")
        return await self.decide(identity, route)


_Key = tuple[str, tuple[str, ...], str, str]


class KubernetesAuthorizer:
    """SubjectAccessReview per (user, groups, target), cached: allowed 30 s, denied 10 s.

    A viewer waits `answer_within` for its review, and is refused for now (unavailable) past
    it; the review itself goes on (within its client's `sent_timeout`), and its answer is cached
    for the next try. The same question asked again while its review is under way waits for
    that review instead of sending another: a reconnect storm's retries add no reviews, and a
    slow API server is not handed more work, nor new connections, because it is slow."""

    def __init__(self, client: KubeClient, max_cached: int = 10_000,
                 roles: RoleNames | None = None, answer_within: float = ANSWER_WITHIN) -> None:
        self.client = client
        self.roles = roles or RoleNames()
        self.max_cached = max_cached
        self.answer_within = answer_within
        self._cache: OrderedDict[_Key, tuple[Decision, float]] = OrderedDict()
        self._under_way: SharedAnswers[_Key, Decision] = SharedAnswers()

    async def close(self) -> None:
        await self._under_way.close()
        await self.client.close()

    async def decide(self, identity: Identity, route: Route) -> Decision:
        linked = _link_decision(identity, route)
        if linked is not None:
            return linked
        return await self._decide(identity, route.namespace, route.name, "connect", "")

    async def decide_recordings(self, identity: Identity, namespace: str, name: str,
                                route: Route | None) -> Decision:
        return _no_link(identity) or await self._decide(identity, namespace, name, "get",
                                                        "recordings")

    def decide_now(self, identity: Identity, route: Route) -> Decision | None:
        linked = _link_decision(identity, route)
        if linked is not None:
            return linked
        if not identity.user:
            return Decision(False, "sign in first")
        cached = self._cache.get(self._key(identity, route.namespace, route.name, "connect", ""))
        return cached[0] if cached is not None and cached[1] > time.monotonic() else None

    @staticmethod
    def _key(identity: Identity, namespace: str, name: str, verb: str, subresource: str
             ) -> _Key:
        return (identity.user, tuple(sorted(identity.groups)), f"{namespace}/{name}",
                f"{verb} {subresource}")

    async def may_open_all(self, identity: Identity, namespace: str) -> bool:
        """A review without a name: RBAC allows it only by a rule that covers every
        vnctarget of the namespace (no resourceNames), so a yes holds for each of them."""
        if identity.link_target is not None:
            return False
        return (await self._decide(identity, namespace, "", "connect", "")).allowed

    async def decide_action(self, identity: Identity, namespace: str, name: str,
                            verb: str) -> Decision:
        return _no_action_by_link(identity) or await self._decide(identity, namespace, name,
                                                                  verb, "")

    async def _decide(self, identity: Identity, namespace: str, name: str, verb: str,
                      subresource: str) -> Decision:
        if not identity.user:
            return Decision(False, "sign in first")
        key = self._key(identity, namespace, name, verb, subresource)
        cached = self._cache.get(key)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        try:
            return await self._under_way.wait(key, lambda: self._review_and_cache(
                key, identity, namespace, name, verb, subresource), self.answer_within)
        except TimeoutError:
            log.warning("SubjectAccessReview not answered in time; refused for now", extra={
                "fields": {"user": identity.user, "target": f"{namespace}/{name}",
                           "seconds": self.answer_within}})
            return _UNANSWERED

    async def _review_and_cache(self, key: _Key, identity: Identity, namespace: str, name: str,
                                verb: str, subresource: str) -> Decision:
        decision, cacheable = await self._review(identity, namespace, name, verb, subresource)
        if cacheable:
            ttl = ALLOW_TTL if decision.allowed else DENY_TTL
            self._cache[key] = (decision, time.monotonic() + ttl)
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return decision

    async def _review(self, identity: Identity, namespace: str, name: str, verb: str,
                      subresource: str) -> tuple[Decision, bool]:
        target = f"{namespace}/{name}"
        attributes = {"group": API_GROUP, "resource": PLURAL, "verb": verb,
                      "namespace": namespace}
        if name:  # none: every vnctarget of the namespace
            attributes["name"] = name
        if subresource:
            attributes["subresource"] = subresource
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": identity.user,
                "groups": list(identity.groups),
                "resourceAttributes": attributes,
            },
        }
        try:
            reply = await self.client.request("POST", SAR_PATH, body)
            status = reply.get("status") or {}
        except Exception as exc:  # any failure of the API denies; never allow on error
            log.warning("SubjectAccessReview failed; denying", extra={"fields": {
                "user": identity.user, "target": target, "error": str(exc) or type(exc).__name__}})
            return _UNANSWERED, False
        what = f"{verb} {PLURAL}/{subresource}" if subresource else verb
        if status.get("allowed") is True and not status.get("denied"):
            return Decision(True, f"RBAC allows {what}"), True
        why = status.get("reason") or status.get("evaluationError") or ""
        if not name:  # every VncTarget of the namespace (of any namespace: "")
            target = f"the VncTargets in {namespace}" if namespace else \
                "the VncTargets of any namespace"
        role = self.roles.recordings_viewer if subresource else self.roles.for_verb(verb)
        binding = (f"a RoleBinding to {role} in {namespace}" if namespace
                   else f"a ClusterRoleBinding to {role}")
        if subresource:
            ask = f"{identity.label} may not see the recordings of {target}; ask for {binding}"
        else:
            ask = f"{identity.label} may not {ACTIONS.get(verb, verb)} {target}; ask for {binding}"
        return Decision(False, ask + (f" ({why})" if why else "")), True
