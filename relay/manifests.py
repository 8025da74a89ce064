"""Standalone mode: VncTarget manifests from files, read into routes.

The same YAML that `kubectl apply` takes. Only `endpoint.address` can work without a cluster:
targets with `endpoint.service` or `endpoint.kubevirt` are skipped with a warning, so one folder
of manifests serves both. Every error names the file, the document's
index in it and the field, and the relay refuses to start on them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from vncgate.common.addresses import Address
from vncgate.common.model import Route
from vncgate.common.spec import (
    API_GROUP,
    API_VERSION,
    KIND,
    SpecError,
    check_name,
    check_namespace,
    parse_labels,
    parse_spec,
)

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
log = logging.getLogger("vncgate.relay")


class NeedsCluster(Exception):
    """A valid VncTarget whose `endpoint.service` or `endpoint.kubevirt` only the operator
    can resolve."""


class ManifestError(ValueError):
    """Every problem found in the manifests, one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def manifest_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in MANIFEST_SUFFIXES and p.is_file())
    if path.is_file():
        return [path]
    raise ManifestError([f"{path}: no such file or folder"])


def route_from_manifest(doc: Mapping[str, Any]) -> Route:
    api_version = doc.get("apiVersion")
    if api_version != f"{API_GROUP}/{API_VERSION}":
        raise SpecError("apiVersion", f"{api_version!r}; write {API_GROUP}/{API_VERSION}")
    if doc.get("kind") != KIND:
        raise SpecError("kind", f"{doc.get('kind')!r}; write {KIND}")
    metadata = doc.get("metadata")
    if not isinstance(metadata, Mapping):
        raise SpecError("metadata", "missing; give metadata.name (and metadata.namespace)")
    name = check_name(metadata.get("name"))
    namespace = check_namespace(metadata.get("namespace", "default"))
    spec = parse_spec(doc.get("spec"))
    if not isinstance(spec.endpoint, Address):
        raise NeedsCluster(f"{namespace}/{name}")
    return Route(namespace=namespace, name=name, host=spec.endpoint.host,
                 port=spec.endpoint.port, display_name=spec.display_name, view_only=spec.view_only,
                 access=spec.access, sessions=spec.sessions, recording=spec.recording,
                 credentials=spec.credentials, tls=spec.tls,
                 labels=parse_labels(metadata.get("labels")), thumbnail=spec.thumbnail)


def load_routes(paths: Iterable[Path], extra: Iterable[Route] = ()) -> list[Route]:
    """Read every manifest under `paths`; raise `ManifestError` listing all problems found."""
    problems: list[str] = []
    routes: dict[str, tuple[Route, str]] = {}

    def add(route: Route, where: str) -> None:
        if route.key in routes:
            problems.append(f"{where}: {route.key} is also defined at {routes[route.key][1]}")
        else:
            routes[route.key] = (route, where)

    files: list[Path] = []
    for path in paths:
        try:
            files.extend(manifest_files(path))
        except ManifestError as exc:
            problems.extend(exc.problems)
    for file in files:
        try:
            docs = list(yaml.safe_load_all(file.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{file}: cannot read: {exc}")
            continue
        except yaml.YAMLError as exc:
            problems.append(f"{file}: not valid YAML: {exc}".replace("\n", " "))
            continue
        for index, doc in enumerate(docs):
            where = f"{file} document {index}"
            if doc is None:
                continue  # an empty document between '---' separators
            if not isinstance(doc, Mapping):
                problems.append(f"{where}: expected a VncTarget, found {type(doc).__name__}")
                continue
            if doc.get("kind") == "List" and isinstance(doc.get("items"), list):
                items = [(f"{where} items[{i}]", item) for i, item in enumerate(doc["items"])]
            else:
                items = [(where, doc)]
            for item_where, item in items:
                try:
                    if not isinstance(item, Mapping):
                        raise SpecError("item", "expected a VncTarget mapping")
                    add(route_from_manifest(item), item_where)
                except NeedsCluster as exc:
                    # The same folder serves a cluster and the standalone relay: skip, say so.
                    log.warning("skipped %s (%s): endpoint.service or endpoint.kubevirt needs "
                                "the operator in a cluster; the standalone relay serves "
                                "endpoint.address targets", exc, item_where)
                except SpecError as exc:
                    problems.append(f"{item_where}: {exc.field}: {exc.message}")
    for route in extra:
        add(route, f"--target {route.key}")
    if problems:
        raise ManifestError(problems)
    return [route for route, _ in routes.values()]
