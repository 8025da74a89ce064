"""The route table: which targets this replica serves, and the sessions open to each.

Keyed by "namespace/name". The revision is kept up to date in O(1) per change (see
`vncgate.common.model.table_revision`), so the operator's resync can compare revisions cheaply.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Iterator

from vncgate.common.model import Route, xor_digest

# Called with (old, new) whenever a route changes or goes (new is None).
RouteListener = Callable[[Route, Route | None], None]


class Registry:
    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self._routes: dict[str, Route] = {}
        self._revision = bytes(32)
        self._listeners: list[RouteListener] = []
        # Set by the first full table (PUT /api/v1/targets) or by loading standalone manifests.
        self.synced = False
        # Differs at every start of the relay: an operator that sees it change knows the
        # replica lost its table (a restart) even before its revision says so.
        self.boot = secrets.token_hex(8)
        for route in routes:
            self.put(route)

    def add_listener(self, listener: RouteListener) -> None:
        self._listeners.append(listener)

    def get(self, namespace: str, name: str) -> Route | None:
        return self._routes.get(f"{namespace}/{name}")

    def __len__(self) -> int:
        return len(self._routes)

    def __iter__(self) -> Iterator[Route]:
        return iter(self._routes.values())

    @property
    def revision(self) -> str:
        return self._revision.hex()

    def put(self, route: Route) -> bool:
        """Add or replace one route; returns whether anything changed."""
        old = self._routes.get(route.key)
        if old == route:
            return False
        if old is not None:
            self._revision = xor_digest(self._revision, old.digest())
        self._routes[route.key] = route
        self._revision = xor_digest(self._revision, route.digest())
        if old is not None:
            self._notify(old, route)
        return True

    def delete(self, namespace: str, name: str) -> bool:
        old = self._routes.pop(f"{namespace}/{name}", None)
        if old is None:
            return False
        self._revision = xor_digest(self._revision, old.digest())
        self._notify(old, None)
        return True

    def replace(self, routes: Iterable[Route]) -> tuple[int, int, int]:
        """Make the table exactly `routes`; returns (added, changed, removed)."""
        wanted = {route.key: route for route in routes}
        removed = [key for key in self._routes if key not in wanted]
        for key in removed:
            namespace, _, name = key.partition("/")
            self.delete(namespace, name)
        added = changed = 0
        for key, route in wanted.items():
            existed = key in self._routes
            if self.put(route):
                changed += existed
                added += not existed
        self.synced = True
        return added, changed, len(removed)

    def _notify(self, old: Route, new: Route | None) -> None:
        for listener in self._listeners:
            listener(old, new)
