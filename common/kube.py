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

__all__ = ["KubeClient", "KubeConfigError", "KubeConnection", "KubeError", "kube_connection"]


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


class KubeClient:
    """JSON requests to the API server; the caller closes it."""

    def __init__(self, connection: KubeConnection, timeout: float = 5.0) -> None:
        self.connection = connection
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

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
        async with self._http().request(
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
        async with self._http().get(
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
