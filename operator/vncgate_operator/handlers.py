"""The kopf handlers: thin glue between kopf's watch events and the operator's services.

`build_registry(settings)` returns a fresh kopf registry with these handlers (the CLI runs it;
each test builds its own). Each handler takes what kopf gives it, finds the `Runtime` in kopf's
memo and calls one method; the decisions live in runtime.py and the services it owns
(resolve.py, relays.py, scheduler.py, status.py, kubeapi.py). The flow:

- Indexes keep what the whole-table views need: every VncTarget (parsed spec, generation and
  status), every Service's ports, which targets use which Service, and (with --relay-service)
  the relay replicas. kopf fills them completely before it calls any other handler, which is
  what makes a full resync safe.
- `target_event` (every watch event of a VncTarget) only tells the scheduler: look at this
  target now (new, or its spec changed: `metadata.generation` differs from
  `status.observedGeneration`), or some time within the probe interval (seen at start). A
  deletion removes the route from every relay before the handler returns.
- One `Scheduler` runs every target's evaluation: resolve, register the route if the relays do
  not hold it, probe (unless live sessions prove the server), write status. There is no kopf
  timer, no task per target, and no finalizer (kopf needs one only for timers and mandatory
  deletion handlers): deleting a VncTarget or its namespace never waits for the operator.
- Status is written by the operator's own API client as a merge patch of the fields that
  changed; a phase change is recorded in `status.phaseTransition` and then posted as an Event
  named after it, so that posting it again (after a crash between the two) is a no-op.

Every resource handler is `async def` though most do not await: kopf runs a sync handler in its
thread pool, which costs two thread hops per watch event (the indexes see every event of every
object), and would touch asyncio's primitives off the loop's thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import kopf

from vncgate.common.kube import KubeClient, KubeConnection
from vncgate.common.spec import API_GROUP, API_VERSION, PLURAL
from vncgate.operator.admission import Refused, check_target
from vncgate.operator.kubeapi import OLD_FINALIZER, TargetApi, operator_connection
from vncgate.operator.probe import probe_rfb
from vncgate.operator.relayendpoints import relay_urls_from_slice
from vncgate.operator.resolve import ServiceInfo, service_info
from vncgate.operator.runtime import MEMO_KEY, IndexedTarget, ObjectKey, Prober, Runtime
from vncgate.operator.settings import OperatorSettings

Connect = Callable[[], KubeConnection]
TARGETS = (API_GROUP, API_VERSION, PLURAL)
# The webhook's path on its server (kopf serves each admission handler at /<handler id>).
WEBHOOK_ID = "validate-vnctarget"
ADMISSION_MEMO_KEY = "vncgate-admission"
logger = logging.getLogger("vncgate.operator.admission")


# -- lifecycle -------------------------------------------------------------------------------

def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """kopf's own login: the pod's ServiceAccount (token and CA files,
    KUBERNETES_SERVICE_HOST), else the kubeconfig ($KUBECONFIG or ~/.kube/config)."""
    return kopf.login_via_client(**kwargs)


LIST_PAGE_SIZE = 500


def tune(settings: kopf.OperatorSettings, config: OperatorSettings) -> None:
    """kopf writes nothing to the objects: no finalizer (no timers, no mandatory deletion
    handlers), no progress or diff-base annotations (only watch-event handlers), and no Events
    (the runtime posts one per phase change itself)."""
    settings.persistence.finalizer = OLD_FINALIZER
    settings.posting.enabled = False
    settings.peering.name = config.peering_name
    settings.peering.priority = config.priority
    settings.peering.standalone = config.standalone or settings.peering.standalone
    # With exact --namespace names there is nothing to scan for: without this, kopf lists
    # namespaces and watches CRDs cluster-wide, which the chart's Roles rightly refuse, and
    # it retries the 403 for about a minute before it serves anything.
    settings.scanning.disabled = bool(config.namespaces)
    settings.networking.connect_timeout = 10
    settings.networking.request_timeout = 60
    # A watch that silently stalls (a dead load balancer) is re-opened within minutes.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # The initial LIST in pages: at 5,000 targets one unpaged LIST was the operator's RSS peak
    # after a restart (the whole response decoded at once); a page of 500 keeps that
    # peak to a tenth and costs ten requests at start.
    settings.watching.chunk_size = LIST_PAGE_SIZE


def make_startup(config: OperatorSettings, prober: Prober,
                 connect: Connect) -> Callable[..., Any]:
    async def startup(*, settings: kopf.OperatorSettings, memo: kopf.Memo,
                      vnctargets: kopf.Index[ObjectKey, IndexedTarget],
                      services: kopf.Index[ObjectKey, ServiceInfo],
                      targets_by_service: kopf.Index[ObjectKey, str],
                      relay_slices: kopf.Index[str, tuple[str, ...]] | None = None,
                      targets_by_kubevirt: kopf.Index[ObjectKey, str] | None = None,
                      **_: Any) -> None:
        tune(settings, config)
        if config.webhook_listen is not None:
            host, port = config.webhook_listen
            settings.admission.server = kopf.WebhookServer(
                addr=host, port=port, certfile=config.webhook_cert_file,
                pkeyfile=config.webhook_key_file)
        api = TargetApi(KubeClient(connect(), timeout=config.api_timeout))
        if config.webhook_listen is not None:
            memo[ADMISSION_MEMO_KEY] = await own_username(api.client)
        runtime = Runtime(config, aiohttp.ClientSession(), prober, api, targets=vnctargets,
                          services=services, by_service=targets_by_service,
                          relay_slices=relay_slices, by_kubevirt=targets_by_kubevirt)
        memo[MEMO_KEY] = runtime
        runtime.start()
    return startup


async def own_username(client: KubeClient) -> str | None:
    """Who the operator is to the API server (a SelfSubjectReview): its own writes (discovered
    KubeVirt targets) are admitted without asking for rights it does not use itself."""
    try:
        reply = await client.request("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews",
                                     {"apiVersion": "authentication.k8s.io/v1",
                                      "kind": "SelfSubjectReview"})
    except Exception as exc:
        logger.warning("could not learn the operator's own user name (%s); its own VncTarget "
                       "writes are checked like anyone's", exc)
        return None
    name = ((reply.get("status") or {}).get("userInfo") or {}).get("username")
    return str(name) if name else None


def make_validate(config: OperatorSettings) -> Callable[..., Any]:
    async def validate_target(*, namespace: str | None, spec: kopf.Spec, old: kopf.Body | None,
                              userinfo: Mapping[str, Any], memo: kopf.Memo,
                              **_: Any) -> None:
        if userinfo.get("username") and userinfo.get("username") == memo.get(ADMISSION_MEMO_KEY):
            return
        client = Runtime.of(memo).api.client
        ns = namespace or ""

        async def ask(where: str, review: dict[str, Any]) -> Mapping[str, Any]:
            reply = await client.request(
                "POST", f"/apis/authorization.k8s.io/v1/namespaces/{where}/"
                        "localsubjectaccessreviews", review)
            return (reply.get("status") or {}) if isinstance(reply, Mapping) else {}

        old_spec = old.get("spec") if old is not None else None
        try:
            await check_target(ask, userinfo, ns, dict(spec), old_spec, reach=config.reach,
                               policy=config.policy)
        except Refused as exc:
            raise kopf.AdmissionError(str(exc), code=403) from None
    return validate_target


async def cleanup(*, memo: kopf.Memo, **_: Any) -> None:
    runtime = memo.get(MEMO_KEY)
    if isinstance(runtime, Runtime):
        await runtime.close()


def relays_probe(*, memo: kopf.Memo, **_: Any) -> dict[str, int]:
    runtime = memo.get(MEMO_KEY)
    if not isinstance(runtime, Runtime):
        return {}
    return {"replicas": len(runtime.fleet.urls), "failing": len(runtime.fleet.failures)}


# -- indexes ---------------------------------------------------------------------------------
# Namespaced resources always have a namespace: `namespace or ""` only satisfies the type.

async def index_target(*, namespace: str | None, name: str, body: kopf.Body,
                       **_: Any) -> dict[ObjectKey, IndexedTarget] | None:
    if (body.get("metadata") or {}).get("deletionTimestamp"):
        return None  # leaving: not in the desired table any more
    return {(namespace or "", name): IndexedTarget.from_body(body)}


async def index_target_service(*, namespace: str | None, name: str, body: kopf.Body,
                               **_: Any) -> dict[ObjectKey, str] | None:
    service = endpoint_name(body, "service")
    return None if service is None else {(namespace or "", service): name}


async def index_target_kubevirt(*, namespace: str | None, name: str, body: kopf.Body,
                                **_: Any) -> dict[ObjectKey, str] | None:
    vm = endpoint_name(body, "kubevirt")
    return None if vm is None else {(namespace or "", vm): name}


def endpoint_name(body: Mapping[str, Any], kind: str) -> str | None:
    """The name in `spec.endpoint.<kind>` ("service" or "kubevirt"), read straight from the body.

    Every watch event of a VncTarget reaches each index: the spec is parsed once, by
    `index_target`, whose entry the evaluation uses. These two only say which targets to look
    at again when a Service or VM changes, so an invalid spec that names one costs no more than
    a needless look."""
    endpoint = (body.get("spec") or {}).get("endpoint")
    ref = endpoint.get(kind) if isinstance(endpoint, Mapping) else None
    found = ref.get("name") if isinstance(ref, Mapping) else None
    return found if isinstance(found, str) and found else None


async def index_service(*, namespace: str | None, name: str, body: kopf.Body,
                        **_: Any) -> dict[ObjectKey, ServiceInfo]:
    return {(namespace or "", name): service_info(body)}


def make_index_relay_slice(port: int) -> Callable[..., Any]:
    async def index_relay_slice(*, body: kopf.Body, **_: Any) -> dict[str, tuple[str, ...]]:
        return {"relays": relay_urls_from_slice(body, port)}
    return index_relay_slice


# -- watch events ----------------------------------------------------------------------------

async def service_changed(*, type: str | None, namespace: str | None, name: str,
                          memo: kopf.Memo, **_: Any) -> None:
    runtime = Runtime.of(memo)
    runtime.views_ready()
    if type is not None:  # not the initial listing: its targets are scheduled by their own
        runtime.service_changed(namespace or "", name)


async def relay_slice_changed(*, memo: kopf.Memo, **_: Any) -> None:
    Runtime.of(memo).views_ready()  # refreshes the replica set; a new replica kicks a resync


async def target_event(*, type: str | None, namespace: str | None, name: str,
                       body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    runtime = Runtime.of(memo)
    runtime.views_ready()
    await runtime.target_event(type, f"{namespace or ''}/{name}", body)


def build_registry(config: OperatorSettings, *, prober: Prober = probe_rfb,
                   connect: Connect = operator_connection) -> kopf.OperatorRegistry:
    """A fresh registry with every vncgate handler bound to `config`.

    `connect` gives the credentials of the operator's own API client (status and Events)."""
    registry = kopf.OperatorRegistry()
    # A bare OperatorRegistry has none of the login handlers that kopf's default registry adds,
    # and without one the operator cannot authenticate at all. Errors are ignored as kopf
    # ignores them for its own fallbacks, so that another login handler (the emulator tests
    # add one) can still succeed.
    kopf.on.login(registry=registry, errors=kopf.ErrorsMode.IGNORED)(login)
    kopf.on.startup(registry=registry, id="startup")(make_startup(config, prober, connect))
    kopf.on.cleanup(registry=registry)(cleanup)
    kopf.on.probe(registry=registry, id="relays")(relays_probe)

    kopf.index(*TARGETS, registry=registry, id="vnctargets")(index_target)
    kopf.index(*TARGETS, registry=registry, id="targets_by_service")(index_target_service)
    kopf.index(*TARGETS, registry=registry, id="targets_by_kubevirt")(index_target_kubevirt)
    kopf.index("v1", "services", registry=registry, id="services")(index_service)
    kopf.on.event("v1", "services", registry=registry)(service_changed)
    if config.relay_service is not None:
        relay_namespace, relay_service = config.relay_service
        slices: dict[str, Any] = {
            "labels": {"kubernetes.io/service-name": relay_service},
            "when": lambda namespace, **_: namespace == relay_namespace,
        }
        kopf.index("discovery.k8s.io", "v1", "endpointslices", registry=registry,
                   id="relay_slices", **slices)(make_index_relay_slice(config.relay_port))
        kopf.on.event("discovery.k8s.io", "v1", "endpointslices", registry=registry,
                      id="relay_slice_changed", **slices)(relay_slice_changed)
    kopf.on.event(*TARGETS, registry=registry)(target_event)
    if config.webhook_listen is not None:
        # Only with a server: kopf refuses to run admission handlers without one.
        kopf.on.validate(*TARGETS, registry=registry, id=WEBHOOK_ID,
                         operations=["CREATE", "UPDATE"])(make_validate(config))
    return registry
