"""Whether the relay may read a target's Secret (and CA): an access review, never a read.

The relay reads `spec.credentials.secretName` (and `spec.tls.caSecret` / `caConfigMap`) itself
at each session's start, with a ClusterRole that each namespace opts into with a RoleBinding
(docs/ARCHITECTURE.md says why the relay, not the operator). The operator never reads Secrets;
it asks the API server whether the relay's ServiceAccount may, so a target whose namespace has
not opted in is not Ready and its condition says which RoleBinding to create.

The question is a LocalSubjectAccessReview in the target's namespace (the same answer as a
cluster-scoped SubjectAccessReview, which the API server's docs say it is: "checks whether or
not a user or group can perform an action in a given namespace"), so that the chart's
namespaced mode, which grants the operator nothing cluster-wide, can grant it per namespace.
"""

from __future__ import annotations

import datetime
from typing import Any

from vncgate.common.kube import KubeClient
from vncgate.common.model import (
    LOGIN_FORBIDDEN,
    LOGIN_REFUSED,
    LOGIN_UNREADABLE,
    LoginOutcome,
    Route,
)
from vncgate.operator.probe import ProbeResult, printable

NOT_READABLE = "CredentialsNotReadable"
REFUSED = "CredentialRefused"


def references(route: Route) -> list[tuple[str, str]]:
    """(resource, name) of every object the relay reads for this route."""
    found: list[tuple[str, str]] = []
    if route.credentials is not None and route.credentials.secret_name is not None:
        found.append(("secrets", route.credentials.secret_name))
    if route.tls is not None:
        if route.tls.ca_secret is not None:
            found.append(("secrets", route.tls.ca_secret.name))
        if route.tls.ca_config_map is not None:
            found.append(("configmaps", route.tls.ca_config_map.name))
    return found


def review(account: tuple[str, str], namespace: str, resource: str, name: str) -> dict[str, Any]:
    sa_namespace, sa_name = account
    return {
        "apiVersion": "authorization.k8s.io/v1", "kind": "LocalSubjectAccessReview",
        "metadata": {"namespace": namespace},
        "spec": {
            "user": f"system:serviceaccount:{sa_namespace}:{sa_name}",
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{sa_namespace}",
                       "system:authenticated"],
            "resourceAttributes": {"namespace": namespace, "verb": "get", "group": "",
                                   "resource": resource, "name": name},
        },
    }


def binding_hint(namespace: str, account: tuple[str, str], role: str) -> str:
    return (f"kubectl -n {namespace} create rolebinding vncgate-relay-credentials "
            f"--clusterrole={role} --serviceaccount={account[0]}:{account[1]}")


async def unreadable(client: KubeClient, account: tuple[str, str], role: str,
                     route: Route) -> str | None:
    """None if the relay may read everything the route names; else what to do about it."""
    for resource, name in references(route):
        body = await client.request(
            "POST",
            f"/apis/authorization.k8s.io/v1/namespaces/{route.namespace}/localsubjectaccessreviews",
            review(account, route.namespace, resource, name))
        if not (body.get("status") or {}).get("allowed"):
            kind = "Secret" if resource == "secrets" else "ConfigMap"
            return (f"the relay ({account[0]}/{account[1]}) may not read {kind} "
                    f"{route.namespace}/{name}; opt this namespace in: "
                    f"{binding_hint(route.namespace, account, role)}")
    return None


def login_verdict(route: Route, outcome: LoginOutcome | None,
                  readable_since: float | None = None) -> ProbeResult | None:
    """Not Reachable while the relays' latest login for this route failed on its credential.

    The relay logs in at each session (the operator never reads the Secret), and the operator
    polls what the relays report: the latest login over every replica decides. A refused
    credential stays the verdict until a later session logs in (a session after the Secret
    was corrected clears it) or the route's endpoint or credentials change.

    `readable_since`: since when (Unix time) the operator's access reviews have said that the
    relay may read the route's objects; None if they do not say so. A relay's `forbidden`
    from before then is stale (a RoleBinding was made since) and does not count: the review
    answers that very question, and more recently. A later one counts (the relay and the
    review disagree: the relay's experience wins). Other failures are beyond a review's sight
    (a missing Secret) and stand.
    """
    if outcome is None or outcome.result not in (LOGIN_REFUSED, LOGIN_UNREADABLE,
                                                 LOGIN_FORBIDDEN):
        return None
    if (outcome.result == LOGIN_FORBIDDEN and readable_since is not None
            and outcome.at <= readable_since):
        return None
    at = datetime.datetime.fromtimestamp(outcome.at, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    said = printable(outcome.reason) or "no reason given"
    if outcome.result in (LOGIN_UNREADABLE, LOGIN_FORBIDDEN):
        return ProbeResult(False, NOT_READABLE,
                           f"the relay could not read the credential of {route.key} for a "
                           f"session at {at}: {said}")
    secret = (route.credentials.secret_name
              if route.credentials is not None and route.credentials.secret_name else None)
    fix = (f"correct Secret {route.namespace}/{secret}" if secret is not None
           else "correct the target's credentials")
    return ProbeResult(False, REFUSED,
                       f"the VNC server refused the stored credential at the last login "
                       f"through the relay ({at}): {said}. {fix}; the next session that "
                       "logs in clears this")
