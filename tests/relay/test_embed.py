"""The embeddable bridge (vncgate.relay.embed): its public surface, held still, and its
guarantees inside someone else's aiohttp app (examples/embed_app.py), over real sockets."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import logging
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import cast

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from harness import reaper
from harness.cluster import free_port
from harness.servers import GREETING, TcpServer, echo_rfb, not_vnc, serving
from harness.waiting import wait_until
from harness.xvnc import XvncServer
from tests.conftest import ROOT
from tests.relay.test_bridge import receive_close
from tests.relay.test_sessions import move_pointer_through_relay, pointer_position
from vncgate.relay import closecodes, embed
from vncgate.relay.embed import Bridge, BridgeSettings, Denied, Route, SessionPolicy, Viewer
from vncgate.relay.web.server import RelayServer

# The stable surface (docs/EMBEDDING.md). A change here is a change of the public API: make it
# on purpose, in the docs and the release notes, never by accident.
PUBLIC_NAMES = ["Authorize", "Bridge", "BridgeSettings", "Denied", "Lookup", "Route",
                "SessionPolicy", "Viewer"]
SIGNATURES = {
    "Bridge": "(lookup: 'Lookup', authorize: 'Authorize', "
              "settings: 'BridgeSettings | None' = None) -> 'None'",
    "Bridge.handle": "(self, request: 'web.Request') -> 'web.StreamResponse'",
    "Bridge.attach": "(self, app: 'web.Application') -> 'None'",
    "Bridge.close": "(self) -> 'None'",
}
FIELDS = {
    "Viewer": [("user", "str", dataclasses.MISSING), ("view_only", "bool", False)],
    "Denied": [("reason", "str", dataclasses.MISSING), ("signed_in", "bool", True)],
    "BridgeSettings": [
        ("connect_timeout", "float", 5.0), ("stall_timeout", "float", 60.0),
        ("heartbeat", "float", 30.0), ("max_message_size", "int", 4 * 1024 * 1024),
        ("max_sessions", "int", 10_000), ("max_sessions_per_target", "int", 100),
        ("allowed_origins", "tuple[str, ...]", ()), ("deny_cidrs", "tuple[str, ...]", ()),
        ("metrics_registry", "CollectorRegistry | None", None)],
    "Route": [
        ("namespace", "str", dataclasses.MISSING), ("name", "str", dataclasses.MISSING),
        ("host", "str", dataclasses.MISSING), ("port", "int", dataclasses.MISSING),
        ("display_name", "str", ""), ("view_only", "bool", False),
        ("access", "Access | None", None), ("sessions", "SessionPolicy", SessionPolicy()),
        ("recording", "RecordingPolicy | None", None),
        ("credentials", "Credentials | None", None), ("tls", "TlsSpec | None", None),
        ("kubevirt", "str | None", None), ("service", "bool", False),
        ("labels", "tuple[tuple[str, str], ...]", ()), ("thumbnail", "bool", False)],
}


def test_public_surface_is_unchanged() -> None:
    assert sorted(embed.__all__) == PUBLIC_NAMES
    for name in PUBLIC_NAMES:
        assert hasattr(embed, name), name
    assert str(inspect.signature(Bridge)) == SIGNATURES["Bridge"]
    for method in ("handle", "attach", "close"):
        assert str(inspect.signature(getattr(Bridge, method))) == SIGNATURES[f"Bridge.{method}"]
    assert [p for p in ("registry", "session_count") if isinstance(
        getattr(Bridge, p), property)] == ["registry", "session_count"]
    for cls_name, fields in FIELDS.items():
        cls = getattr(embed, cls_name)
        assert [(f.name, f.type, f.default) for f in dataclasses.fields(cls)] == fields, cls_name
    # Route's options by keyword only (a positional SessionPolicy once landed in `access`).
    assert [f.name for f in dataclasses.fields(Route) if not f.kw_only] == [
        "namespace", "name", "host", "port"]
    assert (ROOT / "relay" / "py.typed").exists()  # typed for the embedding app's mypy


EMBEDDING = ROOT / "docs" / "EMBEDDING.md"


def documented_signatures() -> dict[str, ast.arguments]:
    """The call forms of the table in docs/EMBEDDING.md (`| `Route(namespace, ...)` | ...`),
    parsed as the parameters of a function of that name."""
    found = {}
    for name, params in re.findall(r"^\| `(\w+)\((.*?)\)` \|", EMBEDDING.read_text(),
                                   re.MULTILINE):
        if params == "...":
            continue
        tree = ast.parse(f"def {name}({params}): pass")
        function = tree.body[0]
        assert isinstance(function, ast.FunctionDef)
        found[name] = function.args
    return found


@pytest.mark.parametrize("name", ["Bridge", "Viewer", "Denied", "Route", "SessionPolicy"])
def test_the_documented_signatures_are_the_real_ones(name: str) -> None:
    """What a reader of the table may write is what the code takes: the positional parameters
    by name and order, the keyword-only ones as keyword-only, each shown default as it is."""
    documented = documented_signatures()[name]
    real = inspect.signature(getattr(embed, name)).parameters
    positional = [p for p in real.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [a.arg for a in documented.args] == [p.name for p in positional], \
        f"docs/EMBEDDING.md: {name}'s positional parameters"
    for argument in documented.kwonlyargs:
        assert real[argument.arg].kind is inspect.Parameter.KEYWORD_ONLY, argument.arg
    shown = list(zip(documented.args[len(documented.args) - len(documented.defaults):],
                     documented.defaults, strict=True))
    shown += [(a, d) for a, d in zip(documented.kwonlyargs, documented.kw_defaults, strict=True)
              if d is not None]
    for argument, default in shown:
        value = eval(compile(ast.Expression(default), "EMBEDDING.md", "eval"),  # noqa: S307
                     vars(embed))
        assert real[argument.arg].default == value, f"{name}({argument.arg}=...)"


def test_route_takes_its_options_by_keyword_only() -> None:
    with pytest.raises(TypeError):
        Route("app", "desk", "127.0.0.1", 5900, "Desk")  # type: ignore[misc]
    route = Route("app", "desk", "127.0.0.1", 5900, sessions=SessionPolicy(max_viewers=2))
    assert route.sessions.max_viewers == 2 and route.access is None


async def test_the_documented_example_runs() -> None:
    """The example of docs/EMBEDDING.md, with the app's own parts it leaves to the reader."""
    (code,) = re.findall(r"^```python\n(.*?)^```", EMBEDDING.read_text(),
                         re.MULTILINE | re.DOTALL)

    async def my_app_user(request: object) -> str | None:
        return getattr(request, "user", None)

    scope = {"app": web.Application(), "my_app_user": my_app_user,
             "may_open": lambda user, route: user == "alice"}
    exec(compile(code, "EMBEDDING.md", "exec"), scope)  # noqa: S102 - the docs' own example
    route = await scope["lookup"](None)
    assert isinstance(route, Route) and route.key == "app/desk"
    assert await scope["authorize"](SimpleNamespace(user="alice"), route) == Viewer("alice")
    refused = await scope["authorize"](SimpleNamespace(user="bob"), route)
    assert isinstance(refused, Denied) and "bob may not open desk" in refused.reason
    assert await scope["authorize"](SimpleNamespace(), route) == Denied("sign in first",
                                                                       signed_in=False)
    assert isinstance(scope["bridge"], Bridge)
    assert [r.canonical for r in scope["app"].router.resources()] == ["/vnc/{name}"]


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("embed_app", ROOT / "examples" / "embed_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_is_under_50_lines() -> None:
    assert len((ROOT / "examples" / "embed_app.py").read_text().splitlines()) < 50


def _serve_example(flags: list[str], env: dict[str, str], port: int, log: Path) -> None:
    """Run the example as a program until its page answers on `port`; then stop it."""
    with log.open("wb") as output:
        process = reaper.popen(
            [sys.executable, ROOT / "examples" / "embed_app.py", *flags, "desk=127.0.0.1:1"],
            env={**os.environ, **env}, stdout=output, stderr=subprocess.STDOUT)
    try:
        def page() -> bool:
            assert process.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/desk/",
                                            timeout=5) as reply:
                    return b'"/vnc/desk"' in reply.read()
            except OSError:
                return False

        wait_until(page, f"the example's page on port {port}", context=log.read_text)
    finally:
        reaper.end(process)


def test_example_runs_on_the_port_it_is_given(tmp_path: Path) -> None:
    """`python examples/embed_app.py --port N NAME=HOST:PORT`, or $PORT: the app listens there
    (the default, 8080, is often taken); a port that is not a number is refused, saying so."""
    port = free_port()
    _serve_example(["--port", str(port)], {}, port, tmp_path / "flag.log")
    port = free_port()
    _serve_example([], {"PORT": str(port)}, port, tmp_path / "env.log")
    for flags, env in ((["--port", "eighty"], {}), ([], {"PORT": "eighty"})):
        refused = subprocess.run(
            [sys.executable, ROOT / "examples" / "embed_app.py", *flags, "desk=127.0.0.1:1"],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=60, check=False)
        assert refused.returncode == 2, refused.stderr
        assert "argument --port: invalid int value: 'eighty'" in refused.stderr


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_example_refuses_strangers_and_unknown_targets_then_bridges(
        http: aiohttp.ClientSession) -> None:
    async with TcpServer(echo_rfb) as backend, serving(load_example().make_app(
            {"desk": f"127.0.0.1:{backend.port}"})) as url:
        async with http.ws_connect(f"{url}/vnc/desk", protocols=("binary",)) as ws:
            assert await receive_close(ws) == (closecodes.UNAUTHENTICATED, "sign in first")
        async with http.ws_connect(f"{url}/vnc/nope", headers={"Cookie": "user=alice"}) as ws:
            assert (await receive_close(ws))[0] == closecodes.UNKNOWN_TARGET
        async with http.ws_connect(f"{url}/vnc/desk", protocols=("binary",),
                                   headers={"Cookie": "user=alice"}) as ws:
            assert ws.protocol == "binary"
            assert await ws.receive_bytes(timeout=5) == GREETING
            await ws.send_bytes(b"hello")
            assert await ws.receive_bytes(timeout=5) == b"hello"
        assert backend.connections == 1  # refused viewers never reached the server


async def test_foreign_origin_is_refused_before_the_upgrade(http: aiohttp.ClientSession) -> None:
    async with serving(load_example().make_app({"desk": "127.0.0.1:1"})) as url:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{url}/vnc/desk", headers={
                "Origin": "https://evil.example", "Cookie": "user=alice"})
        assert refused.value.status == 403
        async with http.ws_connect(f"{url}/vnc/desk", headers={
                "Origin": url, "Cookie": "user=nobody"}) as ws:  # its own origin passes
            assert (await receive_close(ws))[0] == closecodes.UNAUTHENTICATED


def bridge_app(route: Route, viewer: Callable[[web.Request], Viewer | Denied],
               settings: BridgeSettings | None = None, path: str = "/ws"
               ) -> tuple[Bridge, web.Application]:
    """A plain (not async) lookup and authorize: both kinds of callable are accepted."""
    bridge = Bridge(lambda request: route, lambda request, r: viewer(request), settings)
    app = web.Application()
    app.router.add_get(path, bridge.handle)
    bridge.attach(app)
    return bridge, app


async def test_not_vnc_is_refused_and_nothing_is_forwarded(http: aiohttp.ClientSession) -> None:
    async with TcpServer(not_vnc) as backend:
        bridge, app = bridge_app(Route("a", "ssh", "127.0.0.1", backend.port),
                                 lambda request: Viewer("alice"))
        async with serving(app) as url, http.ws_connect(f"{url}/ws") as ws:
            code, reason = await receive_close(ws)
    assert code == closecodes.BAD_UPSTREAM and "not a VNC server" in reason
    assert bridge.session_count == 0


async def test_a_kubevirt_route_is_refused_by_the_embedded_bridge(
        http: aiohttp.ClientSession) -> None:
    bridge, app = bridge_app(Route("a", "vm", "", 0, kubevirt="vm-1",
                                   sessions=SessionPolicy(mode="exclusive")),
                             lambda request: Viewer("alice"))
    async with serving(app) as url, http.ws_connect(f"{url}/ws") as ws:
        code, reason = await receive_close(ws)
    assert (code, reason) == (closecodes.INTERNAL_ERROR,
                              "this relay cannot open KubeVirt consoles")
    assert bridge.session_count == 0


async def test_denied_is_4403_with_the_apps_reason_and_metrics_go_to_its_registry(
        http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    async with TcpServer(echo_rfb) as backend:
        bridge, app = bridge_app(
            Route("a", "desk", "127.0.0.1", backend.port),
            lambda request: Viewer("bob") if request.query.get("u") == "bob"
            else Denied("only bob may open a/desk"),
            BridgeSettings(metrics_registry=registry))
        assert bridge.registry is registry
        with caplog.at_level(logging.INFO, "vncgate.session"):
            async with serving(app) as url:
                async with http.ws_connect(f"{url}/ws?u=eve") as ws:
                    assert await receive_close(ws) == (closecodes.FORBIDDEN,
                                                       "only bob may open a/desk")
                async with http.ws_connect(f"{url}/ws?u=bob") as ws:
                    assert await ws.receive_bytes(timeout=5) == GREETING
                    assert registry.get_sample_value(
                        "vncgate_sessions_active", {"namespace": "a", "name": "desk"}) == 1
    assert registry.get_sample_value(
        "vncgate_sessions_total", {"namespace": "a", "name": "desk", "code": "4403"}) == 1
    assert registry.get_sample_value(
        "vncgate_sessions_total", {"namespace": "a", "name": "desk", "code": "1000"}) == 1
    ends = [r for r in caplog.records if r.getMessage() == "session end"]
    assert [getattr(r, "fields", {})["user"] for r in ends] == ["", "bob"]


async def test_exclusive_console_refuses_a_second_viewer_and_shutdown_says_1001(
        http: aiohttp.ClientSession) -> None:
    route = Route("a", "desk", "127.0.0.1", 0, sessions=SessionPolicy(mode="exclusive"))
    async with TcpServer(echo_rfb) as backend:
        route = dataclasses.replace(route, port=backend.port)
        _, app = bridge_app(route, lambda request: Viewer(request.query["u"]))
        async with serving(app) as url:
            first = await http.ws_connect(f"{url}/ws?u=alice")
            assert await first.receive_bytes(timeout=5) == GREETING
            async with http.ws_connect(f"{url}/ws?u=bob") as second:
                code, reason = await receive_close(second)
            assert code == closecodes.CONFLICT and "alice" in reason
        # Leaving `serving` shut the app down: the open session was told why.
        assert await receive_close(first) == (
            closecodes.GOING_AWAY, "the server is shutting down; reconnect later")
        await first.close()


async def test_view_only_viewer_cannot_move_the_pointer(xvnc: XvncServer) -> None:
    route = Route("a", "desk", "127.0.0.1", xvnc.port)
    _, app = bridge_app(route, lambda request: Viewer("w", view_only="watch" in request.path),
                        path="/t/lab/{name}/websockify")  # the path the helper dials
    async with serving(app) as url:
        relay = cast(RelayServer, SimpleNamespace(public_url=url))
        await move_pointer_through_relay(relay, "drive", 100, 100)
        assert pointer_position(xvnc) == (100, 100)  # the check can see a move
        # A full round trip through the server follows the move: it was dropped, not late.
        await move_pointer_through_relay(relay, "watch", 321, 123)
        assert pointer_position(xvnc) == (100, 100)
        await move_pointer_through_relay(relay, "drive", 222, 111)
        assert pointer_position(xvnc) == (222, 111)



async def test_a_failing_callback_is_a_4500_and_logged(http: aiohttp.ClientSession,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    def broken(request: web.Request) -> Viewer:
        raise RuntimeError("the app's user store is down")

    _, app = bridge_app(Route("a", "desk", "127.0.0.1", 1), broken)
    with caplog.at_level(logging.ERROR, "vncgate.session"):
        async with serving(app) as url, http.ws_connect(f"{url}/ws") as ws:
            assert await receive_close(ws) == (closecodes.INTERNAL_ERROR,
                                               "internal error in the server; see its log")
    assert any("lookup or authorize failed" in r.getMessage() for r in caplog.records)
