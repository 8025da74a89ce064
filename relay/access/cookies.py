"""Signed values: the login cookie, and sign-outs that revoke one before it expires.

An OpenID sign-in's refresh token rides in its cookie sealed (`seal`): AES-256-GCM from
`cryptography`, with a key derived from the session key by HKDF and the cookie's id as
associated data, so the browser (and whoever reads its cookies) holds only ciphertext, and every
replica with the session key can renew the sign-in."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vncgate.relay.access.passwords import b64, unb64

SESSION_COOKIE = "vncgate_session"
# Browsers keep cookies of up to about 4 kB; a sign-in cookie must stay below.
MAX_COOKIE = 3900


def sign(key: bytes, payload: Mapping[str, object]) -> str:
    body = b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    mac = hmac.new(key, body.encode(), hashlib.sha256).digest()
    return f"{body}.{b64(mac)}"


def unsign(keys: tuple[bytes, ...], value: str) -> dict[str, object] | None:
    """The payload if any key signed it, else None. Expiry is the caller's business."""
    body, dot, mac = value.partition(".")
    if not dot:
        return None
    try:
        given = unb64(mac)
        for key in keys:
            if hmac.compare_digest(hmac.new(key, body.encode(), hashlib.sha256).digest(), given):
                payload = json.loads(unb64(body))
                return payload if isinstance(payload, dict) else None
    except (ValueError, UnicodeDecodeError):
        return None
    return None


def session_cookie(key: bytes, user: str, ttl: float, now: float | None = None,
                   groups: tuple[str, ...] | None = None, expires: float | None = None) -> str:
    """A sign-in cookie for `ttl` seconds (or until `expires`, if sooner). `groups` are set by
    an OpenID provider's sign-in, which the cookie then carries (source "oidc"); without them
    the user is looked up in the users file on every request."""
    issued = int(now if now is not None else time.time())
    ends = issued + int(ttl) if expires is None else min(issued + int(ttl), int(expires))
    payload: dict[str, object] = {"typ": "session", "u": user, "iat": issued, "exp": ends,
                                  "sid": secrets.token_hex(8)}
    if groups is not None:
        payload |= {"src": "oidc", "g": list(groups)}
    return sign(key, payload)


def _sealing_key(key: bytes) -> AESGCM:
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=b"vncgate: sealed values in cookies v1").derive(key)
    return AESGCM(derived)


def seal(key: bytes, bound_to: str, value: Mapping[str, Any]) -> str:
    """`value` encrypted and authenticated for this session key, bound to `bound_to` (a
    cookie's id): it opens only with the same key and the same id."""
    nonce = secrets.token_bytes(12)
    sealed = _sealing_key(key).encrypt(nonce, json.dumps(value, separators=(",", ":")).encode(),
                                       bound_to.encode())
    return b64(nonce + sealed)


def unseal(key: bytes, bound_to: str, text: str) -> dict[str, Any] | None:
    """What `seal` sealed, or None if it was made with another key or id, or altered."""
    try:
        raw = unb64(text)
        if len(raw) < 12 + 16:
            return None
        value = json.loads(_sealing_key(key).decrypt(raw[:12], raw[12:], bound_to.encode()))
    except (InvalidTag, ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def renewable_session_cookie(key: bytes, user: str, groups: tuple[str, ...], sid: str,
                             identity_expires: float, ends: float, sealed: str) -> str:
    """An OpenID sign-in that the relay renews with the provider's refresh token: valid until
    `ends` (its --session-ttl), its names believed until `identity_expires` (the ID token's
    `exp`), after which the relay renews them with `sealed` (see `seal`)."""
    return sign(key, {"typ": "session", "u": user, "iat": int(time.time()), "exp": int(ends),
                      "ie": int(identity_expires), "sid": sid, "src": "oidc",
                      "g": list(groups), "rt": sealed})


@dataclass(frozen=True, slots=True)
class SessionClaim:
    user: str
    expires: int
    sid: str
    # Set for an OpenID provider's sign-in: the groups it named ("" source: the users file).
    source: str = ""
    groups: tuple[str, ...] = ()
    # A renewable OpenID sign-in: when its names must be renewed (the ID token's expiry), and
    # the sealed refresh grant (see `seal`). Without: the names last until `expires`.
    identity_expires: int | None = None
    sealed: str = ""

    @property
    def needs_renewal(self) -> bool:
        return bool(self.sealed) and self.identity_expires is not None and \
            self.identity_expires <= time.time()


def read_session_cookie(key: bytes, value: str, now: float | None = None) -> SessionClaim | None:
    """A sign-in cookie's claim if this key signed it, it is one, and it has not expired."""
    payload = unsign((key,), value)
    if payload is None or payload.get("typ") != "session":
        return None
    expires, user, sid = payload.get("exp"), payload.get("u"), payload.get("sid")
    if not isinstance(expires, int) or not isinstance(user, str) or not isinstance(sid, str):
        return None
    if expires <= (now if now is not None else time.time()):
        return None
    source, groups = payload.get("src", ""), payload.get("g", [])
    if not isinstance(source, str) or not isinstance(groups, list) or \
            not all(isinstance(g, str) for g in groups):
        return None
    renew_at, sealed = payload.get("ie"), payload.get("rt", "")
    if (renew_at is not None and not isinstance(renew_at, int)) or not isinstance(sealed, str) \
            or bool(sealed) != (renew_at is not None):
        return None
    return SessionClaim(user=user, expires=expires, sid=sid, source=source, groups=tuple(groups),
                        identity_expires=renew_at, sealed=sealed)


def user_from_cookie(key: bytes, value: str, now: float | None = None) -> str | None:
    claim = read_session_cookie(key, value, now)
    return claim.user if claim is not None else None


def revocation_key(credential_id: str) -> str:
    """The name a revoked credential goes by outside this process (Lease names, peers): a
    digest, so that neither the API server nor a peer ever holds a cookie's id."""
    return hashlib.sha256(f"vncgate-signout\0{credential_id}".encode()).hexdigest()[:40]


class Revoked:
    """Credentials ended before their expiry (signed-out cookies), remembered until then.

    Kept by `revocation_key`, so that a revocation learned from a peer or from the API server
    (which know only the key) counts the same as one made here."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._until: dict[str, float] = {}

    def revoke(self, credential_id: str, expires: float, now: float | None = None) -> str:
        """Revoke one credential; returns its key."""
        key = revocation_key(credential_id)
        self.add(key, expires, now)
        return key

    def add(self, key: str, expires: float, now: float | None = None) -> None:
        """Remember a revocation by its key (learned from a peer or the API server)."""
        moment = now if now is not None else time.time()
        if key not in self._until and len(self._until) >= self.max_entries:
            self._until = {k: exp for k, exp in self._until.items() if exp > moment}
            while len(self._until) >= self.max_entries:  # still full: forget the oldest
                del self._until[next(iter(self._until))]
        self._until[key] = max(expires, self._until.get(key, 0.0))

    def has_key(self, key: str) -> bool:
        return key in self._until

    def __contains__(self, credential_id: str) -> bool:
        return revocation_key(credential_id) in self._until

    def __len__(self) -> int:
        return len(self._until)


# A browser that signed in as a user before: its failed sign-ins are counted on their own, so
# that guesses at the account from elsewhere (or from the same Ingress address) never keep
# that person out. The OWASP "device cookie" defence against account lock-out.
DEVICE_COOKIE = "vncgate_device"
DEVICE_TTL = 90 * 24 * 3600


@dataclass(frozen=True, slots=True)
class DeviceClaim:
    user: str
    device: str


def device_cookie(key: bytes, user: str, now: float | None = None) -> str:
    issued = int(now if now is not None else time.time())
    return sign(key, {"typ": "device", "u": user, "exp": issued + DEVICE_TTL,
                      "dev": secrets.token_hex(8)})


def read_device_cookie(key: bytes, value: str, now: float | None = None) -> DeviceClaim | None:
    """A device cookie's claim if this key signed it, it is one, and it has not expired."""
    payload = unsign((key,), value)
    if payload is None or payload.get("typ") != "device":
        return None
    expires, user, device = payload.get("exp"), payload.get("u"), payload.get("dev")
    if not isinstance(expires, int) or not isinstance(user, str) or not isinstance(device, str):
        return None
    if expires <= (now if now is not None else time.time()):
        return None
    return DeviceClaim(user=user, device=device)
