"""The console list: which of the consoles a user may open match their search, in what state,
who is on them, one page at a time.

The search and filters live in the URL query (`q`, `namespace`, `phase`, `label`, `page`,
`per`), so a filtered list can be bookmarked and shared, and the HTML page and its JSON
(`GET /api/v1/consoles`) take the same query. Work per request is O(routes the user may open)
for authorization, status and filtering, and O(page) for everything shown; nothing is rendered
for the rows of other pages.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlencode

from vncgate.common.model import Route
from vncgate.relay.session.health import PHASES, READY, UNKNOWN, TargetHealth

PER_PAGE = (25, 50, 100, 200)
DEFAULT_PER_PAGE = 50
MAX_SEARCH = 200


class ListQueryError(ValueError):
    """A query the list cannot use; the message says which parameter and what to write."""


@dataclass(frozen=True, slots=True)
class ListQuery:
    q: str = ""
    namespace: str = ""
    phase: str = ""
    # `key` (has the label) or `key=value`.
    label: str = ""
    page: int = 1
    per: int = DEFAULT_PER_PAGE

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> ListQuery:
        def text(name: str) -> str:
            value = query.get(name, "").strip()
            if len(value) > MAX_SEARCH:
                raise ListQueryError(f"{name}: at most {MAX_SEARCH} characters")
            return value

        phase = text("phase")
        if phase and phase not in PHASES:
            raise ListQueryError(f"phase: {phase!r} is not one of {', '.join(PHASES)}")
        page_text, per_text = query.get("page", "1"), query.get("per", str(DEFAULT_PER_PAGE))
        if not page_text.isdigit() or int(page_text) < 1:
            raise ListQueryError(f"page: {page_text!r}; write a page number from 1")
        if not per_text.isdigit() or int(per_text) not in PER_PAGE:
            raise ListQueryError(f"per: {per_text!r}; write one of "
                                 f"{', '.join(map(str, PER_PAGE))}")
        return cls(q=text("q"), namespace=text("namespace"), phase=phase, label=text("label"),
                   page=min(int(page_text), 1_000_000), per=int(per_text))

    def params(self, **changes: Any) -> dict[str, str]:
        """The query as URL parameters, defaults left out."""
        query = replace(self, **changes)
        values = {"q": query.q, "namespace": query.namespace, "phase": query.phase,
                  "label": query.label}
        params = {key: value for key, value in values.items() if value}
        if query.per != DEFAULT_PER_PAGE:
            params["per"] = str(query.per)
        if query.page != 1:
            params["page"] = str(query.page)
        return params

    def url(self, **changes: Any) -> str:
        """A relative link to the list with this query changed ('?' alone: no filters)."""
        return "?" + urlencode(self.params(**changes))

    @property
    def filtered(self) -> bool:
        return bool(self.q or self.namespace or self.phase or self.label)

    def matches_label(self, labels: Mapping[str, str]) -> bool:
        if not self.label:
            return True
        key, eq, value = self.label.partition("=")
        key = key.strip()
        if not eq:
            return key in labels
        return labels.get(key) == value.strip()

    def matches_text(self, route: Route, labels: Mapping[str, str]) -> bool:
        if not self.q:
            return True
        words = self.q.casefold().split()
        haystack = " ".join([route.namespace, route.name, route.display_name,
                             *(f"{k}={v}" for k, v in labels.items())]).casefold()
        return all(word in haystack for word in words)


@dataclass(slots=True)
class ConsoleRow:
    """One console as the list shows it (and its JSON gives it)."""

    route: Route
    phase: str
    reason: str
    message: str
    seen_at: float | None
    # Who is on it: {"user", "mode": "control"|"view"}, oldest first.
    viewers: list[dict[str, str]] = field(default_factory=list)
    # For those who may see the sessions (RBAC `sessions`): the full session records.
    live: list[dict[str, Any]] | None = None
    can_end: bool = False

    @property
    def title(self) -> str:
        return self.route.display_name or self.route.name

    @property
    def seen(self) -> str:
        if self.seen_at is None:
            return ""
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.seen_at))

    def to_json(self) -> dict[str, Any]:
        route = self.route
        return {"namespace": route.namespace, "name": route.name,
                "displayName": route.display_name, "url": f"t/{route.namespace}/{route.name}/",
                "viewOnly": route.view_only, "phase": self.phase, "reason": self.reason,
                "message": self.message, "seenAt": self.seen_at, "viewers": self.viewers,
                "labels": dict(route_labels(route))}


@dataclass(slots=True)
class ConsolePage:
    query: ListQuery
    rows: list[ConsoleRow]
    total: int  # matching the query, over all pages
    page: int
    pages: int
    # Facets over what the user may open: namespaces, and phase counts under the other filters.
    namespaces: list[str]
    phases: dict[str, int]
    # Consoles left out because the API server did not answer whether the user may open them.
    unchecked: int = 0

    @property
    def first(self) -> int:
        return (self.page - 1) * self.query.per + 1 if self.total else 0

    @property
    def last(self) -> int:
        return min(self.total, self.page * self.query.per)

    def groups(self) -> list[tuple[str, list[ConsoleRow]]]:
        """The page's rows by namespace, in order (rows are sorted by namespace, name)."""
        groups: list[tuple[str, list[ConsoleRow]]] = []
        for row in self.rows:
            if not groups or groups[-1][0] != row.route.namespace:
                groups.append((row.route.namespace, []))
            groups[-1][1].append(row)
        return groups

    def to_json(self) -> dict[str, Any]:
        return {"total": self.total, "page": self.page, "pages": self.pages,
                "per": self.query.per, "query": self.query.params(page=1, per=self.query.per),
                "namespaces": self.namespaces, "phases": self.phases,
                "unchecked": self.unchecked,
                "consoles": [row.to_json() for row in self.rows]}


def route_labels(route: Route) -> Mapping[str, str]:
    return dict(route.labels)


def status_of(route: Route, health: TargetHealth, open_sessions: int
              ) -> tuple[str, str, str, float | None]:
    """(phase, reason, message, when) from what this relay knows."""
    seen = health.get(route.key)
    if open_sessions and (seen is None or seen.phase == READY):
        return READY, "InUse", "open sessions through this relay", seen.at if seen else None
    if seen is None:
        return UNKNOWN, "NotOpenedYet", "not opened through this relay since it started", None
    return seen.phase, seen.reason, seen.message, seen.at


def viewers_by_target(sessions: Iterable[Mapping[str, Any]]) -> dict[str, list[dict[str, str]]]:
    """Who is on each target, from session records (every replica's)."""
    found: dict[str, list[dict[str, str]]] = {}
    for item in sessions:
        key = f"{item.get('namespace')}/{item.get('name')}"
        found.setdefault(key, []).append({
            "user": str(item.get("user") or "anonymous"),
            "mode": "view" if item.get("viewOnly") else "control"})
    return found


def build_page(query: ListQuery, routes: list[Route], health: TargetHealth,
               viewers: Mapping[str, list[dict[str, str]]], unchecked: int = 0) -> ConsolePage:
    """The page of `routes` (those the user may open) that `query` asks for; `unchecked`:
    how many consoles were left out because their check could not be made."""
    namespaces = sorted({route.namespace for route in routes})
    matches: list[tuple[str, str, Route, tuple[str, str, str, float | None]]] = []
    phases = dict.fromkeys(PHASES, 0)
    no_viewers: list[dict[str, str]] = []
    for route in routes:
        if query.namespace and route.namespace != query.namespace:
            continue
        if query.q or query.label:
            labels = route_labels(route)
            if not query.matches_label(labels) or not query.matches_text(route, labels):
                continue
        status = status_of(route, health, len(viewers.get(route.key, no_viewers)))
        phases[status[0]] += 1
        if query.phase and status[0] != query.phase:
            continue
        matches.append((route.namespace, route.name, route, status))
    matches.sort(key=lambda match: (match[0], match[1]))
    pages = max(1, math.ceil(len(matches) / query.per))
    page = min(query.page, pages)
    start = (page - 1) * query.per
    # Rows only for the page shown.
    rows = [ConsoleRow(route, *status, viewers.get(route.key, []))
            for _, _, route, status in matches[start:start + query.per]]
    return ConsolePage(query=query, rows=rows, total=len(matches), page=page, pages=pages,
                       namespaces=namespaces, phases=phases, unchecked=unchecked)
