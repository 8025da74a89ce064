"""The registration client: how the control plane (or a script) talks to a relay's internal port.

This is the relay's public client API; `vncgate.operator` uses it and nothing else of the relay's
internals besides `vncgate.common.model` and `vncgate.common.spec`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from vncgate.common.model import LoginOutcome, Route, login_outcome_from_json, route_from_json


class RelayError(Exception):
    """A relay replica could not be reached or did not accept a request."""

    def __init__(self, url: str, message: str, status: int | None = None) -> None:
        super().__init__(f"relay {url}: {message}")
        self.url = url
        self.status = status


@dataclass(slots=True)
class TableSnapshot:
    """What `GET /api/v1/targets` returns: the routes, their live session counts, the revision."""

    revision: str
    routes: dict[str, Route] = field(default_factory=dict)
    sessions: dict[str, int] = field(default_factory=dict)
    # Who is viewing each target on this replica (user names, or "anonymous").
    viewers: dict[str, list[str]] = field(default_factory=dict)
    synced: bool = False
    route_count: int = 0
    # Changes at every start of the replica (an empty table until it is filled again).
    boot: str = ""
    # The replica's last login per route with credentials or TLS (summary only).
    logins: dict[str, LoginOutcome] = field(default_factory=dict)


class RelayClient:
    """Talks to one relay replica's internal API. The caller owns the aiohttp session."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, token: str,
                 timeout: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = session
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def _request(self, method: str, path: str, body: Any = None,
                       headers: dict[str, str] | None = None) -> Any:
        url = f"{self.base_url}{path}"
        try:
            async with self._session.request(method, url, json=body,
                                             headers={**self._headers, **(headers or {})},
                                             timeout=self._timeout) as resp:
                if resp.status >= 400:
                    text = (await resp.text())[:500]
                    raise RelayError(self.base_url, f"{method} {path} -> {resp.status}: {text}",
                                     resp.status)
                if resp.content_type == "application/json":
                    return await resp.json()
                return None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RelayError(self.base_url, f"{method} {path} failed: {exc!r}") from exc

    async def put_route(self, route: Route) -> None:
        body = route.to_json()
        await self._request("PUT", f"/api/v1/targets/{route.namespace}/{route.name}", body)

    async def delete_route(self, namespace: str, name: str) -> None:
        """Remove one route; removing a route the replica does not have is not an error."""
        await self._request("DELETE", f"/api/v1/targets/{namespace}/{name}")

    async def replace_table(self, routes: Iterable[Route], if_revision: str | None = None) -> str:
        """Replace the replica's whole table; returns the revision it now holds.

        With `if_revision`, only if the replica still holds that revision: a RelayError with
        status 412 otherwise (its table changed since it was read)."""
        body = {"targets": [r.to_json() for r in routes]}
        headers = {"If-Match": f'"{if_revision}"'} if if_revision is not None else None
        reply = await self._request("PUT", "/api/v1/targets", body, headers)
        return str(reply["revision"])

    async def get_table(self) -> TableSnapshot:
        reply = await self._request("GET", "/api/v1/targets")
        snapshot = TableSnapshot(revision=str(reply["revision"]), synced=bool(reply.get("synced")),
                                 boot=str(reply.get("boot", "")))
        for item in reply["targets"]:
            route = route_from_json(item)
            snapshot.routes[route.key] = route
            snapshot.sessions[route.key] = int(item.get("activeSessions", 0))
            snapshot.viewers[route.key] = [str(v) for v in item.get("viewers", [])]
        snapshot.route_count = len(snapshot.routes)
        return snapshot

    async def get_summary(self) -> TableSnapshot:
        """Revision, route count and sessions only (no routes): what a resync needs to compare."""
        reply = await self._request("GET", "/api/v1/targets?view=summary")
        return TableSnapshot(
            revision=str(reply["revision"]), synced=bool(reply.get("synced")),
            boot=str(reply.get("boot", "")), route_count=int(reply.get("routes", 0)),
            sessions={str(k): int(v) for k, v in reply.get("sessions", {}).items()},
            viewers={str(k): [str(u) for u in v] for k, v in reply.get("viewers", {}).items()},
            logins={str(k): outcome for k, v in (reply.get("logins") or {}).items()
                    if (outcome := login_outcome_from_json(v)) is not None})
