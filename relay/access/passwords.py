"""Password and token hashes (scrypt), checked off the event loop with a bound."""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

# scrypt: 2^15 x 8 x 1 takes about 50-100 ms and 32 MiB, so a guessed password costs a lot.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1


SCRYPT_MAXMEM = 64 * 1024 * 1024


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_secret(secret: str, salt: bytes | None = None) -> str:
    """`scrypt$N$r$p$salt$hash`: what `vncgate-relay hash-password` prints for a users file."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            maxmem=SCRYPT_MAXMEM, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt)}${b64(digest)}"


def verify_secret(given: str, stored: str) -> bool:
    """Check a secret against a users-file entry: an scrypt or sha256 hash, or plain text."""
    if stored.startswith("scrypt$"):
        try:
            _, n, r, p, salt, digest = stored.split("$")
            computed = hashlib.scrypt(given.encode(), salt=unb64(salt), n=int(n), r=int(r),
                                      p=int(p), maxmem=SCRYPT_MAXMEM, dklen=len(unb64(digest)))
        except ValueError:
            return False
        return hmac.compare_digest(computed, unb64(digest))
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
