"""The deputy rule at admission: a VncTarget may let the relay use only what its author may use.

The relay reads opted-in Secrets, opens VM consoles through the API server and reaches networks
that tenants cannot. The validating webhook (served by the operator, wired in handlers.py) asks
the API server, for the user in the AdmissionReview, whether that user holds each right the
target would lend them through the relay:

- `spec.credentials.secretName`: get that Secret; `spec.tls.caSecret` / `caConfigMap`: get them;
- `spec.endpoint.kubevirt`: get `virtualmachineinstances/vnc` (subresources.kubevirt.io) of the
  VMI;
- `spec.endpoint.address`: the network-reach policy (vncgate.common.reach) for the namespace,
  and the operator's address policy.

On update only what is new is checked: someone who edits the display name of a target that
another person made with a Secret does not need that Secret. Each question is a
LocalSubjectAccessReview in the target's namespace carrying the user's name, uid, groups and
extra, so impersonation and RBAC aggregation answer as they would for the user's own request.
An error asking refuses (fail closed).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vncgate.common.addresses import Address
from vncgate.common.reach import ReachDenied, ReachPolicy
from vncgate.common.spec import KubeVirtRef, SpecError, VncTargetSpec, parse_spec
from vncgate.operator.policy import AddressDenied, AddressPolicy

# Asks the API server one LocalSubjectAccessReview; returns the review's `status`.
AskReview = Callable[[str, dict[str, Any]], Awaitable[Mapping[str, Any]]]

KUBEVIRT_SUBRESOURCES = "subresources.kubevirt.io"


class Refused(Exception):
    """The target lends a right its author lacks; the message names it and how to grant it."""


@dataclass(frozen=True, slots=True, order=True)
class Right:
    """One `verb` on one named object of the target's namespace."""

    resource: str
    name: str
    group: str = ""
    subresource: str = ""
    verb: str = "get"

    @property
    def kind(self) -> str:
        return {"secrets": "Secret", "configmaps": "ConfigMap",
                "virtualmachineinstances": "VirtualMachineInstance"}.get(self.resource,
                                                                          self.resource)

    def phrase(self, namespace: str) -> str:
        what = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        group = f" ({self.group})" if self.group else ""
        return f"{self.verb} {what}{group} on {self.kind} {namespace}/{self.name}"

    def kubectl_resource(self) -> str:
        resource = f"{self.resource}.{self.group}" if self.group else self.resource
        return f"{resource}/{self.subresource}" if self.subresource else resource


def rights_needed(spec: VncTargetSpec) -> set[Right]:
    """Every right over the namespace's objects that the relay would use for this target."""
    needed: set[Right] = set()
    if spec.credentials is not None and spec.credentials.secret_name is not None:
        needed.add(Right("secrets", spec.credentials.secret_name))
    if spec.tls is not None:
        if spec.tls.ca_secret is not None:
            needed.add(Right("secrets", spec.tls.ca_secret.name))
        if spec.tls.ca_config_map is not None:
            needed.add(Right("configmaps", spec.tls.ca_config_map.name))
    if isinstance(spec.endpoint, KubeVirtRef):
        needed.add(Right("virtualmachineinstances", spec.endpoint.name,
                         group=KUBEVIRT_SUBRESOURCES, subresource="vnc"))
    return needed


def address_of(spec: VncTargetSpec | None) -> tuple[str, int] | None:
    endpoint = spec.endpoint if spec is not None else None
    return (endpoint.host, endpoint.port) if isinstance(endpoint, Address) else None


def review_body(namespace: str, userinfo: Mapping[str, Any], right: Right) -> dict[str, Any]:
    """A LocalSubjectAccessReview asking whether this user may do `right` in `namespace`."""
    spec: dict[str, Any] = {
        "user": str(userinfo.get("username") or ""),
        "groups": [str(g) for g in userinfo.get("groups") or ()],
        "resourceAttributes": {"namespace": namespace, "verb": right.verb, "group": right.group,
                               "resource": right.resource, "subresource": right.subresource,
                               "name": right.name},
    }
    if userinfo.get("uid"):
        spec["uid"] = str(userinfo["uid"])
    extra = userinfo.get("extra")
    if isinstance(extra, Mapping) and extra:
        spec["extra"] = {str(k): [str(v) for v in values or ()] for k, values in extra.items()}
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "LocalSubjectAccessReview",
            "metadata": {"namespace": namespace}, "spec": spec}


_SERVICE_ACCOUNT = re.compile(r"^system:serviceaccount:([^:]+):([^:]+)$")


def subject_flag(username: str) -> str:
    found = _SERVICE_ACCOUNT.match(username)
    if found:
        return f"--serviceaccount={found.group(1)}:{found.group(2)}"
    return f"--user={username}"


def grant_hint(namespace: str, username: str, right: Right) -> str:
    """The two kubectl commands that give this user exactly this right."""
    base = re.sub(r"[^a-z0-9-]+", "-", f"vncgate-{right.verb}-{right.resource.rstrip('s')}-"
                                       f"{right.name}".lower())[:63].strip("-")
    create_role = ["kubectl", "-n", namespace, "create", "role", base, f"--verb={right.verb}",
                   f"--resource={right.kubectl_resource()}", f"--resource-name={right.name}"]
    bind = ["kubectl", "-n", namespace, "create", "rolebinding", base, f"--role={base}",
            subject_flag(username)]
    return f"{shlex.join(create_role)} && {shlex.join(bind)}"


def _parse(spec: object) -> VncTargetSpec | None:
    try:
        return parse_spec(spec if spec is not None else {})
    except SpecError:
        return None


async def check_target(ask: AskReview, userinfo: Mapping[str, Any], namespace: str,
                       spec: object, old_spec: object | None, *, reach: ReachPolicy,
                       policy: AddressPolicy) -> None:
    """Raise `Refused` unless the requesting user may use everything new in `spec`.

    `old_spec` is the stored object's spec on update (None on create). A spec that does not
    parse is left to the CRD's schema and the operator's status (it lends nothing: the relay
    gets no route for it)."""
    new = _parse(spec)
    if new is None:
        return
    old = _parse(old_spec) if old_spec is not None else None
    username = str(userinfo.get("username") or "")
    address = address_of(new)
    if address is not None and address != address_of(old):
        host, port = address
        try:
            policy.check(host)
            reach.check(namespace, host, port)
        except (AddressDenied, ReachDenied) as exc:
            raise Refused(f"spec.endpoint.address: {exc}") from None
    missing: list[Right] = []
    for right in sorted(rights_needed(new) - (rights_needed(old) if old is not None else set())):
        try:
            status = await ask(namespace, review_body(namespace, userinfo, right))
        except Exception as exc:
            raise Refused(
                f"could not ask the API server whether {username} may "
                f"{right.phrase(namespace)} ({type(exc).__name__}: {exc}); the target is "
                "refused until it can (try again)") from None
        if not status.get("allowed") or status.get("denied"):
            missing.append(right)
    if missing:
        raise Refused(refusal(namespace, username, missing))


def refusal(namespace: str, username: str, missing: Sequence[Right]) -> str:
    first = missing[0]
    rights = "; ".join(r.phrase(namespace) for r in missing)
    return (f"{username} may not {rights}, and a VncTarget may let the relay use only what its "
            f"author may use. To grant it: {grant_hint(namespace, username, first)}"
            + (" (and likewise for the others)" if len(missing) > 1 else ""))
