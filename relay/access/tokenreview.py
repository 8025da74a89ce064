"""Kubernetes bearer tokens at the relay: who a token belongs to, asked of the API server.

`--kubernetes-tokens` lets scripts and `kubectl vnc` present `Authorization: Bearer <token>`
with a token the API server trusts (a ServiceAccount token, an OIDC ID token). The relay sends it
in a TokenReview and learns the user and groups; what they may open is then decided as for any
other viewer, by SubjectAccessReviews (vncgate.relay.access.authz).

- Answers are cached briefly (AUTHENTICATED_TTL), by the token's SHA-256, in a bounded LRU: a
  revoked token stops working within that time.
- Only "authenticated" is believed. An unauthenticated answer denies (and counts as a failed
  sign-in of the client); an API error denies too (TokenReviewUnavailable): an outage must never
  let a token in.
- The token itself is never logged, cached or kept: only its digest is.
- A viewer waits ANSWER_WITHIN for the review and is refused for now past it, but the review
  goes on (its client's `sent_timeout`) and its answer is cached for the next try; the same
  token presented again meanwhile waits for that review (as SubjectAccessReviews: authz).
- A session lasts no longer than its token: the identity carries the JWT's `exp` (read only
  after the API server authenticated the token, so the claim is the signed one), and the relay
  ends the session then, as for an expiring cookie or link.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict

from vncgate.common.kube import KubeClient
from vncgate.common.tasks import SharedAnswers
from vncgate.relay.access.authz import ANSWER_WITHIN
from vncgate.relay.access.identity import Identity

log = logging.getLogger("vncgate.tokenreview")

TOKEN_REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"  # noqa: S105 - a URL path
AUTHENTICATED_TTL = 10.0
MAX_TOKEN_LENGTH = 16 * 1024


_UNANSWERED = ("the relay could not check your Kubernetes token with the API server; "
               "try again in a moment")


class TokenReviewUnavailable(Exception):
    """The API server could not be asked (or answered with an error): deny, and say so."""


def looks_like_jwt(token: str) -> bool:
    """ServiceAccount and OIDC tokens are JWTs: `eyJ...` header, three dot-separated parts.
    Tokens of a users file are opaque strings, which lets both kinds share one header."""
    return token.startswith("eyJ") and token.count(".") == 2


def token_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT (epoch seconds), None if it has none or it cannot be read.

    Not a check of the token: call it only for a token the API server authenticated."""
    parts = token.split(".")
    if len(parts) != 3 or len(parts[1]) > MAX_TOKEN_LENGTH:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        return None
    return float(exp)


class TokenReviewer:
    """TokenReviews with a short, bounded cache of the tokens that authenticated."""

    def __init__(self, client: KubeClient, audiences: tuple[str, ...] = (),
                 max_cached: int = 10_000, ttl: float = AUTHENTICATED_TTL,
                 answer_within: float = ANSWER_WITHIN) -> None:
        self.client = client
        self.audiences = audiences
        self.max_cached = max_cached
        self.ttl = ttl
        self.answer_within = answer_within
        self._cache: OrderedDict[str, tuple[Identity, float]] = OrderedDict()
        self._under_way: SharedAnswers[str, Identity | None] = SharedAnswers()
        self.reviews = 0  # TokenReviews sent (tests and metrics read it)

    async def close(self) -> None:
        await self._under_way.close()
        await self.client.close()

    async def review(self, token: str) -> Identity | None:
        """The token's identity; None if the API server does not authenticate it.

        Raises TokenReviewUnavailable when the API server cannot be asked.
        """
        if not token or len(token) > MAX_TOKEN_LENGTH:
            return None
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None:
            if cached[1] > now:
                self._cache.move_to_end(digest)
                return cached[0]
            del self._cache[digest]
        try:
            return await self._under_way.wait(digest, lambda: self._ask(token, digest),
                                              self.answer_within)
        except TimeoutError:
            log.warning("TokenReview not answered in time; refused for now",
                        extra={"fields": {"seconds": self.answer_within}})
            raise TokenReviewUnavailable(_UNANSWERED) from None

    async def _ask(self, token: str, digest: str) -> Identity | None:
        spec: dict[str, object] = {"token": token}
        if self.audiences:
            spec["audiences"] = list(self.audiences)
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        self.reviews += 1
        try:
            reply = await self.client.request("POST", TOKEN_REVIEW_PATH, body)
            status = (reply.get("status") or {}) if isinstance(reply, dict) else {}
        except Exception as exc:  # any failure denies; the error text never holds the token
            log.warning("TokenReview failed; denying", extra={"fields": {
                "error": type(exc).__name__ + ": " + str(exc)[:200].replace(token, "<token>")}})
            raise TokenReviewUnavailable(_UNANSWERED) from None
        if status.get("authenticated") is not True or status.get("error"):
            return None
        if self.audiences and not set(status.get("audiences") or ()) & set(self.audiences):
            return None
        user = status.get("user") or {}
        name = user.get("username")
        if not isinstance(name, str) or not name:
            return None
        groups = tuple(g for g in user.get("groups") or () if isinstance(g, str))
        expires = token_expiry(token)
        left = math.inf if expires is None else expires - time.time()
        if left <= 0:
            return None  # expired since the API server looked at it
        identity = Identity(user=name, groups=groups, method="kubernetes", expires=expires)
        self._cache[digest] = (identity, time.monotonic() + min(self.ttl, left))
        self._cache.move_to_end(digest)
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return identity

    def __len__(self) -> int:
        return len(self._cache)
