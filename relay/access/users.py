"""The users file of `--auth token`: users, their hashed secrets and groups."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from vncgate.relay.access.identity import AuthConfigError
from vncgate.relay.access.passwords import dummy_hash, verify_secret

log = logging.getLogger("vncgate.auth")


@dataclass(frozen=True, slots=True)
class User:
    name: str
    secret: str  # a hash (scrypt$..., sha256$...) or the plain secret
    groups: tuple[str, ...] = ()
    # A token entry (`sha256$...`, or a plain value under `token:`): a bearer token for scripts.
    # Passwords never are (see find_bearer).
    token: bool = False

    def __post_init__(self) -> None:
        if self.secret.startswith("sha256$"):
            object.__setattr__(self, "token", True)


def load_users(path: Path) -> dict[str, User]:
    """A users file: YAML, either `name: secret` lines or `name: {secret: ..., groups: [...]}`."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AuthConfigError(f"--users-file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise AuthConfigError(f"--users-file {path}: not valid YAML: {exc}") from None
    if isinstance(data, Mapping) and isinstance(data.get("users"), Mapping):
        data = data["users"]
    if not isinstance(data, Mapping) or not data:
        raise AuthConfigError(f"--users-file {path}: expected `user: secret` lines or "
                              "`user: {secret: ..., groups: [...]}` entries")
    users: dict[str, User] = {}
    for name, entry in data.items():
        where = f"--users-file {path}: user {name!r}"
        if not isinstance(name, str) or not name or ":" in name:
            raise AuthConfigError(f"{where}: a user name is a non-empty string without ':'")
        groups: list[str] = []
        token = False
        if isinstance(entry, Mapping):
            if "token" in entry and ("secret" in entry or "password" in entry):
                raise AuthConfigError(f"{where}: give either a token or a secret (password), "
                                      "not both")
            token = "token" in entry
            secret = entry.get("secret", entry.get("password", entry.get("token")))
            groups = entry.get("groups", [])
            if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
                raise AuthConfigError(f"{where}: groups must be a list of names")
        else:
            secret = entry
        if not isinstance(secret, str) or not secret:
            raise AuthConfigError(f"{where}: give a secret (a hash from `vncgate-relay "
                                  "hash-password`, or a token)")
        if not secret.startswith(("scrypt$", "sha256$")) and len(secret) < 12:
            raise AuthConfigError(f"{where}: a plain secret must have at least 12 characters; "
                                  "better, store its hash (vncgate-relay hash-password)")
        if token and secret.startswith("scrypt$"):
            raise AuthConfigError(f"{where}: a token is stored plain or as sha256$<hex>; "
                                  "scrypt$ hashes are for passwords (`secret:`)")
        users[name] = User(name=name, secret=secret, groups=tuple(groups), token=token)
    return users


def check_login(users: Mapping[str, User], name: str, secret: str) -> User | None:
    """The user if `secret` is theirs. Exactly one scrypt derivation whatever the outcome
    (unknown user, sha256 or plain entry, wrong or right secret): timing does not tell which
    names exist. Slow: run it in `KeyDerivations`, never on the event loop."""
    user = users.get(name)
    stored = user.secret if user is not None else ""
    if stored.startswith("scrypt$"):
        return user if verify_secret(secret, stored) else None
    verify_secret(secret, dummy_hash())
    return user if user is not None and verify_secret(secret, stored) else None


def find_bearer(users: Mapping[str, User], token: str) -> User | None:
    """The user whose token entry `token` is, or None.

    Only token entries (`sha256$...`, or a plain value under `token:`): a bearer names no user
    and so is not limited per account the way a sign-in is; a password accepted as a bearer
    let guesses at one person's password skip that limit. A token is a long random value
    (guessing it is hopeless), so this is one SHA-256 and constant-time compares, fast enough
    for the event loop.
    """
    digest = hashlib.sha256(token.encode()).hexdigest()
    found = None
    for user in users.values():
        if not user.token:
            continue
        if user.secret.startswith("sha256$"):
            match = hmac.compare_digest(digest, user.secret.removeprefix("sha256$"))
        else:
            match = hmac.compare_digest(token.encode(), user.secret.encode())
        if match and found is None:
            found = user
    return found


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino


class UsersFile:
    """The users file as the relay holds it, re-read when it changes (its size, mtime or inode,
    following symlinks: a Secret's volume swaps a link), so that adding or removing someone
    needs no restart. A file that no longer loads is logged and the users read last stay."""

    def __init__(self, path: Path | None, users: Mapping[str, User]) -> None:
        self.path = path
        self.current: dict[str, User] = dict(users)
        self._stamp = _stamp(path) if path is not None else None

    def reload(self) -> tuple[str, ...]:
        """Re-read the file if it changed; the users removed or given another secret (whose
        sign-ins and sessions end), empty when nothing changed or the file does not load."""
        if self.path is None:
            return ()
        stamp = _stamp(self.path)
        if stamp is None or stamp == self._stamp:
            return ()
        try:
            fresh = load_users(self.path)
        except AuthConfigError as exc:
            log.error("users file not re-read, the users read before stay: %s", exc)
            self._stamp = stamp
            return ()
        self._stamp = stamp
        ended = tuple(name for name, user in self.current.items()
                      if name not in fresh or fresh[name].secret != user.secret)
        added = [name for name in fresh if name not in self.current]
        self.current = fresh
        log.info("users file re-read: %d users, %d added, %d removed or changed",
                 len(fresh), len(added), len(ended))
        return ended
