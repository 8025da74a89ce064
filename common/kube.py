"""A small async client for the few Kubernetes API calls the relay and the operator make.

SubjectAccessReviews (vncgate.relay.access.authz), Leases (vncgate.relay.session.consoles),
and the operator's status patches and Events (vncgate.operator.kubeapi builds on it).
Credentials come from a kubeconfig or the pod's ServiceAccount, loaded by the official
`kubernetes` package; requests go through aiohttp, so the relay never blocks its event loop on
the API.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from vncgate.common.kubetls import KubeConfigError, ssl_context_for

__all__ = ["KubeClient", "KubeConfigError", "KubeConnection", "KubeError", "KubePool",
           "kube_connection"]


# The most one watch event (one object, as JSON) may be. The API server stores objects of at
# most ~1.5 MiB (etcd's default request limit), and a VirtualMachine with large cloud-init user
# data comes close; aiohttp's own line reader would refuse anything over 128 KiB.
MAX_WATCH_EVENT = 16 * 1024 * 1024


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class WatchEventTooLarge(KubeError):
    """One line of a watch stream is over the reader's limit (status 413: too large)."""

    def __init__(self, where: str, limit: int) -> None:
        Exception.__init__(self, f"an event of the watch of {where} is longer than {limit} "
                                 "bytes, the most this reader takes for one object; no API "
                                 "server with its default limits stores an object that large")
        self.status = 413


async def json_lines(chunks: AsyncIterable[bytes], where: str,
                     limit: int = MAX_WATCH_EVENT) -> AsyncIterator[Any]:
    """The JSON documents of a stream of newline-separated lines (a watch), read in whatever
    chunks arrive: a line may span any number of them, up to `limit` bytes
    (WatchEventTooLarge past it); blank lines are skipped."""
    pending = bytearray()
    async for chunk in chunks:
        # A line starts at the buffer's start; the bytes already there hold no newline.
        start, scan = 0, len(pending)
        pending += chunk
        while (end := pending.find(b"\n", scan)) >= 0:
            if end - start > limit:
                raise WatchEventTooLarge(where, limit)
            line = pending[start:end]
            start = scan = end + 1
            if line.strip():
                yield json.loads(line)
        del pending[:start]
        if len(pending) > limit:
            raise WatchEventTooLarge(where, limit)
    if pending.strip():
        yield json.loads(pending)


@dataclass(frozen=True)
class KubeConnection:
    server: str
    ssl_context: ssl.SSLContext | bool
    configuration: Any  # kubernetes.client.Configuration: holds the token and its refresh hook

    def headers(self) -> dict[str, str]:
        # Runs the refresh hook first: in a pod it re-reads the projected ServiceAccount token.
        token = self.configuration.get_api_key_with_prefix("BearerToken")
        if not token:
            return {}
        # kubeconfig tokens come as "Bearer <token>" already; in-cluster ones may not.
        return {"Authorization": token if token.lower().startswith("bearer ")
                else f"Bearer {token}"}


def kube_connection(kubeconfig: Path | None, context_name: str | None = None) -> KubeConnection:
    """Credentials from a kubeconfig file (its current context, or `context_name`), or the pod's own
    ServiceAccount in a cluster. An exec credential plugin or OIDC provider in the kubeconfig is
    run by the `kubernetes` package, as kubectl runs it."""
    # Imported here: the kubernetes package costs ~20 MiB, which a standalone relay never needs.
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    configuration = client.Configuration()
    try:
        if kubeconfig is not None:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=str(kubeconfig), context=context_name,
                client_configuration=configuration)
        else:
            config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration)
    except (ConfigException, OSError) as exc:
        raise KubeConfigError(str(exc)) from None
    return KubeConnection(server=configuration.host.rstrip("/"),
                          ssl_context=ssl_context_for(configuration),
                          configuration=configuration)


# Requests a pool has under way to the API server at once, each on a connection of its own.
# Reviews take milliseconds, so 16 kept-alive connections carry hundreds a second; a burst past
# that waits for a free one (within each request's timeout) instead of opening a TLS connection
# per request (~128 KiB of buffers each in the relay, and a handshake in the API server).
# aiohttp's default pool allows 100 per host and client: one relay with five clients held 226.
DEFAULT_MAX_CONNECTIONS = 16
# Seconds an idle connection is kept for the next request: aiohttp's default, shorter than the
# API server's idle timeout (90 s) and the usual load balancers' in front of it, so the client is
# the side that closes (a POST, which aiohttp does not retry, is not sent on a connection the
# server is closing).
KEEPALIVE = 15.0


class KubePool:
    """The HTTP connections to the API server that KubeClients share.

    Requests (`KubeClient.request`) go through at most `max_connections` connections, kept alive
    and reused; one that finds them all busy waits for one within its own timeout, so a burst
    costs time, not connections, and a request that does not get one in time fails like one the
    API server did not answer. Watches (`KubeClient.watch`) each hold a connection for minutes:
    they have a pool of their own, so that they never take the requests' slots. Their number is
    set by the code and the configuration (a relay keeps two; the operator one per KubeVirt
    kind and watched namespace), not by the load.
    """

    def __init__(self, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        self.max_connections = max_connections
        self._requests: aiohttp.ClientSession | None = None
        self._watches: aiohttp.ClientSession | None = None

    def requests(self) -> aiohttp.ClientSession:
        if self._requests is None:
            self._requests = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                limit=self.max_connections, limit_per_host=0, keepalive_timeout=KEEPALIVE))
        return self._requests

    def watches(self) -> aiohttp.ClientSession:
        if self._watches is None:
            # limit=0: no bound of its own (see the class's comment); never waits for a slot.
            self._watches = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                limit=0, keepalive_timeout=KEEPALIVE))
        return self._watches

    async def close(self) -> None:
        for session in (self._requests, self._watches):
            if session is not None:
                await session.close()
        self._requests = self._watches = None


class KubeClient:
    """JSON requests to the API server; the caller closes it.

    Its connections are `pool`'s, shared with other clients (whoever made the pool closes it),
    or without one a pool of its own of `max_connections`, closed with the client."""

    def __init__(self, connection: KubeConnection, timeout: float = 5.0,
                 pool: KubePool | None = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 sent_timeout: float | None = None) -> None:
        self.connection = connection
        if sent_timeout is None:
            # total: from the call to the reply read, waiting for a free connection included.
            self._timeout = aiohttp.ClientTimeout(total=timeout)
        else:
            # `timeout` to have a connection (a free one of the pool, or a new one); once the
            # request is sent, `sent_timeout` more for its reply. A request given up after it
            # was sent costs its connection (it cannot carry another request), and a new one
            # costs the API server a TLS handshake: under overload, giving up early turns into
            # more load (bench.scale, docs/PERFORMANCE.md).
            self._timeout = aiohttp.ClientTimeout(total=timeout + sent_timeout, connect=timeout)
        self._own_pool = pool is None
        self.pool = pool if pool is not None else KubePool(max_connections)

    async def close(self) -> None:
        if self._own_pool:
            await self.pool.close()

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        """The decoded reply; KubeError for any status >= 400 (404 included).

        PATCH is a JSON merge patch; a `metadata.resourceVersion` in it makes the API server
        refuse (409) when the object changed since it was read.
        """
        headers = self.connection.headers()
        data = None
        if body is not None:
            headers["Content-Type"] = ("application/merge-patch+json" if method == "PATCH"
                                       else "application/json")
            data = json.dumps(body)
        async with self.pool.requests().request(
                method, f"{self.connection.server}{path}", data=data, headers=headers,
                ssl=self.connection.ssl_context, timeout=self._timeout) as resp:
            if resp.status >= 400:
                raise KubeError(resp.status, (await resp.text())[:300])
            return await resp.json(content_type=None)

    async def watch(self, path: str, timeout_seconds: int = 300) -> AsyncIterator[dict[str, Any]]:
        """Events of a watch (`?watch=true`), until the server ends it."""
        separator = "&" if "?" in path else "?"
        url = (f"{self.connection.server}{path}{separator}watch=true"
               f"&timeoutSeconds={timeout_seconds}")
        async with self.pool.watches().get(
                url, headers=self.connection.headers(), ssl=self.connection.ssl_context,
                timeout=aiohttp.ClientTimeout(total=timeout_seconds + 30,
                                              sock_read=timeout_seconds + 30)) as resp:
            if resp.status >= 400:
                raise KubeError(resp.status, (await resp.text())[:300])
            # Not `async for line in resp.content`: aiohttp limits a line to 128 KiB, and one
            # object over it would end every watch at the same event for ever.
            async for event in json_lines(resp.content.iter_any(), path):
                if isinstance(event, dict):
                    yield event
