"""Relay replicas from the EndpointSlices of the relay's headless Service.

The headless Service publishes not-ready addresses, so a starting replica is listed (and filled
with routes) before it turns ready; a terminating one is skipped: it takes no new sessions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from vncgate.common.addresses import http_url

INTERNAL_PORT_NAME = "internal"


def relay_urls_from_slice(body: Mapping[str, Any], default_port: int) -> tuple[str, ...]:
    """Internal-API URLs of the replicas in one EndpointSlice, on the port named `internal`."""
    if body.get("addressType") not in ("IPv4", "IPv6"):
        return ()  # FQDN slices name no pod
    port = default_port
    for item in body.get("ports") or ():
        if item.get("name") == INTERNAL_PORT_NAME and isinstance(item.get("port"), int):
            port = item["port"]
    urls: list[str] = []
    for endpoint in body.get("endpoints") or ():
        conditions = endpoint.get("conditions") or {}
        if conditions.get("terminating") is True:
            continue
        for address in (endpoint.get("addresses") or ())[:1]:  # all addresses are one pod
            urls.append(http_url(address, port))
    return tuple(sorted(set(urls)))


def union_urls(per_slice: Iterable[Iterable[str]]) -> frozenset[str]:
    return frozenset(url for urls in per_slice for url in urls)
