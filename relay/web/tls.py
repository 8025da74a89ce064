"""TLS on the public port (`--tls-cert`, `--tls-key`), reloaded when the files change.

For a relay that runs without an Ingress in front, as websockify's `--cert/--key` users run it.
The files are checked on a timer (size, mtime and inode of each, following symlinks, so a
Kubernetes Secret volume's symlink swap counts too) and loaded into a new `SSLContext` that
every new connection then gets (see `ReloadingTls`); open connections keep theirs. A pair
that does not load (a half-written file, a key that does not match) is logged and retried on
the next tick; the old pair stays in service.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from pathlib import Path

log = logging.getLogger("vncgate.relay")

# HSTS on every response of a TLS listener: browsers then refuse plain http to this host.
HSTS = "max-age=31536000"


class TlsError(Exception):
    """The certificate or key cannot be used; the message says which file and why."""


def _stamp(path: Path) -> tuple[int, int, int]:
    info = os.stat(path)
    return info.st_mtime_ns, info.st_size, info.st_ino


def _server_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class ReloadingTls:
    """The listener's `SSLContext` for one certificate chain and key, and the watch that
    reloads them.

    Each load makes a new context, whole, and only a context that loaded is put in service:
    the listener's context hands every new connection the newest good one from its SNI
    callback (which OpenSSL calls for every ClientHello, with or without a server name). A
    context is never changed in place: a failed `load_cert_chain` leaves a context with the
    new certificate and the old key, which fails every handshake.
    """

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key
        self.loaded: tuple[tuple[int, int, int], ...] = ()
        self.current = self._load()
        self.context = self.current
        self.context.sni_callback = self._pick

    def _pick(self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
              context: ssl.SSLContext) -> None:
        if self.current is not context:
            connection.context = self.current

    def _stamps(self) -> tuple[tuple[int, int, int], ...]:
        return _stamp(self.cert), _stamp(self.key)

    def _load(self) -> ssl.SSLContext:
        context = _server_context()
        try:
            stamps = self._stamps()
            context.load_cert_chain(self.cert, self.key)
        except FileNotFoundError as exc:
            raise TlsError(f"{exc.filename}: no such file; check --tls-cert and --tls-key"
                           ) from None
        except OSError as exc:
            raise TlsError(f"{exc.filename or self.cert}: {exc.strerror or exc}") from None
        except ssl.SSLError as exc:
            raise TlsError(
                f"--tls-cert {self.cert} / --tls-key {self.key}: not a PEM certificate chain "
                f"and its private key ({exc.reason or exc}); the key must match the first "
                "certificate") from None
        self.loaded = stamps
        return context

    def reload_if_changed(self) -> bool:
        """Load the files if they changed since the last load; True when a new pair is in use."""
        try:
            if self._stamps() == self.loaded:
                return False
            self.current = self._load()
        except (OSError, TlsError) as exc:
            log.error("TLS certificate not reloaded, the previous one stays in use: %s", exc)
            return False
        log.info("TLS certificate reloaded", extra={"fields": {"cert": str(self.cert)}})
        return True

    async def watch(self, interval: float) -> None:
        """Check the files every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.reload_if_changed()  # a few kilobytes to read and parse
