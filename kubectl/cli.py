"""`kubectl vnc` (the console script `kubectl-vnc`): list, open, link, proxy, sessions, kill.

`list` and `open` read VncTargets from the API server with the user's kubeconfig. `link`,
`proxy`, `sessions` and `kill` go to the relay (found in the target's status.url, or
`--relay-url`) with a token for the user's own identity, minted for the relay's audience where
the relay asks for one (kubectl/relaytoken.py); the relay decides with RBAC (verbs `share`,
`connect`, `sessions`, `disconnect` on vnctargets) and says why when it refuses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import ssl
import sys
import time
import webbrowser
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from vncgate.common import installed_version
from vncgate.common.envflags import FlagParser
from vncgate.common.kubetls import KubeConfigError
from vncgate.common.spec import API_GROUP, PLURAL, SpecError, check_key, parse_duration
from vncgate.kubectl import kubeconfig, localpeer, relaytoken
from vncgate.kubectl.kubeconfig import NoToken, UserConfig
from vncgate.kubectl.proxy import Tunnel, own_user_only, serve

VERSION = "v1alpha1"


class Failure(Exception):
    """What went wrong, in words for the user; exit status 1."""


# -- the API server --------------------------------------------------------------------------------

def _targets_path(namespace: str | None, name: str | None = None) -> str:
    base = f"/apis/{API_GROUP}/{VERSION}"
    if namespace is None:
        return f"{base}/{PLURAL}"
    path = f"{base}/namespaces/{namespace}/{PLURAL}"
    return f"{path}/{name}" if name else path


async def _get(user: UserConfig, path: str) -> Any:
    """GET from the API server; its own message (RBAC's refusal, not found) as a Failure."""
    connection = user.connection
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http, \
                http.get(f"{connection.server}{path}", headers=await connection.headers(),
                         ssl=connection.ssl_context) as resp:
            text = await resp.text()
            if resp.status >= 400:
                raise Failure(_api_error(resp.status, text))
            return json.loads(text)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise Failure(f"cannot reach the API server {connection.server}: {exc}") from None


def _api_error(status: int, text: str) -> str:
    message = text.strip()[:500]
    with contextlib.suppress(ValueError):
        body = json.loads(text)
        if isinstance(body, dict) and body.get("message"):
            message = str(body["message"])
    if status == 404 and "could not find the requested resource" in message:
        return "the API server does not serve vnctargets.vncgate.io: is vncgate installed?"
    return f"{message} (HTTP {status})"


async def _target(user: UserConfig, name: str) -> dict[str, Any]:
    body = await _get(user, _targets_path(user.namespace, name))
    return body if isinstance(body, dict) else {}


def _relay_base(args: argparse.Namespace, target: dict[str, Any] | None) -> str:
    """The relay's public address: --relay-url, $VNCGATE_RELAY_URL, or the target's URL."""
    given = args.relay_url or os.environ.get("VNCGATE_RELAY_URL")
    if given:
        return str(given).rstrip("/")
    if target is not None:
        meta, status = target.get("metadata") or {}, target.get("status") or {}
        url = str(status.get("url") or "")
        suffix = f"/t/{meta.get('namespace')}/{meta.get('name')}/"
        if url.endswith(suffix):
            return url[: -len(suffix)]
        raise Failure(f"{meta.get('namespace')}/{meta.get('name')} has no URL yet (phase "
                      f"{status.get('phase') or 'unknown'}): the operator writes status.url "
                      "when it runs with --public-url; or give --relay-url")
    raise Failure("no relay address: give --relay-url (or set VNCGATE_RELAY_URL)")


async def _base_for(args: argparse.Namespace, user: UserConfig, name: str) -> str:
    """The relay of target `name`: --relay-url, or read from the target (which needs `get`)."""
    if args.relay_url or os.environ.get("VNCGATE_RELAY_URL"):
        return _relay_base(args, None)
    return _relay_base(args, await _target(user, name))


# -- the relay -------------------------------------------------------------------------------------

def relay_tls(args: argparse.Namespace) -> ssl.SSLContext | bool:
    """How the relay's https certificate is checked: the system's CAs, --certificate-authority
    (a relay with a CA of its own), or not at all (--insecure-skip-tls-verify)."""
    if args.insecure_skip_tls_verify:
        if args.certificate_authority:
            raise Failure("--certificate-authority and --insecure-skip-tls-verify exclude each "
                          "other: give one")
        return False
    if not args.certificate_authority:
        return True
    try:
        return ssl.create_default_context(cafile=args.certificate_authority)
    except (OSError, ssl.SSLError) as exc:
        raise Failure(f"--certificate-authority {args.certificate_authority}: cannot read a "
                      f"PEM certificate from it ({exc})") from None


async def _relay(args: argparse.Namespace, bearer: relaytoken.Bearer, method: str, url: str,
                 body: Any = None) -> Any:
    headers = {"Authorization": await bearer(), "Content-Type": "application/json"}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http, \
                http.request(method, url, headers=headers, ssl=relay_tls(args),
                             data=None if body is None else json.dumps(body)) as resp:
            text = await resp.text()
            try:
                reply = json.loads(text)
            except ValueError:
                reply = {"error": text.strip()[:300]}
            if resp.status >= 400:
                error = reply.get("error") if isinstance(reply, dict) else None
                raise Failure(f"the relay refused ({resp.status}): {error or resp.reason}")
            return reply
    except aiohttp.ClientConnectorCertificateError as exc:
        raise Failure(f"the relay at {urlsplit(url).netloc} has a certificate this machine "
                      f"does not trust ({exc.certificate_error}): give the CA that signed it "
                      "with --certificate-authority FILE") from None
    except aiohttp.ClientError as exc:
        raise Failure(f"cannot reach the relay at {urlsplit(url).netloc}: {exc}") from None


# -- commands --------------------------------------------------------------------------------------

def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(cell.ljust(width) for cell, width in zip(row, widths,
                                                                         strict=True)).rstrip()
                     for row in rows)


async def cmd_list(args: argparse.Namespace, user: UserConfig) -> int:
    namespace = None if args.all_namespaces else user.namespace
    body = await _get(user, _targets_path(namespace))
    items = sorted(body.get("items") or (), key=lambda i: (i["metadata"]["namespace"],
                                                            i["metadata"]["name"]))
    if not items:
        where = "any namespace" if namespace is None else f"namespace {namespace}"
        print(f"No VncTargets in {where}.", file=sys.stderr)
        return 0
    header = ["NAME", "PHASE", "VIEWERS", "URL"]
    if namespace is None:
        header.insert(0, "NAMESPACE")
    rows = [header]
    for item in items:
        status = item.get("status") or {}
        row = [item["metadata"]["name"], str(status.get("phase") or "Pending"),
               str(status.get("activeSessions", 0)), str(status.get("url") or "")]
        if namespace is None:
            row.insert(0, item["metadata"]["namespace"])
        rows.append(row)
    print(_table(rows))
    return 0


async def cmd_open(args: argparse.Namespace, user: UserConfig) -> int:
    base = await _base_for(args, user, args.name)
    url = f"{base}/t/{user.namespace}/{args.name}/"
    print(url)
    if not args.no_browser and not webbrowser.open(url):
        print("kubectl vnc: no browser found here; open the URL above", file=sys.stderr)
    return 0


async def cmd_link(args: argparse.Namespace, user: UserConfig) -> int:
    try:
        parse_duration(args.ttl, "--ttl")
    except SpecError as exc:
        raise Failure(str(exc)) from None
    base = await _base_for(args, user, args.name)
    bearer = await relaytoken.for_relay(user, base, relay_tls(args))
    reply = await _relay(args, bearer, "POST", f"{base}/api/v1/links/{user.namespace}/{args.name}",
                         {"ttl": args.ttl, "viewOnly": args.view_only, "once": args.once})
    print(reply["url"])
    expires = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(int(reply["expires"])))
    what = ", ".join(w for w, on in (("view-only", args.view_only), ("one use", args.once)) if on)
    print(f"valid until {expires}" + (f" ({what})" if what else ""), file=sys.stderr)
    return 0


async def _sessions_base(args: argparse.Namespace, user: UserConfig,
                         namespace: str | None) -> str:
    if args.relay_url or os.environ.get("VNCGATE_RELAY_URL"):
        return _relay_base(args, None)
    if getattr(args, "name", None):
        return await _base_for(args, user, args.name)
    body = await _get(user, _targets_path(namespace))
    for item in body.get("items") or ():
        with contextlib.suppress(Failure):
            return _relay_base(args, item)
    raise Failure("no VncTarget here has a URL to find the relay by; give --relay-url")


async def cmd_sessions(args: argparse.Namespace, user: UserConfig) -> int:
    namespace = None if args.all_namespaces else user.namespace
    base = await _sessions_base(args, user, namespace)
    query = f"?namespace={quote(namespace)}" if namespace else ""
    if args.name and namespace:
        query += f"&name={quote(args.name)}"
    reply = await _relay(args, await relaytoken.for_relay(user, base, relay_tls(args)), "GET",
                         f"{base}/api/v1/sessions{query}")
    sessions = [s for s in reply.get("sessions") or ()
                if not args.name or s.get("name") == args.name]
    for missing in reply.get("unreachable") or ():
        print(f"kubectl vnc: warning: no answer from relay replica {missing}; its sessions "
              "are missing", file=sys.stderr)
    if not sessions:  # the relay refuses (exit 1) those who may not see any here
        print("No sessions.", file=sys.stderr)
        return 0
    header = ["NAME", "SESSION", "USER", "CLIENT", "AGE", "MODE", "REPLICA"]
    if namespace is None:
        header.insert(0, "NAMESPACE")
    rows = [header]
    now = time.time()
    for s in sessions:
        row = [str(s["name"]), str(s["id"]), str(s.get("user") or "anonymous"),
               str(s.get("client", "")), _age(now - float(s.get("since", now))),
               "view-only" if s.get("viewOnly") else "interactive", str(s.get("replica", ""))]
        if namespace is None:
            row.insert(0, str(s["namespace"]))
        rows.append(row)
    print(_table(rows))
    return 0


async def cmd_kill(args: argparse.Namespace, user: UserConfig) -> int:
    base = await _base_for(args, user, args.name)
    query = f"?session={quote(args.session)}" if args.session else ""
    reply = await _relay(args, await relaytoken.for_relay(user, base, relay_tls(args)), "DELETE",
                         f"{base}/api/v1/sessions/{user.namespace}/{args.name}{query}")
    for missing in reply.get("unreachable") or ():
        print(f"kubectl vnc: warning: no answer from relay replica {missing}", file=sys.stderr)
    ended = int(reply.get("ended", 0))
    target = f"{user.namespace}/{args.name}"
    if args.session and ended == 0:
        raise Failure(f"no session {args.session} on {target} (kubectl vnc sessions lists them)")
    print(f"ended {ended} session{'s' if ended != 1 else ''} of {target}")
    return 0


async def cmd_proxy(args: argparse.Namespace, user: UserConfig) -> int:
    base = await _base_for(args, user, args.name)
    # Now, not at the viewer's first connection: fail without a token that fits the relay.
    # A relay that cannot be reached yet is asked again at each viewer, who is told why.
    bearer: relaytoken.Bearer
    try:
        bearer = await relaytoken.for_relay(user, base, relay_tls(args))
    except relaytoken.Unreachable as exc:
        print(f"kubectl vnc proxy: {exc}; viewers are told so until it answers",
              file=sys.stderr)
        bearer = relaytoken.Deferred(user, base, relay_tls(args))
    ws_url = "ws" + base.removeprefix("http") + f"/t/{user.namespace}/{args.name}/websockify"
    if args.any_local_user:
        print("kubectl vnc proxy: --any-local-user: every process on this machine that reaches "
              f"the port opens {user.namespace}/{args.name} as you", file=sys.stderr)
    elif not localpeer.can_check():
        print("kubectl vnc proxy: this system cannot tell which user connects to a local port "
              "(no /proc/net/tcp), so the proxy would open the console as you for any local "
              "user; on a machine of your own, add --any-local-user", file=sys.stderr)
        return 2
    tunnel = Tunnel(ws_url, bearer, ssl_context=relay_tls(args),
                    allowed=None if args.any_local_user else own_user_only)

    def started(port: int) -> None:
        print(f"Forwarding 127.0.0.1:{port} -> {user.namespace}/{args.name} through "
              f"{urlsplit(base).netloc}; connect a viewer, e.g. vncviewer {args.address}::{port}"
              " (Ctrl-C stops)", flush=True)

    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        if task is not None:
            loop.add_signal_handler(signum, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await serve(tunnel, args.address, args.port, started)
    return 0


COMMANDS = {"list": cmd_list, "open": cmd_open, "link": cmd_link, "proxy": cmd_proxy,
            "sessions": cmd_sessions, "kill": cmd_kill}


def build_parser() -> argparse.ArgumentParser:
    common = FlagParser(add_help=False)
    common.add_argument("-n", "--namespace", help="the namespace (default: the context's)")
    common.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, "
                                             "~/.kube/config)")
    common.add_argument("--context", help="kubeconfig context (default: the current one)")
    common.add_argument("--token", default=os.environ.get("VNCGATE_TOKEN"),
                        help="bearer token for the relay instead of one minted for it, e.g. "
                             "$(kubectl create token NAME --audience AUDIENCE); default "
                             "$VNCGATE_TOKEN")
    common.add_argument("--relay-url", help="the relay's public address (default: from the "
                                            "target's status.url; $VNCGATE_RELAY_URL)")
    # kubectl's own names; here they are about the relay (the kubeconfig says how the API
    # server's certificate is checked).
    common.add_argument("--certificate-authority", metavar="FILE",
                        default=os.environ.get("VNCGATE_CERTIFICATE_AUTHORITY"),
                        help="PEM CA that signed the relay's https certificate (a relay with "
                             "its own CA); default $VNCGATE_CERTIFICATE_AUTHORITY")
    common.add_argument("--insecure-skip-tls-verify", action="store_true",
                        help="do not check the relay's https certificate (insecure: anyone "
                             "in between sees your token)")
    parser = FlagParser(
        prog="kubectl vnc", description="VNC consoles of the cluster, through vncgate.")
    parser.add_argument("--version", action="version",
                        version=f"kubectl-vnc {installed_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = commands.add_parser("list", parents=[common], help="VncTargets: phase, viewers, "
                                                                 "URL")
    listing.add_argument("-A", "--all-namespaces", action="store_true")
    opening = commands.add_parser("open", parents=[common], help="print the URL, open a browser")
    opening.add_argument("name")
    opening.add_argument("--no-browser", action="store_true", help="only print the URL")
    link = commands.add_parser("link", parents=[common],
                               help="mint a share link (RBAC: share on vnctargets)")
    link.add_argument("name")
    link.add_argument("--ttl", default="1h", help="how long it works, e.g. 30m (default 1h)")
    link.add_argument("--view-only", action="store_true", help="its holder may only watch")
    link.add_argument("--once", action="store_true", help="it opens the viewer once")
    proxy = commands.add_parser("proxy", parents=[common],
                                help="a local port for a native VNC viewer")
    proxy.add_argument("name")
    proxy.add_argument("--port", type=int, default=5900, help="local port (default 5900; "
                                                              "0: any free one)")
    proxy.add_argument("--address", default="127.0.0.1",
                       help="local address to listen on (default 127.0.0.1)")
    proxy.add_argument("--any-local-user", action="store_true",
                       help="accept viewers of every user of this machine, not only yours "
                            "(needed where the owner of a connection cannot be read: not Linux)")
    sessions = commands.add_parser("sessions", parents=[common],
                                   help="who is connected (RBAC: sessions on vnctargets)")
    sessions.add_argument("name", nargs="?", help="only this target's sessions")
    sessions.add_argument("-A", "--all-namespaces", action="store_true")
    kill = commands.add_parser("kill", parents=[common],
                               help="end a target's sessions (RBAC: disconnect on vnctargets)")
    kill.add_argument("name")
    kill.add_argument("--session", help="only this session (an id from kubectl vnc sessions)")
    return parser


async def _run(args: argparse.Namespace) -> int:
    user = await kubeconfig.load(args.kubeconfig, args.context, args.namespace, args.token)
    return await COMMANDS[args.command](args, user)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "name", None):
        try:
            check_key(args.namespace or "default", args.name)
        except SpecError as exc:
            parser.error(str(exc))
    if args.command == "proxy" and not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: 0-65535")
    try:
        return asyncio.run(_run(args))
    except KubeConfigError as exc:
        path = kubeconfig.kubeconfig_path(args.kubeconfig)
        print(f"kubectl vnc: cannot use the kubeconfig {path}: {exc}", file=sys.stderr)
    except NoToken as exc:
        print(f"kubectl vnc: {exc}", file=sys.stderr)
    except Failure as exc:
        print(f"kubectl vnc: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
