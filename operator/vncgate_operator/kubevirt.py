"""KubeVirt targets: what a VirtualMachine's state means for its VncTarget, and a watch that
re-evaluates targets when their VMs start and stop.

The relay opens a KubeVirt console through the API server (relay.kubevirt); the operator does
not probe it (that would take the VM's one VNC connection, and only the relay's ServiceAccount
may open it). Reachable is read from KubeVirt instead: a VirtualMachineInstance in phase
Running. Everything else is a condition that says what is the matter.

The watch keeps nothing per VM: each event names a (namespace, name), and the targets naming
it are looked at again. While KubeVirt is not installed (the kubevirt.io API is not served) it
waits and tries again with back-off, so it starts watching when KubeVirt's CRDs appear.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp

from vncgate.common.model import LOGIN_HELD, LOGIN_OK, LoginOutcome
from vncgate.operator.kubeapi import VMIS, VMS, KubeError, KubeVirtAbsent, KubeVirtApi
from vncgate.operator.probe import ProbeResult, printable

logger = logging.getLogger("vncgate.operator.kubevirt")

RUNNING = "VirtualMachineRunning"
STARTING = "VirtualMachineStarting"
STOPPED = "VirtualMachineStopped"
NOT_FOUND = "VirtualMachineNotFound"
NOT_INSTALLED = "KubeVirtNotInstalled"
NOT_READABLE = "KubeVirtNotReadable"
# The ConsoleAvailable condition (status.CONSOLE_AVAILABLE), from the relays' reports.
CONSOLE_OPENED = "ConsoleOpened"
HELD_BY_ANOTHER_CLIENT = "HeldByAnotherClient"
BACKOFF_FIRST, BACKOFF_LONGEST = 1.0, 60.0
# Discovery (--kubevirt-discovery): a VM with this label gets a VncTarget of its own name,
# owned by the VM (the garbage collector deletes it with the VM); its display name from the
# annotation.
DISCOVERY_LABEL = "vncgate.io/console"
DISPLAY_NAME_ANNOTATION = "vncgate.io/display-name"
MANAGED_BY = ("app.kubernetes.io/managed-by", "vncgate-operator")
_NOT_YET = ("Pending", "Scheduling", "Scheduled", "")


def not_installed() -> ProbeResult:
    return ProbeResult(False, NOT_INSTALLED,
                       "KubeVirt is not installed in this cluster (the kubevirt.io API is not "
                       "served); install KubeVirt, or give spec.endpoint a service or address")


def not_readable(namespace: str, error: object) -> ProbeResult:
    return ProbeResult(False, NOT_READABLE,
                       f"the operator may not read KubeVirt's VirtualMachines in {namespace} "
                       f"({error}); install the chart with kubevirt.enabled=true")


def verdict(namespace: str, name: str, vm: Mapping[str, Any] | None,
            vmi: Mapping[str, Any] | None) -> ProbeResult:
    """Reachable from a VM and its instance (either may be absent)."""
    fix = (f"create it, or fix spec.endpoint.kubevirt.name (the VM must be in the VncTarget's "
           f"namespace {namespace})")
    if vmi is not None:
        phase = str((vmi.get("status") or {}).get("phase") or "")
        if phase == "Running":
            return ProbeResult(True, RUNNING,
                               f"virtual machine instance {namespace}/{name} is Running")
        if phase in _NOT_YET:
            return ProbeResult(False, STARTING,
                               f"virtual machine instance {namespace}/{name} is "
                               f"{phase or 'being created'}: not scheduled and running yet")
        return ProbeResult(False, STOPPED,
                           f"virtual machine instance {namespace}/{name} is {phase}: it does not "
                           "run; start the virtual machine again (virtctl start)")
    if vm is not None:
        status = vm.get("status") or {}
        printable = str(status.get("printableStatus") or "Stopped")
        return ProbeResult(False, STOPPED,
                           f"VirtualMachine {namespace}/{name} has no running instance "
                           f"({printable}); start it (virtctl start {name}, or "
                           "spec.runStrategy: Always)")
    return ProbeResult(False, NOT_FOUND,
                       f"no VirtualMachine or VirtualMachineInstance {namespace}/{name}; {fix}")


def console_verdict(outcome: LoginOutcome | None) -> tuple[bool, str, str] | None:
    """ConsoleAvailable from the latest attempt any relay made to open the VM's console: None
    if none reported one (and for failures that are not about who holds it).

    The relay asks with preserveSession, so KubeVirt refuses it while another client (virtctl
    vnc, a web console) holds the console; KubeVirt does not say who, and the relay cannot
    know when they leave: the condition stands until a later session opens it. Its message
    carries no time, so refusals that repeat write no status."""
    if outcome is None:
        return None
    if outcome.result == LOGIN_OK:
        return (True, CONSOLE_OPENED,
                "the relay opened the VM's console at the last session through it")
    if outcome.result == LOGIN_HELD:
        said = printable(outcome.reason) or "another console client holds it"
        return (False, HELD_BY_ANOTHER_CLIENT,
                f"KubeVirt kept the VM's console from the last session through the relay: "
                f"{said} (the relay asks with preserveSession, so it does not take the console "
                "from them). It frees when they disconnect; the next session that opens it "
                "clears this")
    return None


async def check(api: KubeVirtApi, namespace: str, name: str) -> ProbeResult:
    """The verdict for one target, from two GETs (the instance first: a running VMI is enough)."""
    try:
        vmi = await api.get(VMIS, namespace, name)
        if vmi is not None:
            return verdict(namespace, name, None, vmi)
        return verdict(namespace, name, await api.get(VMS, namespace, name), None)
    except KubeVirtAbsent:
        return not_installed()
    except KubeError as exc:
        if exc.status in (401, 403):
            return not_readable(namespace, f"HTTP {exc.status}")
        raise


def wants_console(vm: Mapping[str, Any]) -> bool:
    labels = (vm.get("metadata") or {}).get("labels") or {}
    return str(labels.get(DISCOVERY_LABEL, "")).lower() == "true"


def discovered_target(vm: Mapping[str, Any]) -> dict[str, Any] | None:
    """The VncTarget that discovery makes for a labelled VM (None: not labelled, or not a
    complete object)."""
    meta = vm.get("metadata") or {}
    name, namespace, uid = meta.get("name"), meta.get("namespace"), meta.get("uid")
    if not wants_console(vm) or not (name and namespace and uid):
        return None
    spec: dict[str, Any] = {"endpoint": {"kubevirt": {"name": name}}}
    display = str((meta.get("annotations") or {}).get(DISPLAY_NAME_ANNOTATION) or "")
    if display:
        spec["displayName"] = display[:256]
    return {
        "apiVersion": "vncgate.io/v1alpha1", "kind": "VncTarget",
        "metadata": {
            "name": name, "namespace": namespace, "labels": dict([MANAGED_BY]),
            "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                 "name": name, "uid": uid, "controller": True,
                                 "blockOwnerDeletion": False}]},
        "spec": spec,
    }


def owned_by(target: Mapping[str, Any], vm_uid: str) -> bool:
    """Whether discovery made this VncTarget for the VM `vm_uid` (its controller reference)."""
    refs = (target.get("metadata") or {}).get("ownerReferences") or ()
    return any(ref.get("uid") == vm_uid and ref.get("controller") and
               ref.get("kind") == "VirtualMachine" for ref in refs)


class KubeVirtWatch:
    """Watches VMs and VMIs (cluster-wide, or per namespace) and calls `changed(ns, name)`.

    `appeared()` is called when the kubevirt.io API is served after it was not (or at the first
    successful watch): targets that said "not installed" are looked at again.
    """

    def __init__(self, api: KubeVirtApi, namespaces: tuple[str, ...],
                 changed: Callable[[str, str], None], appeared: Callable[[], None],
                 vm_seen: Callable[[str, Mapping[str, Any]], Awaitable[None]] | None = None
                 ) -> None:
        self.api = api
        self.namespaces = namespaces or (None,)
        self.changed = changed
        self.appeared = appeared
        # Discovery: each VirtualMachine event (type, object), awaited in the watch's order.
        self.vm_seen = vm_seen
        self.absent = True
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._watch(plural, namespace),
                                               name=f"vncgate kubevirt {plural}")
                           for plural in (VMIS, VMS) for namespace in self.namespaces]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _each_vm(self, namespace: str | None) -> str:
        """Every VM to discovery (as an ADDED event); the list's resourceVersion."""
        assert self.vm_seen is not None
        version = ""
        async for items, page_version in self.api.pages(VMS, namespace):
            version = version or page_version
            for vm in items:
                meta = vm.get("metadata") or {}
                if meta.get("name"):
                    self.changed(str(meta.get("namespace") or ""), str(meta["name"]))
                    await self.vm_seen("ADDED", vm)
        return version

    async def _watch(self, plural: str, namespace: str | None) -> None:
        delay, version = BACKOFF_FIRST, None
        while True:
            try:
                if not version:
                    # List (one object) for where to start: that the API answers is how the
                    # arrival of KubeVirt is seen, even with no VM yet to send an event.
                    # Discovery needs every VM once: it lists them all, a page at a time,
                    # and watches from that list. (Not a watch without a version, which
                    # begins with an ADDED event per object: kube-apiserver 1.36 answered it
                    # with "Too large resource version" for as long as no VM changed.)
                    if plural == VMS and self.vm_seen is not None:
                        version = await self._each_vm(namespace)
                    else:
                        version = await self.api.current_version(plural, namespace)
                    if self.absent:
                        self.absent = False
                        logger.info("KubeVirt's %s are served: watching them", plural)
                        self.appeared()
                opened = time.monotonic()
                async for event in self.api.watch(plural, namespace, version):
                    delay = BACKOFF_FIRST
                    obj = event.get("object") or {}
                    meta = obj.get("metadata") or {}
                    if event.get("type") == "ERROR":
                        # e.g. 410 Gone: start again from now. Said, since a cause that stays
                        # (a 504 from a watch cache that lags) would otherwise go unseen.
                        logger.warning("the watch of KubeVirt's %s ended with an error: %s",
                                       plural, str(obj.get("message") or obj)[:300])
                        version = None
                        break
                    version = meta.get("resourceVersion") or version
                    if event.get("type") != "BOOKMARK" and meta.get("name"):
                        self.changed(str(meta.get("namespace") or ""), str(meta["name"]))
                        if plural == VMS and self.vm_seen is not None:
                            await self.vm_seen(str(event.get("type")), obj)
                if time.monotonic() - opened > BACKOFF_FIRST:
                    continue  # the server ended the watch: resume from `version`
                # Ended at once: wait before the next one (never a hot loop)
            except KubeVirtAbsent:
                if not self.absent:
                    logger.warning("KubeVirt's %s are no longer served", plural)
                    self.absent = True
                    self.appeared()  # its targets now say "not installed"
                version = None
            except KubeError as exc:
                logger.warning("watching KubeVirt's %s failed: %s; trying again in %gs",
                               plural, exc, delay)
                version = None
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                logger.debug("the watch of KubeVirt's %s ended: %r", plural, exc)
            except Exception:  # never let the watch die silently: say why and go on
                logger.exception("the watch of KubeVirt's %s failed; trying again in %gs",
                                 plural, delay)
                version = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_LONGEST)
