"""vncgate's bridge in your aiohttp app: `python examples/embed_app.py desk=127.0.0.1:5901`."""

import argparse
import os
from pathlib import Path

from aiohttp import web

import vncgate.relay
from vncgate.relay.embed import Bridge, Denied, Route, Viewer

NOVNC = Path(vncgate.relay.__file__).parent / "static" / "novnc"
PAGE = """<!doctype html><title>{name}</title><div id="screen" style="height:95vh"></div>
<script type="module">import RFB from "/novnc/core/rfb.js"; const ws = "ws" + origin.slice(4);
new RFB(document.getElementById("screen"), ws + "/vnc/{name}");</script>"""


def make_app(targets: dict[str, str]) -> web.Application:
    async def lookup(request: web.Request) -> Route | None:  # your own target lookup
        host, _, port = targets.get(name := request.match_info["name"], ":0").rpartition(":")
        return Route("app", name, host, int(port)) if name in targets else None

    async def authorize(request: web.Request, route: Route) -> Viewer | Denied:
        user = request.cookies.get("user", "")  # stands in for your app's own sign-in
        return Viewer(user) if user == "alice" else Denied("sign in first", signed_in=False)

    async def page(request: web.Request) -> web.Response:  # http://127.0.0.1:PORT/desk/
        if (name := request.match_info["name"]) not in targets:
            raise web.HTTPNotFound()
        return web.Response(text=PAGE.format(name=name), content_type="text/html")

    bridge, app = Bridge(lookup, authorize), web.Application()
    app.add_routes([web.get("/{name}/", page), web.get("/vnc/{name}", bridge.handle)])
    app.router.add_static("/novnc/", NOVNC)
    bridge.attach(app)  # its sessions end (1001) when the app shuts down
    return app


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description="vncgate's bridge in an aiohttp app")
    cli.add_argument("targets", nargs="+", metavar="NAME=HOST:PORT")
    cli.add_argument("--port", type=int, default=os.environ.get("PORT", "8080"),
                     help="on 127.0.0.1 (default: $PORT, else 8080)")
    args = cli.parse_args()
    web.run_app(make_app(dict(t.split("=", 1) for t in args.targets)), host="127.0.0.1",
                port=args.port)
