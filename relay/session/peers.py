"""The other relay replicas, for the questions one replica cannot answer alone.

Sessions live in the replica that serves them; `kubectl vnc sessions` and `kill` (and the list
page's "end session") reach every replica: the replica that gets the request asks its peers on
their internal port (the registration token, which every replica already holds), and merges.

Peers are the addresses of the relay's headless Service, read from its EndpointSlices
(`--peer-service NS/NAME`; the chart sets it), or a fixed list (`--peer-url`, for a relay run
outside a cluster). Since each peer is sent the registration token, only slices the Service owns
count (the Service as their controlling owner, as for those the EndpointSlice controller
writes), never any slice that merely carries the service-name label. A replica recognises
itself by its pod name (`--identity`) in the slice's targetRef, and in any case by the
`replica` name in the answer, so nothing is counted twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from vncgate.common.addresses import http_url
from vncgate.common.kube import KubeClient

log = logging.getLogger("vncgate.peers")

INTERNAL_PORT_NAME = "internal"
DISCOVERY_TTL = 5.0
PEER_TIMEOUT = 3.0


@dataclass(frozen=True, slots=True)
class PeerAnswer:
    url: str
    body: Any


def made_for_service(body: Mapping[str, Any], service: str) -> bool:
    """Whether an EndpointSlice belongs to the Service: the Service is its controlling owner
    (as for the slices the EndpointSlice controller writes, and the garbage collector removes
    them with it).

    The registration token goes to every peer, so a slice that merely carries the label
    `kubernetes.io/service-name` (anyone who may create EndpointSlices in the namespace can
    write one, with any address) names no peer.
    """
    metadata = body.get("metadata") or {}
    return any(ref.get("kind") == "Service" and ref.get("apiVersion") == "v1"
               and ref.get("name") == service and ref.get("controller") is True
               for ref in metadata.get("ownerReferences") or ())


def peer_urls_from_slice(body: Mapping[str, Any], identity: str, default_port: int = 8081,
                         *, ready_only: bool = False) -> list[str]:
    """Internal URLs of the other replicas in one EndpointSlice (not terminating, not us;
    `ready_only`: nor those whose readiness is false)."""
    if body.get("addressType") not in ("IPv4", "IPv6"):
        return []
    port = default_port
    for item in body.get("ports") or ():
        if item.get("name") == INTERNAL_PORT_NAME and isinstance(item.get("port"), int):
            port = item["port"]
    urls = []
    for endpoint in body.get("endpoints") or ():
        conditions = endpoint.get("conditions") or {}
        if conditions.get("terminating") is True or (
                ready_only and conditions.get("ready") is False):
            continue
        target = endpoint.get("targetRef") or {}
        if target.get("kind") != "Pod":  # the chart's relays are pods, nothing else
            continue
        if target.get("name") == identity:
            continue
        for address in (endpoint.get("addresses") or ())[:1]:
            urls.append(http_url(address, port))
    return urls


class Peers:
    """Asks every other replica, concurrently, with a short timeout; says which did not answer."""

    def __init__(self, api_token: str | None, identity: str, urls: tuple[str, ...] = (),
                 service: tuple[str, str] | None = None, kube: KubeClient | None = None) -> None:
        self.api_token = api_token
        self.identity = identity
        self.static = tuple(u.rstrip("/") for u in urls)
        self.service = service
        self.kube = kube
        self._found: tuple[float, list[str]] = (0.0, [])
        self._not_ready: frozenset[str] = frozenset()
        self._http: aiohttp.ClientSession | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.static or self.service)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self.kube is not None:
            await self.kube.close()

    async def urls(self) -> list[str]:
        """The peers' internal URLs; a discovery that fails raises (the caller reports it)."""
        found = list(self.static)
        if self.service is not None and self.kube is not None:
            at, cached = self._found
            if time.monotonic() - at > DISCOVERY_TTL:
                namespace, name = self.service
                reply = await self.kube.request(
                    "GET", f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
                           f"?labelSelector=kubernetes.io%2Fservice-name%3D{name}")
                items = [item for item in reply.get("items") or ()
                         if made_for_service(item, name)]
                cached = sorted({url for item in items
                                 for url in peer_urls_from_slice(item, self.identity)})
                ready = {url for item in items
                         for url in peer_urls_from_slice(item, self.identity, ready_only=True)}
                self._found = (time.monotonic(), cached)
                self._not_ready = frozenset(cached) - ready
            found.extend(u for u in cached if u not in found)
        return found

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=PEER_TIMEOUT),
                headers={"Authorization": f"Bearer {self.api_token or ''}"})
        return self._http

    async def ask(self, method: str, path: str, body: Any = None, *, ready_only: bool = False
                  ) -> tuple[list[PeerAnswer], list[str]]:
        """Every peer's JSON answer to one internal request, and the peers that gave none.

        `ready_only`: leave out the replicas whose EndpointSlice says they are not ready (a
        crashed pod, whose memory is gone with it, that the Service sends nobody to)."""
        if not self.enabled:
            return [], []
        try:
            urls = await self.urls()
            if ready_only:
                urls = [url for url in urls if url not in self._not_ready]
        except Exception as exc:  # the answer says that the other replicas are missing
            log.warning("could not list the relay's peers", extra={"fields": {"error": str(exc)}})
            return [], ["the other relay replicas (could not list them: " + str(exc)[:100] + ")"]

        async def one(url: str) -> PeerAnswer | str:
            try:
                async with self._client().request(
                        method, url + path, data=None if body is None else json.dumps(body),
                        headers={"Content-Type": "application/json"}) as resp:
                    if resp.status >= 400:
                        return url
                    return PeerAnswer(url, await resp.json())
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.warning("a relay peer did not answer", extra={"fields": {
                    "peer": url, "error": type(exc).__name__}})
                return url

        results = await asyncio.gather(*(one(url) for url in urls))
        answers = [r for r in results if isinstance(r, PeerAnswer)]
        missing = [r for r in results if isinstance(r, str)]
        return answers, missing
