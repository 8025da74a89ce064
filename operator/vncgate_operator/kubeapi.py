"""The operator's own Kubernetes API calls: status, Events, and the old finalizer.

kopf watches; the scheduler writes outside kopf's handlers, so it has its own client
(`vncgate.common.kube.KubeClient`, aiohttp). Credentials are found the way kopf's `login_via_client`
finds them: the pod's ServiceAccount first, else the kubeconfig ($KUBECONFIG, else
~/.kube/config).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from vncgate.common.kube import (
    KubeClient,
    KubeConfigError,
    KubeConnection,
    kube_connection,
)
from vncgate.common.kube import KubeError as KubeError  # the runtime handles its errors
from vncgate.common.spec import API_GROUP, API_VERSION, PLURAL

logger = logging.getLogger("vncgate.operator.kube")

# The finalizer that operators before this one put on every VncTarget (kopf requires one for
# timers); nothing needs it now, and this operator takes it off whatever still carries it.
OLD_FINALIZER = f"{API_GROUP}/finalizer"
COMPONENT = "vncgate-operator"


def operator_connection() -> KubeConnection:
    """In-cluster ServiceAccount, else the kubeconfig, as kopf's `login_via_client` does."""
    try:
        return kube_connection(None)
    except KubeConfigError as in_cluster:
        candidates = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
        candidates.append(str(Path.home() / ".kube" / "config"))
        for candidate in candidates:
            if Path(candidate).is_file():
                return kube_connection(Path(candidate))
        raise KubeConfigError(
            f"no Kubernetes credentials: not in a pod ({in_cluster}) and no kubeconfig at "
            f"{', '.join(candidates)}; set KUBECONFIG") from None


def event_name(name: str, uid: str, old: str, new: str, at: str) -> str:
    """A name that is the same for the same transition: posting it twice gives 409."""
    digest = hashlib.sha256(f"{uid}|{old}|{new}|{at}".encode()).hexdigest()[:16]
    return f"{name}.{digest}"


class TargetApi:
    """Status merge patches, Events and finalizer removal for VncTargets."""

    def __init__(self, client: KubeClient, concurrency: int = 8) -> None:
        self.client = client
        self.instance = socket.gethostname()
        # A few connections, however many targets change at once: each TLS connection costs
        # ~100 KiB, and a restart with every target to look at must not open hundreds.
        self._slots = asyncio.Semaphore(concurrency)

    async def _request(self, method: str, path: str, body: Any) -> Any:
        async with self._slots:
            return await self.client.request(method, path, body)

    @staticmethod
    def _path(namespace: str, name: str) -> str:
        return f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}/{name}"

    async def patch_status(self, namespace: str, name: str,
                           changes: Mapping[str, Any]) -> dict[str, Any]:
        """Merge-patch the status subresource; returns the object as the API server stored it."""
        reply = await self._request("PATCH", f"{self._path(namespace, name)}/status",
                                    {"status": dict(changes)})
        return reply if isinstance(reply, dict) else {}

    async def create(self, body: Mapping[str, Any]) -> None:
        """Create a VncTarget; KubeError 409 if one of that name exists."""
        namespace = str(body["metadata"]["namespace"])
        await self._request("POST", f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/"
                                    f"{PLURAL}", dict(body))

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            found = await self._request("GET", self._path(namespace, name), None)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return found if isinstance(found, dict) else None

    async def delete(self, namespace: str, name: str, uid: str) -> None:
        """Delete the VncTarget if it is still the object `uid` (a precondition: never one that
        was replaced meanwhile); 404 and 409 are not errors."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": uid}}
        try:
            await self._request("DELETE", self._path(namespace, name), body)
        except KubeError as exc:
            if exc.status not in (404, 409):
                raise

    async def drop_finalizer(self, namespace: str, name: str, finalizers: list[str],
                             resource_version: str | None) -> None:
        """Remove the old finalizer; conditional on the resourceVersion that was seen (409:
        the object changed, and the event for that change will try again)."""
        meta: dict[str, Any] = {"finalizers": [f for f in finalizers if f != OLD_FINALIZER]}
        if resource_version:
            meta["resourceVersion"] = resource_version
        await self._request("PATCH", self._path(namespace, name), {"metadata": meta})

    async def shed_old_finalizer(self, namespace: str, name: str,
                                 meta: Mapping[str, Any]) -> None:
        """Remove the finalizer older versions set, if `meta` has it (nothing needs it now);
        a failure is logged, and the next watch event tries again."""
        finalizers = list(meta.get("finalizers") or ())
        if OLD_FINALIZER not in finalizers:
            return
        try:
            await self.drop_finalizer(namespace, name, finalizers, meta.get("resourceVersion"))
            logger.info("%s/%s: removed the finalizer %s (no longer needed)", namespace, name,
                        OLD_FINALIZER)
        except KubeError as exc:
            if exc.status not in (404, 409):
                logger.warning("%s/%s: removing the finalizer %s failed: %s", namespace, name,
                               OLD_FINALIZER, exc)

    async def post_event(self, *, namespace: str, name: str, uid: str, old: str, new: str,
                         at: str, reason: str, message: str, warning: bool) -> bool:
        """Post the Event of one phase transition; False if it was posted before (409)."""
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": event_name(name, uid, old, new, at), "namespace": namespace},
            "involvedObject": {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "VncTarget",
                               "namespace": namespace, "name": name, "uid": uid},
            "reason": reason, "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT, "reportingInstance": self.instance[:128],
            "firstTimestamp": at[:19] + "Z", "lastTimestamp": at[:19] + "Z", "count": 1,
        }
        try:
            await self._request("POST", f"/api/v1/namespaces/{namespace}/events", body)
        except KubeError as exc:
            if exc.status == 409:
                return False
            raise
        return True


KUBEVIRT_GROUP, KUBEVIRT_VERSION = "kubevirt.io", "v1"
VMS, VMIS = "virtualmachines", "virtualmachineinstances"


class KubeVirtAbsent(Exception):
    """The kubevirt.io API is not served: KubeVirt is not installed (or its CRDs are gone)."""


class KubeVirtApi:
    """Reads of KubeVirt's VirtualMachines and VirtualMachineInstances (chart: kubevirt.enabled)."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client

    @staticmethod
    def path(plural: str, namespace: str | None = None, name: str | None = None) -> str:
        where = f"/namespaces/{namespace}" if namespace else ""
        return (f"/apis/{KUBEVIRT_GROUP}/{KUBEVIRT_VERSION}{where}/{plural}"
                + (f"/{name}" if name else ""))

    async def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, None if it does not exist; KubeVirtAbsent if the API is not served."""
        try:
            found = await self.client.request("GET", self.path(plural, namespace, name))
        except KubeError as exc:
            if exc.status == 404:
                if absent_api(str(exc)):
                    raise KubeVirtAbsent() from None
                return None
            raise
        return found if isinstance(found, dict) else None

    async def current_version(self, plural: str, namespace: str | None) -> str:
        """The collection's resourceVersion (a list of at most one object): where a watch of
        changes from now on starts. KubeVirtAbsent if the API is not served."""
        try:
            found = await self.client.request("GET", f"{self.path(plural, namespace)}?limit=1")
        except KubeError as exc:
            if exc.status == 404:
                raise KubeVirtAbsent() from None
            raise
        return str(((found or {}).get("metadata") or {}).get("resourceVersion") or "")

    async def pages(self, plural: str, namespace: str | None, limit: int = 100
                    ) -> AsyncIterator[tuple[list[dict[str, Any]], str]]:
        """Every object, a page at a time (memory bounded by a page), with the list's
        resourceVersion (the same on every page: one snapshot). KubeVirtAbsent if the API is
        not served."""
        token = ""
        while True:
            query = f"?limit={limit}" + (f"&continue={quote(token)}" if token else "")
            try:
                found = await self.client.request("GET", f"{self.path(plural, namespace)}{query}")
            except KubeError as exc:
                if exc.status == 404:
                    raise KubeVirtAbsent() from None
                raise
            meta = (found or {}).get("metadata") or {}
            items = [item for item in (found or {}).get("items") or () if isinstance(item, dict)]
            yield items, str(meta.get("resourceVersion") or "")
            token = str(meta.get("continue") or "")
            if not token:
                return

    async def watch(self, plural: str, namespace: str | None, resource_version: str | None,
                    timeout_seconds: int = 300) -> AsyncIterator[dict[str, Any]]:
        """Watch events; KubeVirtAbsent if the API is not served."""
        path = self.path(plural, namespace)
        if resource_version:
            path += f"?resourceVersion={resource_version}&allowWatchBookmarks=true"
        try:
            async for event in self.client.watch(path, timeout_seconds):
                yield event
        except KubeError as exc:
            if exc.status == 404:
                raise KubeVirtAbsent() from None
            raise


def absent_api(message: str) -> bool:
    """A 404 for a path the API server does not serve at all (no such group or resource), as
    opposed to a named object that does not exist."""
    return "could not find the requested resource" in message or "page not found" in message
