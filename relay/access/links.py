"""Share links: HMAC-signed, expiring, optionally single-use grants to open one target.

A link is `<public url>/t/<ns>/<name>/#link=<token>`. The token travels in the URL fragment,
which browsers never send to servers, so it does not land in Ingress or proxy access logs. The
viewer posts it to `link` next to itself, which checks it and sets a cookie named after that
target; the WebSocket then carries the cookie, which admits to that target only.

Keys come from `--link-key-file` (repeatable, newest first): links are signed with the first,
accepted with any, so a key can rotate without breaking links already handed out.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from vncgate.relay.access.cookies import sign, unsign

MAX_TTL = 7 * 24 * 3600


class LinkError(ValueError):
    """A link that cannot be used; the message says why in words for the person holding it."""


def load_keys(paths: tuple[Path, ...] | list[Path]) -> tuple[bytes, ...]:
    keys = []
    for path in paths:
        try:
            key = path.read_bytes().strip()
        except OSError as exc:
            raise ValueError(f"--link-key-file {path}: {exc.strerror}") from None
        if len(key) < 32:
            raise ValueError(f"--link-key-file {path}: a key needs at least 32 bytes "
                             "(generate one with: openssl rand -hex 32)")
        keys.append(key)
    return tuple(keys)


@dataclass(frozen=True, slots=True)
class LinkGrant:
    target: str  # namespace/name
    expires: int
    view_only: bool
    once: bool
    link_id: str


def mint(key: bytes, target: str, ttl: int, view_only: bool = False, once: bool = False,
         now: float | None = None) -> tuple[str, LinkGrant]:
    if not 0 < ttl <= MAX_TTL:
        raise ValueError(f"a link lives between 1s and {MAX_TTL // 86400}d; got {ttl}s")
    grant = LinkGrant(target=target, expires=int(now if now is not None else time.time()) + ttl,
                      view_only=view_only, once=once, link_id=secrets.token_hex(8))
    token = sign(key, {"t": grant.target, "exp": grant.expires, "vo": grant.view_only,
                       "once": grant.once, "id": grant.link_id})
    return token, grant


def verify(keys: tuple[bytes, ...], token: str, target: str,
           now: float | None = None) -> LinkGrant:
    """The grant in `token` for `target`, or LinkError saying what is wrong with it."""
    if not keys:
        raise LinkError("share links are not enabled on this relay")
    payload = unsign(keys, token)
    if payload is None:
        raise LinkError("this link is not valid: it was altered, cut short, or its key was "
                        "retired; ask for a new link")
    expires, link_target = payload.get("exp"), payload.get("t")
    if not isinstance(expires, int) or not isinstance(link_target, str):
        raise LinkError("this link is not valid; ask for a new link")
    if link_target != target:
        raise LinkError(f"this link opens {link_target}, not {target}")
    if expires <= (now if now is not None else time.time()):
        raise LinkError("this link has expired; ask for a new link")
    return LinkGrant(target=link_target, expires=expires, view_only=bool(payload.get("vo")),
                     once=bool(payload.get("once")), link_id=str(payload.get("id", "")))


def exchanged(session_key: bytes, grant: LinkGrant) -> str:
    """The cookie a link exchange sets: a credential of its own, signed with the session key
    (never with a link key) and marked as an exchanged link, with an id of this exchange.

    Setting the token itself as the cookie let a `--once` link open sessions without ever being
    exchanged: whoever held the token could present it as the cookie, as often as they liked.
    """
    return sign(session_key, {"typ": "link-session", "t": grant.target, "exp": grant.expires,
                              "vo": grant.view_only, "id": grant.link_id,
                              "x": secrets.token_hex(8)})


def verify_exchanged(session_key: bytes, value: str, target: str,
                     now: float | None = None) -> LinkGrant:
    """The grant an exchange cookie carries for `target`, or LinkError."""
    payload = unsign((session_key,), value)
    if payload is None or payload.get("typ") != "link-session":
        raise LinkError("this link's cookie is not valid; open the link again")
    expires, link_target = payload.get("exp"), payload.get("t")
    if not isinstance(expires, int) or link_target != target:
        raise LinkError(f"this link's cookie is not for {target}")
    if expires <= (now if now is not None else time.time()):
        raise LinkError("this link has expired; ask for a new link")
    return LinkGrant(target=target, expires=expires, view_only=bool(payload.get("vo")),
                     once=True, link_id=str(payload.get("id", "")))


class UsedLinks:
    """Single-use links already exchanged on this replica, remembered until they expire."""

    def __init__(self) -> None:
        self._used: dict[str, int] = {}

    def claim(self, grant: LinkGrant, now: float | None = None) -> bool:
        """True the first time a single-use link is exchanged, False after that."""
        moment = now if now is not None else time.time()
        if len(self._used) > 1000:
            self._used = {k: exp for k, exp in self._used.items() if exp > moment}
        if grant.link_id in self._used:
            return False
        self._used[grant.link_id] = grant.expires
        return True


def link_cookie(target: str) -> str:
    """One cookie per target (namespaces have no dots, so the name is unambiguous)."""
    return "vncgate_link." + target.replace("/", ".")


def key_id(key: bytes) -> str:
    """A short, non-secret name for a key, for logs."""
    return hashlib.sha256(key).hexdigest()[:8]
