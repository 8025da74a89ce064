"""The users file of `--auth token`: users, their hashed secrets and groups."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from vncgate.relay.access.identity import AuthConfigError
from vncgate.relay.access.passwords import dummy_hash, verify_secret


@dataclass(frozen=True, slots=True)
class User:
    name: str
    secret: str  # a hash (scrypt$..., sha256$...) or the plain secret
    groups: tuple[str, ...] = ()


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
        if isinstance(entry, Mapping):
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
        users[name] = User(name=name, secret=secret, groups=tuple(groups))
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
    """The user whose secret `token` is (a bearer names no user: each entry is tried). Slow:
    one scrypt derivation per scrypt entry; run it in `KeyDerivations`."""
    found = None
    for user in users.values():
        if verify_secret(token, user.secret) and found is None:
            found = user
    return found
