"""Who the viewer is: authentication modes, users file, password hashes, session cookies.

Modes (`--auth`):
- `none`: nobody signs in; everyone who reaches the port may open every console.
- `proxy`: an auth proxy in front (oauth2-proxy style) names the user in headers; only requests
  from `--trusted-proxy` addresses are believed, headers from anyone else are ignored.
- `token`: users and their secrets from `--users-file`; a login page sets a signed session
  cookie; scripts send `Authorization: Bearer <token>`.

Share links (`vncgate.relay.links`) admit a viewer to one target in every mode.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import ipaddress
import json
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import yaml

from vncgate.common.networks import IPAddress, Network, NetworkError, parse_cidrs

AUTH_MODES = ("none", "proxy", "token")
SESSION_COOKIE = "vncgate_session"

# scrypt: 2^15 x 8 x 1 takes about 50-100 ms and 32 MiB, so a guessed password costs a lot.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
SCRYPT_MAXMEM = 64 * 1024 * 1024



class AuthConfigError(ValueError):
    """A users file or an auth setting that cannot work; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is asking. `method` says how we know: proxy, token, cookie, link or none."""

    user: str
    groups: tuple[str, ...] = ()
    method: str = "none"
    # Set for share-link viewers: the only target they may open, and whether only to watch.
    link_target: str | None = None
    view_only: bool = False
    # When the credential stops being valid (a cookie's or link's expiry, epoch seconds):
    # sessions opened with it end then. None: it does not expire (bearer, proxy, none).
    expires: float | None = None
    # The signed-in cookie's id, so that signing out can revoke it (and end its sessions).
    credential_id: str = ""

    @property
    def label(self) -> str:
        return self.user or "anonymous"


ANONYMOUS = Identity(user="", method="none")


# --- secrets and hashes ---------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_secret(secret: str, salt: bytes | None = None) -> str:
    """`scrypt$N$r$p$salt$hash`: what `vncgate-relay hash-password` prints for a users file."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            maxmem=SCRYPT_MAXMEM, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_secret(given: str, stored: str) -> bool:
    """Check a secret against a users-file entry: an scrypt or sha256 hash, or plain text."""
    if stored.startswith("scrypt$"):
        try:
            _, n, r, p, salt, digest = stored.split("$")
            computed = hashlib.scrypt(given.encode(), salt=_unb64(salt), n=int(n), r=int(r),
                                      p=int(p), maxmem=SCRYPT_MAXMEM, dklen=len(_unb64(digest)))
        except ValueError:
            return False
        return hmac.compare_digest(computed, _unb64(digest))
    if stored.startswith("sha256$"):
        # For long random API tokens a fast hash is enough; passwords should use scrypt.
        computed_hex = hashlib.sha256(given.encode()).hexdigest()
        return hmac.compare_digest(computed_hex, stored.removeprefix("sha256$"))
    return hmac.compare_digest(given.encode(), stored.encode())


@functools.cache
def dummy_hash() -> str:
    """An scrypt hash of nothing anyone knows: checked against for names that are not users,
    so that an unknown name costs the same derivation as a wrong password."""
    return hash_secret(secrets.token_urlsafe(16))


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


class DerivationsBusy(Exception):
    """Too many sign-ins are being checked at once; the caller should try again shortly."""


_T = TypeVar("_T")


class KeyDerivations:
    """scrypt off the event loop: a few threads, and a bound on the work waiting for them.

    A derivation takes 50-100 ms of CPU and 32 MiB; on the event loop, a handful of bad
    guesses stalled every console of the relay. Here at most `workers` run at once, at most
    `max_pending` wait, and past that a request is refused (503) rather than queued.
    """

    def __init__(self, workers: int = 2, max_pending: int = 32) -> None:
        self.workers = workers
        self.max_pending = max_pending
        self.pending = 0
        self._executor: ThreadPoolExecutor | None = None

    async def run(self, func: Callable[..., _T], *args: object) -> _T:
        if self.pending >= self.max_pending:
            raise DerivationsBusy("too many sign-ins are being checked; try again in a second")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="vncgate-kdf")
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)
        finally:
            self.pending -= 1

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


# --- signed values (session cookies) --------------------------------------------------------

def sign(key: bytes, payload: Mapping[str, object]) -> str:
    body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    mac = hmac.new(key, body.encode(), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}"


def unsign(keys: tuple[bytes, ...], value: str) -> dict[str, object] | None:
    """The payload if any key signed it, else None. Expiry is the caller's business."""
    body, dot, mac = value.partition(".")
    if not dot:
        return None
    try:
        given = _unb64(mac)
        for key in keys:
            if hmac.compare_digest(hmac.new(key, body.encode(), hashlib.sha256).digest(), given):
                payload = json.loads(_unb64(body))
                return payload if isinstance(payload, dict) else None
    except (ValueError, UnicodeDecodeError):
        return None
    return None


def session_cookie(key: bytes, user: str, ttl: float, now: float | None = None) -> str:
    issued = int(now if now is not None else time.time())
    return sign(key, {"typ": "session", "u": user, "iat": issued, "exp": issued + int(ttl),
                      "sid": secrets.token_hex(8)})


@dataclass(frozen=True, slots=True)
class SessionClaim:
    user: str
    expires: int
    sid: str


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
    return SessionClaim(user=user, expires=expires, sid=sid)


def user_from_cookie(key: bytes, value: str, now: float | None = None) -> str | None:
    claim = read_session_cookie(key, value, now)
    return claim.user if claim is not None else None


class Revoked:
    """Credentials ended before their expiry (signed-out cookies), remembered until then."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._until: dict[str, float] = {}

    def revoke(self, credential_id: str, expires: float, now: float | None = None) -> None:
        moment = now if now is not None else time.time()
        if len(self._until) >= self.max_entries:
            self._until = {k: exp for k, exp in self._until.items() if exp > moment}
            while len(self._until) >= self.max_entries:  # still full: forget the oldest
                del self._until[next(iter(self._until))]
        self._until[credential_id] = expires

    def __contains__(self, credential_id: str) -> bool:
        return credential_id in self._until


# --- trusted proxies and client addresses ---------------------------------------------------

def parse_networks(values: tuple[str, ...] | list[str], flag: str) -> tuple[Network, ...]:
    """CIDRs (vncgate.common.networks: IPv4-mapped ranges are the IPv4 range, as addresses
    are folded before they are checked, `address_in`)."""
    try:
        return parse_cidrs(values, flag)
    except NetworkError as exc:
        raise AuthConfigError(str(exc)) from None



# Never dialled, whatever --deny-cidr says: "this host" (0.0.0.0 and :: reach the loopback
# on Linux). IPv4-mapped and -compatible IPv6 forms are folded to IPv4 before any check.
UNSPECIFIED_NETWORKS: tuple[Network, ...] = (ipaddress.ip_network("0.0.0.0/8"),
                                             ipaddress.ip_network("::/128"))


def canonical_ip(address: str) -> IPAddress | None:
    """The one spelling of an address that range checks use, or None if it is not one.

    `::ffff:127.0.0.1` (IPv4-mapped) and `::127.0.0.1` (IPv4-compatible, deprecated but still
    routed by some stacks) are 127.0.0.1; a zone (`fe80::1%eth0`) is dropped; `::` and `::1`
    stay IPv6.
    """
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]").partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        packed = ip.packed
        if packed[:12] == bytes(12) and int.from_bytes(packed[12:], "big") > 1:
            return ipaddress.IPv4Address(packed[12:])
    return ip


def address_in(address: str | None, networks: tuple[Network, ...]) -> bool:
    """Whether an address lies in any of the networks, in every spelling of the address."""
    if not address:
        return False
    ip = canonical_ip(address)
    if ip is None:
        return False
    if any(ip.version == n.version and ip in n for n in networks):
        return True
    raw = ipaddress.ip_address(address.strip().strip("[]").partition("%")[0])
    return raw != ip and any(raw.version == n.version and raw in n for n in networks)


# --- failed-login rate limit ----------------------------------------------------------------

class FailureLimiter:
    """At most `limit` failures per client in `window` seconds; bounded in memory."""

    def __init__(self, limit: int = 5, window: float = 60.0, max_clients: int = 10_000) -> None:
        self.limit = limit
        self.window = window
        self.max_clients = max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, client: str, now: float) -> deque[float]:
        failures = self._failures.get(client)
        if failures is None:
            return deque()
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            del self._failures[client]
        return failures

    def retry_after(self, client: str, now: float | None = None) -> float:
        """Seconds until this client may try again; 0 if it may try now."""
        now = now if now is not None else time.monotonic()
        failures = self._recent(client, now)
        if len(failures) < self.limit:
            return 0.0
        return max(0.0, failures[0] + self.window - now)

    def failed(self, client: str, now: float | None = None) -> None:
        now = now if now is not None else time.monotonic()
        failures = self._failures.setdefault(client, deque())
        self._failures.move_to_end(client)
        failures.append(now)
        while len(failures) > self.limit:
            failures.popleft()
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)

