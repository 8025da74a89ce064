"""Run a relay: both ports, one shared state. Used by the CLI and, in-process, by the tests."""

from __future__ import annotations

import asyncio
import os
import socket
from types import TracebackType

from aiohttp import web

from vncgate.common.addresses import Address, http_url
from vncgate.common.model import Route
from vncgate.relay.session.registry import Registry
from vncgate.relay.settings import RelaySettings
from vncgate.relay.state import RelayState
from vncgate.relay.web.internal import make_internal_app, make_metrics_app
from vncgate.relay.web.public import make_public_app
from vncgate.relay.web.tls import ReloadingTls


def _url(site: web.TCPSite) -> str:
    server = site._server  # aiohttp exposes the bound port (for port 0) only here
    assert server is not None
    sockets: list[socket.socket] = list(getattr(server, "sockets", []) or [])
    host, port = sockets[0].getsockname()[:2]
    return http_url(host, port)


class RelayServer:
    """`async with RelayServer(settings, routes) as relay:` binds both ports (port 0: any free).

    `routes` fill the table at start (standalone mode) and mark it synced.
    """

    def __init__(self, settings: RelaySettings, routes: list[Route] | None = None) -> None:
        registry = Registry(routes or ())
        registry.synced = routes is not None
        self.state = RelayState(settings=settings, registry=registry)
        self._runners: list[web.AppRunner] = []
        self.public_url = ""
        self.internal_url = ""
        # With --metrics-listen: where /metrics is served; else "" (on the internal port).
        self.metrics_url = ""
        self.tls: ReloadingTls | None = None
        self._tls_watch: asyncio.Task[None] | None = None
        self._users_watch: asyncio.Task[None] | None = None

    @property
    def registry(self) -> Registry:
        return self.state.registry

    async def _serve(self, app: web.Application, where: Address,
                     tls: ReloadingTls | None = None) -> str:
        # keepalive_timeout also closes a connection whose request headers are still
        # incomplete after that long (aiohttp's default is an hour); bodies are read under
        # the same timeout by the handlers that read them.
        runner = web.AppRunner(app, access_log=None,
                               shutdown_timeout=self.state.settings.shutdown_grace,
                               keepalive_timeout=self.state.settings.http_read_timeout)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, where.host, where.port, reuse_address=True,
                           ssl_context=tls.context if tls is not None else None)
        await site.start()
        url = _url(site)
        return "https://" + url.removeprefix("http://") if tls is not None else url

    async def start(self) -> None:
        try:
            settings = self.state.settings
            if settings.tls_cert is not None and settings.tls_key is not None:
                self.tls = ReloadingTls(settings.tls_cert, settings.tls_key)
                self._tls_watch = asyncio.create_task(
                    self.tls.watch(settings.tls_reload_interval))
            if settings.auth.users_file is not None:
                self._users_watch = asyncio.create_task(self._watch_users())
            await self.state.consoles.start(self.state.console_taken)
            await self.state.start_shared()
            if settings.kubeconfig is not None or os.environ.get("KUBERNETES_SERVICE_HOST"):
                self.state.kubevirt.warm()  # the first KubeVirt console need not wait for it
            self.public_url = await self._serve(make_public_app(self.state),
                                                self.state.settings.listen, self.tls)
            self.internal_url = await self._serve(make_internal_app(self.state),
                                                  self.state.settings.internal_listen)
            if settings.metrics_listen is not None:
                self.metrics_url = await self._serve(make_metrics_app(self.state),
                                                     settings.metrics_listen)
        except BaseException:
            await self.stop()
            raise

    async def _watch_users(self) -> None:
        """Look at --users-file for changes; the users and sessions follow without a restart."""
        while True:
            await asyncio.sleep(self.state.settings.users_reload_interval)
            self.state.reload_users()

    async def stop(self) -> None:
        """Close every session with 1001, then both ports."""
        for watch in (self._tls_watch, self._users_watch):
            if watch is not None:
                watch.cancel()
        self._tls_watch = self._users_watch = None
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        await self.state.consoles.close()
        await self.state.close_shared()
        await self.state.logins.close()
        if self.state.oidc is not None:
            await self.state.oidc.close()
        await self.state.kube.close()

    async def __aenter__(self) -> RelayServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
