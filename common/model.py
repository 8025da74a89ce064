"""Routes: what the relay knows about a target, and their JSON form on the registration API.

A route is a resolved endpoint (host and port the relay dials) plus what the viewer needs. The
operator builds routes from VncTargets and PUTs them; the standalone relay builds them from
manifests. Both sides compute the same table revision, so a full resync can be skipped when a
replica already holds the table.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import KW_ONLY, dataclass
from typing import Any, TypeVar

from vncgate.common.addresses import host_port
from vncgate.common.spec import (
    DEFAULT_SESSIONS,
    MAX_DISPLAY_NAME,
    Access,
    Credentials,
    RecordingPolicy,
    SessionPolicy,
    SpecError,
    TlsSpec,
    check_host,
    check_name,
    check_namespace,
    check_port,
    parse_access,
    parse_credentials,
    parse_labels,
    parse_recording,
    parse_sessions,
    parse_thumbnail,
    parse_tls,
)

EMPTY_REVISION = "0" * 64
_Ref = TypeVar("_Ref", Credentials, TlsSpec)


@dataclass(frozen=True, slots=True)
class Route:
    namespace: str
    name: str
    host: str
    port: int
    # The rest by keyword only: a value given by position cannot land in the wrong field (the
    # fields grow; docs/EMBEDDING.md shows a subset).
    _: KW_ONLY
    display_name: str = ""
    view_only: bool = False
    # Who may open it when the relay authorizes from manifests (standalone); None: anyone
    # authenticated. In a cluster RBAC decides and the operator sends no access lists.
    access: Access | None = None
    sessions: SessionPolicy = DEFAULT_SESSIONS
    recording: RecordingPolicy | None = None  # spec.recording; None: the relay's default
    # The relay answers the server's security with these (relay.rfbsecurity); names, not secrets.
    credentials: Credentials | None = None
    tls: TlsSpec | None = None
    # endpoint.kubevirt: the VirtualMachineInstance (in `namespace`) whose vnc subresource the
    # relay opens through the API server; host and port are then unused ("", 0).
    kubevirt: str | None = None
    # Resolved from endpoint.service (a Service of the namespace with a cluster IP, or
    # headless): the network-reach grants do not apply, as they do to endpoint.address.
    service: bool = False
    # metadata.labels, sorted (key, value) pairs: the console list filters by them.
    labels: tuple[tuple[str, str], ...] = ()
    # spec.thumbnail.enabled: the console list shows a small image of the screen.
    thumbnail: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def address(self) -> str:
        if self.kubevirt is not None:
            return f"kubevirt/{self.namespace}/{self.kubevirt}"
        return host_port(self.host, self.port)

    @property
    def endpoint_json(self) -> dict[str, Any]:
        if self.kubevirt is not None:
            return {"kubevirt": {"namespace": self.namespace, "name": self.kubevirt}}
        if self.service:
            return {"host": self.host, "port": self.port, "service": True}
        return {"host": self.host, "port": self.port}

    def to_json(self) -> dict[str, Any]:
        """The wire form: the body of `PUT /api/v1/targets/{ns}/{name}` plus the key."""
        body: dict[str, Any] = {
            "namespace": self.namespace,
            "name": self.name,
            "endpoint": self.endpoint_json,
            "displayName": self.display_name,
            "viewOnly": self.view_only,
        }
        if self.access is not None:
            body["access"] = {"users": list(self.access.users),
                              "groups": list(self.access.groups)}
        if self.sessions != DEFAULT_SESSIONS:
            body["sessions"] = self.sessions.to_json()
        if self.recording is not None:
            body["recording"] = self.recording.to_json()
        if self.credentials is not None:
            body["credentials"] = self.credentials.to_json()
        if self.tls is not None:
            body["tls"] = self.tls.to_json()
        if self.labels:  # absent when empty: the digests of routes without labels stay put
            body["labels"] = dict(self.labels)
        if self.thumbnail:
            body["thumbnail"] = {"enabled": True}
        return body

    def digest(self) -> bytes:
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).digest()


def route_from_json(body: object, namespace: str | None = None, name: str | None = None) -> Route:
    """Parse a route from the registration API; the path gives the key when the body does not.

    Unknown fields are ignored so that a newer operator can talk to an older relay during a
    rolling upgrade; known fields are checked strictly.
    """
    if not isinstance(body, Mapping):
        raise SpecError("body", "must be a JSON object")
    ns = namespace if namespace is not None else body.get("namespace")
    nm = name if name is not None else body.get("name")
    endpoint = body.get("endpoint")
    if not isinstance(endpoint, Mapping):
        raise SpecError("endpoint", 'must be an object like {"host": "10.0.0.5", "port": 5900}')
    display_name = body.get("displayName", "")
    if not isinstance(display_name, str) or len(display_name) > MAX_DISPLAY_NAME:
        raise SpecError("displayName", f"must be a string of at most {MAX_DISPLAY_NAME} characters")
    view_only = body.get("viewOnly", False)
    if not isinstance(view_only, bool):
        raise SpecError("viewOnly", "must be true or false")
    namespace = check_namespace(ns, "namespace")
    kubevirt = _kubevirt(endpoint, namespace)
    service = endpoint.get("service", False)
    if not isinstance(service, bool):
        raise SpecError("endpoint.service", "must be true or false")
    return Route(
        namespace=namespace,
        name=check_name(nm, "name"),
        host="" if kubevirt else check_host(endpoint.get("host"), "endpoint.host"),
        port=0 if kubevirt else check_port(endpoint.get("port"), "endpoint.port"),
        kubevirt=kubevirt,
        service=service and not kubevirt,
        display_name=display_name,
        view_only=view_only,
        access=parse_access(body.get("access"), "access"),
        sessions=parse_sessions(body.get("sessions"), "sessions",
                                kubevirt=kubevirt is not None),
        recording=parse_recording(body.get("recording"), "recording"),
        credentials=_cluster_only(parse_credentials(body.get("credentials"), "credentials")),
        tls=_cluster_only(parse_tls(body.get("tls"), "tls")),
        labels=parse_labels(body.get("labels"), "labels"),
        thumbnail=parse_thumbnail(body.get("thumbnail"), "thumbnail"),
    )


def _kubevirt(endpoint: Mapping[str, Any], namespace: str) -> str | None:
    """The VMI name of a `{"kubevirt": {"namespace", "name"}}` endpoint (None for host/port).

    The relay builds an API path from it, so both names are checked here as Kubernetes names
    (letters, digits, '-', '.'; no '/', no '..'), and the VMI must be in the route's namespace."""
    ref = endpoint.get("kubevirt")
    if ref is None:
        return None
    if not isinstance(ref, Mapping):
        raise SpecError("endpoint.kubevirt", 'must be an object like {"namespace": "lab", '
                                             '"name": "vm-1"}')
    if check_namespace(ref.get("namespace"), "endpoint.kubevirt.namespace") != namespace:
        raise SpecError("endpoint.kubevirt.namespace", "must be the route's own namespace")
    return check_name(ref.get("name"), "endpoint.kubevirt.name")


def _cluster_only(value: _Ref | None) -> _Ref | None:
    """Over the registration API only Secret and ConfigMap names: a file path or a variable
    would make the relay read its own files (its API token) and send them to a VNC server."""
    if value is not None and value.standalone_only:
        field = "credentials" if isinstance(value, Credentials) else "tls.caFile"
        raise SpecError(field, "passwordFile, passwordEnv and caFile are for standalone "
                               "manifests; in a cluster name a Secret or ConfigMap")
    return value


def table_from_json(body: object) -> list[Route]:
    """Parse the body of `PUT /api/v1/targets`: `{"targets": [route, ...]}`, keys unique."""
    if not isinstance(body, Mapping) or not isinstance(body.get("targets"), list):
        raise SpecError("targets", 'the body must be {"targets": [ ... ]}')
    routes: list[Route] = []
    seen: set[str] = set()
    for index, item in enumerate(body["targets"]):
        try:
            route = route_from_json(item)
        except SpecError as exc:
            raise SpecError(f"targets[{index}].{exc.field}", exc.message) from None
        if route.key in seen:
            raise SpecError(f"targets[{index}]", f"{route.key} appears twice")
        seen.add(route.key)
        routes.append(route)
    return routes


def xor_digest(revision: bytes, digest: bytes) -> bytes:
    return bytes(a ^ b for a, b in zip(revision, digest, strict=True))


def table_revision(routes: Iterable[Route]) -> str:
    """Order-independent hash of a table: the XOR of the routes' digests.

    XOR lets the relay keep its revision up to date in O(1) per change (add and remove are the
    same operation) instead of rehashing 100,000 routes on every request.
    """
    revision = bytes(32)
    for route in routes:
        revision = xor_digest(revision, route.digest())
    return revision.hex()


# The outcomes of a relay's logins to a target's VNC server (spec.credentials / spec.tls), as
# its table summary reports them: the operator's status shows a refused stored credential
# without ever reading the Secret (docs/ARCHITECTURE.md, "Credentials and TLS").
# `forbidden`: the relay could not read the credential because RBAC denied it (403), the one
# cause an access review also sees; `unreadable`: any other (a missing Secret or key, the API).
# For endpoint.kubevirt routes the relay opens the VM's console through the API server, and
# `held` says KubeVirt refused it (preserveSession) because another console client holds it;
# `ok` then means the console was opened.
LOGIN_OK, LOGIN_REFUSED, LOGIN_UNREADABLE = "ok", "refused", "unreadable"
LOGIN_FORBIDDEN, LOGIN_HELD = "forbidden", "held"
_LOGIN_RESULTS = (LOGIN_OK, LOGIN_REFUSED, LOGIN_UNREADABLE, LOGIN_FORBIDDEN, LOGIN_HELD)


@dataclass(frozen=True, slots=True)
class LoginOutcome:
    """The last login a relay replica made for one route: its result, when (Unix time) and,
    when it failed, the reason the viewer was given (names a Secret, never its content)."""

    result: str
    at: float
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"result": self.result, "at": self.at, "reason": self.reason}


def login_outcome_from_json(body: object) -> LoginOutcome | None:
    """None for anything that is not an outcome this version knows (a newer relay's)."""
    if not isinstance(body, Mapping):
        return None
    result, at, reason = body.get("result"), body.get("at"), body.get("reason", "")
    if result not in _LOGIN_RESULTS or not isinstance(at, int | float) or isinstance(at, bool):
        return None
    return LoginOutcome(str(result), float(at), str(reason)[:512])
