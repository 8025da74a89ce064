"""From a VncTarget to the route a relay dials: parse, resolve the Service, apply the policy.

A `TargetInvalid` is a spec that the CRD schema accepted but that cannot work as it stands; its
reason goes into the conditions and its message says what to fix. It is not retried in a loop:
the target is re-evaluated when it changes, when its Service changes, and on each probe tick.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from vncgate.common.addresses import Address
from vncgate.common.model import Route
from vncgate.common.reach import ReachDenied, ReachPolicy
from vncgate.common.spec import KubeVirtRef, ServiceRef, SpecError, VncTargetSpec, parse_spec
from vncgate.operator.policy import AddressDenied, AddressPolicy

UNENFORCED = ReachPolicy()  # no grants file: every namespace as before grants


class TargetInvalid(Exception):
    """A VncTarget that cannot be served until someone changes it (or its Service)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    port: int
    target_port: int | str | None
    protocol: str


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """What the operator needs of a Service (kept in a kopf index, so small and immutable)."""

    namespace: str
    name: str
    type: str
    headless: bool
    external_name: str | None
    ports: tuple[ServicePort, ...]


def service_info(body: Mapping[str, Any]) -> ServiceInfo:
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    ports = []
    for item in spec.get("ports") or ():
        if not isinstance(item, Mapping) or not isinstance(item.get("port"), int):
            continue
        ports.append(ServicePort(name=str(item.get("name") or ""), port=item["port"],
                                 target_port=item.get("targetPort"),
                                 protocol=str(item.get("protocol") or "TCP")))
    return ServiceInfo(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        type=str(spec.get("type") or "ClusterIP"),
        headless=spec.get("clusterIP") == "None",
        external_name=spec.get("externalName") if spec.get("type") == "ExternalName" else None,
        ports=tuple(ports),
    )


def parse_target_spec(spec: Mapping[str, Any] | None) -> VncTargetSpec:
    try:
        return parse_spec(spec if spec is not None else {})
    except SpecError as exc:
        raise TargetInvalid("InvalidSpec", f"{exc.field}: {exc.message}") from None


def describe_endpoint(namespace: str, spec: VncTargetSpec) -> str:
    """The endpoint as the spec names it, for status while it does not resolve."""
    endpoint = spec.endpoint
    if isinstance(endpoint, ServiceRef):
        return f"service/{endpoint.name}:{endpoint.port}"
    if isinstance(endpoint, KubeVirtRef):
        return f"kubevirt/{namespace}/{endpoint.name}"
    return str(endpoint)


def _service_port(service: ServiceInfo, ref: ServiceRef) -> ServicePort:
    tcp = [p for p in service.ports if p.protocol.upper() == "TCP"]
    known = ", ".join(f"{p.name or '(unnamed)'}={p.port}" for p in tcp) or "none"
    for port in tcp:
        if (port.name == ref.port) if isinstance(ref.port, str) else (port.port == ref.port):
            return port
    what = f"a port named {ref.port!r}" if isinstance(ref.port, str) else f"port {ref.port}"
    raise TargetInvalid(
        "ServicePortNotFound",
        f"Service {service.namespace}/{service.name} has no TCP {what} (its TCP ports: {known}); "
        "set spec.endpoint.service.port to one of them, or add the port to the Service")


def resolve_service(namespace: str, ref: ServiceRef, service: ServiceInfo | None,
                    policy: AddressPolicy, cluster_domain: str,
                    reach: ReachPolicy = UNENFORCED) -> tuple[str, int]:
    if service is None:
        raise TargetInvalid(
            "ServiceNotFound",
            f"Service {namespace}/{ref.name} does not exist; create it, or fix "
            "spec.endpoint.service.name (the Service must be in the VncTarget's namespace)")
    port = _service_port(service, ref)
    host = f"{service.name}.{namespace}.svc.{cluster_domain}"
    if service.external_name is not None:
        # An ExternalName Service is a DNS alias: without this check it would let anyone who can
        # create a Service reach an address that the policy refuses in endpoint.address.
        try:
            policy.check(service.external_name)
        except AddressDenied as exc:
            raise TargetInvalid("AddressDenied",
                                f"Service {namespace}/{ref.name} is an ExternalName for "
                                f"{service.external_name}: {exc}") from None
        if reach.enforced:
            # With network grants, the alias is an address like endpoint.address: granted by
            # its name, and dialled by it (the relay checks what that resolves to).
            try:
                reach.check(namespace, service.external_name, port.port)
            except ReachDenied as exc:
                raise TargetInvalid("AddressNotGranted",
                                    f"Service {namespace}/{ref.name} is an ExternalName for "
                                    f"{service.external_name}: {exc}") from None
            return service.external_name, port.port
        return host, port.port
    if service.headless:
        # No cluster IP, so no kube-proxy to map the Service port: the relay reaches the pod
        # itself and must dial the container's port.
        if port.target_port is None:
            return host, port.port
        if isinstance(port.target_port, int):
            return host, port.target_port
        raise TargetInvalid(
            "UnsupportedService",
            f"Service {namespace}/{ref.name} is headless and its port {port.name or port.port} "
            f"targets the named container port {port.target_port!r}, which DNS cannot tell the "
            "relay; give the Service a cluster IP, or a numeric targetPort")
    return host, port.port


def resolve_route(namespace: str, name: str, spec: VncTargetSpec, service: ServiceInfo | None,
                  policy: AddressPolicy, cluster_domain: str,
                  reach: ReachPolicy = UNENFORCED) -> Route:
    """The route for a parsed spec; `service` is the one it names (None: absent or not needed)."""
    endpoint = spec.endpoint
    if isinstance(endpoint, Address):
        try:
            policy.check(endpoint.host)
        except AddressDenied as exc:
            raise TargetInvalid("AddressDenied", f"spec.endpoint.address.host: {exc}") from None
        try:
            # Also here, not only at admission: targets made before the webhook or the grants.
            reach.check(namespace, endpoint.host, endpoint.port)
        except ReachDenied as exc:
            raise TargetInvalid("AddressNotGranted", f"spec.endpoint.address: {exc}") from None
        host, port = endpoint.host, endpoint.port
    elif isinstance(endpoint, KubeVirtRef):
        # The relay opens the VMI's vnc subresource through the API server: a VM's instance
        # has the VM's name, and it is in the target's namespace (the CRD allows no other).
        host, port = "", 0
    else:
        host, port = resolve_service(namespace, endpoint, service, policy, cluster_domain, reach)
    check_cluster_credentials(spec)
    # spec.access is not sent: in a cluster RBAC (SubjectAccessReview) decides who may connect.
    return Route(namespace=namespace, name=name, host=host, port=port,
                 kubevirt=endpoint.name if isinstance(endpoint, KubeVirtRef) else None,
                 # A Service's own address (not an ExternalName alias) needs no network grant.
                 service=isinstance(endpoint, ServiceRef) and not (
                     service is not None and service.external_name is not None),
                 display_name=spec.display_name, view_only=spec.view_only,
                 sessions=spec.sessions, recording=spec.recording,
                 credentials=spec.credentials, tls=spec.tls, thumbnail=spec.thumbnail)


def check_cluster_credentials(spec: VncTargetSpec) -> None:
    """In a cluster the relay reads only Secrets and ConfigMaps of the target's namespace: a
    path or a variable would name the relay's own files (its API token) or environment."""
    if spec.credentials is not None and spec.credentials.standalone_only:
        raise TargetInvalid("StandaloneCredentials",
                            "spec.credentials: passwordFile and passwordEnv work only with the "
                            "standalone relay; in a cluster put the password into a Secret in "
                            "this namespace (key password) and set secretName")
    if spec.tls is not None and spec.tls.standalone_only:
        raise TargetInvalid("StandaloneCredentials",
                            "spec.tls.caFile works only with the standalone relay; in a cluster "
                            "use caSecret or caConfigMap")


def first(values: Iterable[Any] | None) -> Any:
    """The one value that a kopf index holds under a unique key (None if absent)."""
    for value in values or ():
        return value
    return None


ServiceLookup = Callable[[str, str], "ServiceInfo | None"]


def evaluate(namespace: str, name: str, spec: Mapping[str, Any] | VncTargetSpec | TargetInvalid
             | None, lookup: ServiceLookup, policy: AddressPolicy,
             cluster_domain: str, reach: ReachPolicy = UNENFORCED
             ) -> tuple[str, Route | TargetInvalid]:
    """The endpoint as status shows it, and the route or why there is none.

    `spec` is the object's spec, or what `parse_target_spec` made of it already."""
    if isinstance(spec, TargetInvalid):
        return "", spec
    if isinstance(spec, VncTargetSpec):
        parsed = spec
    else:
        try:
            parsed = parse_target_spec(spec)
        except TargetInvalid as exc:
            return "", TargetInvalid(exc.reason, exc.message)  # no traceback kept
    endpoint = describe_endpoint(namespace, parsed)
    service = (lookup(namespace, parsed.endpoint.name)
               if isinstance(parsed.endpoint, ServiceRef) else None)
    try:
        route = resolve_route(namespace, name, parsed, service, policy, cluster_domain, reach)
    except TargetInvalid as exc:
        return endpoint, exc
    return route.address, route
