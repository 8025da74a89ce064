"""The cluster side of `python -m bench.operator`, in a process of its own.

It holds everything the operator talks to, so that the benchmark's own process holds the operator
alone (its RSS and CPU are the operator's) and the two use different cores:

- kmock's `KubernetesEmulator` behind `kmock.Server` on 127.0.0.1, with the resources declared as
  `tests/operator/conftest.py` declares them;
- two real `vncgate.relay.web.server.RelayServer` replicas on 127.0.0.1 (port 0), each behind a TCP
  proxy that counts the bytes of the registration API both ways (the operator is given the proxies);
- an RFB greeter (`RFB 003.008\\n`, security type None), the address of every VncTarget, so
  probes succeed;
- a control API for the benchmark: create VncTargets (one at a time, or many at once), the time
  each route first appeared on both replicas, empty a replica, read the byte counters.

Times are `time.monotonic()`, which is one clock for every process on Linux (CLOCK_MONOTONIC).
A route counts as live on a replica when that replica's `Registry.put` stored it: the benchmark
wraps `put` on the two registry instances (`replace` goes through `put` too), which is exact and
costs nothing, where polling 5,000 keys would cost the cluster's CPU. Writes the first line on
stdout: {"kmock": URL, "relays": [proxy URLs], "control": URL, "greeter_port": N}.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import kmock
import psutil
from aiohttp import web

from bench.limits import raise_fd_limit
from bench.loops import new_event_loop
from vncgate.common.addresses import Address
from vncgate.common.model import Route
from vncgate.relay.settings import RelaySettings
from vncgate.relay.web.server import RelayServer

TARGETS = "vncgate.io/v1alpha1/vnctargets"
TARGETS_PATH = "/apis/vncgate.io/v1alpha1/namespaces/{ns}/vnctargets"
GREETING = b"RFB 003.008\n"
TOKEN = os.environ.get("VNCGATE_BENCH_TOKEN", "b" * 32)
NAMESPACE = "bench"
_generated = itertools.count(1)


class InFlightRequests(list):  # type: ignore[type-arg]
    """kmock's request log, reduced to what the emulator needs: the requests being served.

    kmock decides which reaction serves a request with `request in reaction_view`, which walks
    the whole log of past requests and filters each one until it meets this one: O(requests so
    far) per reaction per request, and a reaction that does not match walks all of it. Here the
    log holds only the requests in flight (a few watches and the requests being answered);
    `len()` still counts every request, which kmock uses to number them."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, Any] = {}
        self._count = 0

    def append(self, item: Any) -> None:
        self._live[id(item)] = item
        self._count += 1

    def done(self, item: Any) -> None:
        self._live.pop(id(item), None)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._live.values()))


class IndexedEmulator(kmock.KubernetesEmulator):
    """kmock's emulator without its O(N) costs per request, so that it does not bound the run.

    Stock kmock (0.8) does two scans per request: `__get_objs` walks every object it holds to
    find the one a get, patch or delete names, and the reaction lookup walks every past request
    (see `RecentRequests`). With N objects and R requests that is O(N·R) over a run, quadratic in
    the number of VncTargets, which is not what a Kubernetes API server does. Here single-object
    requests (namespace and name known) are a dict lookup and the request log is `InFlightRequests`;
    lists and watches keep kmock's own code. It also names objects created with only
    `metadata.generateName` (kopf's Events), which stock kmock stores all under the name None, so
    that every Event after the first fails with 409. `--stock-kmock` turns all three off.
    """

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._requests = InFlightRequests()

    async def _handle(self, request: Any) -> Any:
        data = request.data
        if request.action == kmock.action.CREATE and isinstance(data, dict):
            meta = data.get("metadata")
            if isinstance(meta, dict) and not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{next(_generated):x}"
        try:
            return await super()._handle(request)
        finally:
            requests = self._requests
            if isinstance(requests, InFlightRequests):
                requests.done(request)

    def _KubernetesEmulator__get_objs(self, request: Any, strict: bool) -> list[Any]:
        if request.name is not None and (strict or request.namespace is not None):
            obj = self._objects._objects.get((request.resource, request.namespace, request.name))
            return [] if obj is None else [obj]
        objs = []
        for (resource, namespace, name), obj in self._objects.items():
            namespace_ok = (namespace == request.namespace if strict else
                            (request.namespace is None or namespace == request.namespace))
            if resource == request.resource and namespace_ok and (
                    request.name is None or name == request.name):
                objs.append(obj)
        return objs


def declare_resources(k8s: Any) -> None:
    """As tests/operator/conftest.py does: every resource the operator lists, watches or writes."""
    every = {"list", "watch", "get", "patch", "create", "delete", "update"}
    k8s.resources[TARGETS] = {"kind": "VncTarget", "singular": "vnctarget", "namespaced": True,
                              "verbs": every, "shortnames": {"vnc"}, "subresources": {"status"}}
    k8s.resources["v1/namespaces"] = {"kind": "Namespace", "namespaced": False,
                                      "verbs": {"list", "watch", "get"}}
    k8s.resources["v1/services"] = {"kind": "Service", "namespaced": True, "verbs": every}
    k8s.resources["discovery.k8s.io/v1/endpointslices"] = {"kind": "EndpointSlice",
                                                           "namespaced": True, "verbs": every}
    k8s.resources["v1/events"] = {"kind": "Event", "namespaced": True,
                                  "verbs": {"create", "list"}}


class CountingProxy:
    """TCP proxy to one relay's internal port; counts the bytes each way."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.to_relay = 0
        self.from_relay = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            writer.close()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, upward: bool) -> None:
            try:
                while chunk := await src.read(262144):
                    if upward:
                        self.to_relay += len(chunk)
                    else:
                        self.from_relay += len(chunk)
                    dst.write(chunk)
                    await dst.drain()
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    dst.close()

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A password-less VNC server as far as the probe looks: the greeting, security type None
    and SecurityResult OK, then wait for the hang-up (the probe stops before ClientInit)."""
    try:
        writer.write(GREETING)
        await writer.drain()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await reader.readexactly(12)  # the client's version
                writer.write(b"\x01\x01")  # one security type: None
                await reader.readexactly(1)  # the client's choice
                writer.write(b"\x00\x00\x00\x00")  # SecurityResult OK
                await reader.read(1024)
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


class Seen:
    """When each route key was first stored by each replica (monotonic seconds)."""

    def __init__(self, replicas: int) -> None:
        self.first: list[dict[str, float]] = [{} for _ in range(replicas)]
        self.waiters: dict[str, asyncio.Event] = {}

    def hook(self, index: int, put: Callable[[Route], bool]) -> Callable[[Route], bool]:
        table = self.first[index]

        def recording_put(route: Route) -> bool:
            changed = put(route)
            key = route.key
            if key not in table:
                table[key] = time.monotonic()
                waiter = self.waiters.get(key)
                if waiter is not None and all(key in t for t in self.first):
                    waiter.set()
            return changed

        return recording_put

    def on_all(self, key: str) -> float | None:
        times = [t.get(key) for t in self.first]
        return None if any(t is None for t in times) else max(t for t in times if t is not None)


def target_body(name: str, port: int) -> dict[str, Any]:
    return {"apiVersion": "vncgate.io/v1alpha1", "kind": "VncTarget",
            "metadata": {"namespace": NAMESPACE, "name": name, "uid": f"uid-{name}",
                         "resourceVersion": "1", "generation": 1},
            "spec": {"endpoint": {"address": {"host": "127.0.0.1", "port": port}},
                     "displayName": name}}


class Cluster:
    def __init__(self, indexed: bool) -> None:
        self.k8s = (IndexedEmulator if indexed else kmock.KubernetesEmulator)()
        self.relays = [RelayServer(RelaySettings(listen=Address("127.0.0.1", 0),
                                                 internal_listen=Address("127.0.0.1", 0),
                                                 api_token=TOKEN)) for _ in range(2)]
        self.proxies: list[CountingProxy] = []
        self.seen = Seen(len(self.relays))
        self.greeter_port = 0
        self.kmock_url = ""
        self.http: aiohttp.ClientSession | None = None
        self.stop = asyncio.Event()
        self.process = psutil.Process()

    # -- creating objects ---------------------------------------------------------------------

    async def _post(self, body: dict[str, Any]) -> None:
        assert self.http is not None
        url = self.kmock_url + TARGETS_PATH.format(ns=NAMESPACE)
        async with self.http.post(url, json=body) as resp:
            text = await resp.text()
            if resp.status >= 400:
                raise RuntimeError(f"create {body['metadata']['name']}: {resp.status} {text[:300]}")

    def _phase(self, name: str) -> str | None:
        try:
            obj = self.k8s.objects[TARGETS, NAMESPACE, name]
        except KeyError:
            return None
        status = (obj.raw or {}).get("status") or {}
        phase = status.get("phase")
        return phase if isinstance(phase, str) else None

    async def create_one_by_one(self, prefix: str, count: int, within: float) -> dict[str, Any]:
        """Create, wait until both replicas hold the route and status says Ready; next."""
        live: list[float] = []
        ready: list[float] = []
        missed = 0
        for i in range(count):
            name = f"{prefix}-{i:05d}"
            key = f"{NAMESPACE}/{name}"
            waiter = self.seen.waiters[key] = asyncio.Event()
            start = time.monotonic()
            await self._post(target_body(name, self.greeter_port))
            try:
                async with asyncio.timeout(within):
                    await waiter.wait()
                    at = self.seen.on_all(key)
                    assert at is not None
                    live.append(at - start)
                    for _ in range(int(within / 0.002)):  # bounded: the timeout cuts it first
                        if self._phase(name) == "Ready":
                            ready.append(time.monotonic() - start)
                            break
                        await asyncio.sleep(0.002)
            except TimeoutError:
                missed += 1
            finally:
                self.seen.waiters.pop(key, None)
        return {"live_s": live, "ready_s": ready, "missed": missed}

    async def create_many(self, prefix: str, count: int, concurrency: int) -> dict[str, Any]:
        """Create `count` VncTargets as fast as the emulator takes them."""
        names = iter([f"{prefix}-{i:05d}" for i in range(count)])

        async def worker() -> None:
            for name in names:
                await self._post(target_body(name, self.greeter_port))

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return {"start": start, "end": time.monotonic()}

    def progress(self, prefix: str, count: int) -> dict[str, Any]:
        """How many of prefix-00000..count-1 each replica holds; when the last reached both."""
        keys = [f"{NAMESPACE}/{prefix}-{i:05d}" for i in range(count)]
        held = [sum(1 for k in keys if k in table) for table in self.seen.first]
        all_at = None
        if all(h == count for h in held):
            all_at = max(self.seen.on_all(k) or 0.0 for k in keys)
        return {"held": held, "all_at": all_at,
                "registry_sizes": [len(r.registry) for r in self.relays]}

    def ready_count(self, prefix: str) -> dict[str, int]:
        phases: dict[str, int] = {}
        for (_, ns, name), obj in list(self.k8s.objects.items()):
            if ns == NAMESPACE and name.startswith(prefix) and not obj.deleted:
                phase = ((obj.raw or {}).get("status") or {}).get("phase") or "none"
                phases[phase] = phases.get(phase, 0) + 1
        return phases

    # -- the control API ----------------------------------------------------------------------

    def control_app(self) -> web.Application:
        routes = web.RouteTableDef()

        @routes.post("/create")
        async def create(request: web.Request) -> web.Response:
            body = await request.json()
            if body.get("one_by_one"):
                result = await self.create_one_by_one(body["prefix"], int(body["count"]),
                                                      float(body.get("timeout", 30)))
            else:
                result = await self.create_many(body["prefix"], int(body["count"]),
                                                int(body.get("concurrency", 16)))
            return web.json_response(result)

        @routes.get("/progress")
        async def progress(request: web.Request) -> web.Response:
            return web.json_response(self.progress(request.query["prefix"],
                                                   int(request.query["count"])))

        @routes.get("/phases")
        async def phases(request: web.Request) -> web.Response:
            return web.json_response(self.ready_count(request.query["prefix"]))

        @routes.post("/empty")
        async def empty(request: web.Request) -> web.Response:
            index = int((await request.json())["replica"])
            self.relays[index].registry.replace([])
            self.seen.first[index].clear()
            return web.json_response({"size": len(self.relays[index].registry)})

        @routes.get("/bytes")
        async def bytes_(_: web.Request) -> web.Response:
            return web.json_response([{"to_relay": p.to_relay, "from_relay": p.from_relay}
                                      for p in self.proxies])

        @routes.get("/usage")
        async def usage(_: web.Request) -> web.Response:
            cpu = self.process.cpu_times()
            return web.json_response({"rss": self.process.memory_info().rss,
                                      "cpu": cpu.user + cpu.system,
                                      "objects": len(self.k8s.objects)})

        @routes.post("/quit")
        async def quit_(_: web.Request) -> web.Response:
            self.stop.set()
            return web.json_response({})

        app = web.Application()
        app.add_routes(routes)
        return app

    async def run(self) -> None:
        declare_resources(self.k8s)
        greeter = await asyncio.start_server(greet, "127.0.0.1", 0, backlog=1024)
        self.greeter_port = greeter.sockets[0].getsockname()[1]
        runner = web.AppRunner(self.control_app(), access_log=None)
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self.k8s)
            server = await stack.enter_async_context(kmock.Server(self.k8s))
            self.kmock_url = str(server.url).rstrip("/")
            for index, relay in enumerate(self.relays):
                await stack.enter_async_context(relay)
                registry = relay.registry
                registry.put = self.seen.hook(  # type: ignore[method-assign,assignment]
                    index, registry.put)
                port = int(relay.internal_url.rsplit(":", 1)[1])
                proxy = CountingProxy(port)
                self.proxies.append(proxy)
            urls = [await p.start() for p in self.proxies]
            self.http = await stack.enter_async_context(aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64)))
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            control_port = runner.addresses[0][1]
            print(json.dumps({"kmock": self.kmock_url, "relays": urls,
                              "control": f"http://127.0.0.1:{control_port}",
                              "greeter_port": self.greeter_port, "token": TOKEN,
                              "relay_internal": [r.internal_url for r in self.relays]}),
                  flush=True)
            # Bounded: the parent asks us to quit, or closes our stdin by dying.
            stdin_closed = asyncio.ensure_future(asyncio.to_thread(sys.stdin.read))
            quit_asked = asyncio.ensure_future(self.stop.wait())
            await asyncio.wait([stdin_closed, quit_asked], timeout=3600,
                               return_when=asyncio.FIRST_COMPLETED)
            quit_asked.cancel()
            await runner.cleanup()
            for proxy in self.proxies:
                proxy.close()
            greeter.close()
        os._exit(0)  # the stdin reader thread cannot be cancelled


def main() -> None:
    raise_fd_limit()
    indexed = "--stock-kmock" not in sys.argv
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(Cluster(indexed).run())


if __name__ == "__main__":
    main()
