"""`vncgate-relay`: the relay from the command line (standalone or as the chart runs it)."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from vncgate.common.envflags import FlagParser
from vncgate.common.kube import KubeConfigError
from vncgate.common.spec import SpecError, check_key, parse_duration
from vncgate.relay import logs
from vncgate.relay.access import links
from vncgate.relay.access.identity import AuthMode
from vncgate.relay.access.passwords import hash_secret
from vncgate.relay.manifests import ManifestError, load_routes
from vncgate.relay.recording.cli import recordings_main
from vncgate.relay.settings import RelaySettings, host_names, settings_from_args
from vncgate.relay.web.server import RelayServer
from vncgate.relay.web.tls import TlsError

log = logging.getLogger("vncgate.relay")


async def serve(settings: RelaySettings) -> None:
    standalone = bool(settings.targets_paths or settings.targets)
    routes = load_routes(settings.targets_paths, settings.targets) if standalone else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with RelayServer(settings, routes) as relay:
        log.info("relay listening", extra={"fields": {
            "public": relay.public_url, "internal": relay.internal_url,
            "metrics": relay.metrics_url or relay.internal_url,
            "routes": len(relay.registry),
            "registration_api": "on" if settings.api_token else "off (no --api-token-file)"}})
        for route in relay.registry:
            log.info("target", extra={"fields": {
                "target": route.key, "endpoint": route.address,
                "url": f"{relay.public_url}/t/{route.namespace}/{route.name}/"}})
        await stop.wait()
        log.info("shutting down: closing sessions")


def link_main(argv: Sequence[str]) -> int:
    """`vncgate-relay link NS/NAME --ttl 10m [--view-only] [--once]`: print a share link."""
    parser = FlagParser(
        prog="vncgate-relay link",
        description="Print a signed share link that opens one target until it expires. In a "
                    "cluster: kubectl exec deploy/vncgate-relay -- vncgate-relay link NS/NAME")
    parser.add_argument("target", help="NAMESPACE/NAME of the target")
    parser.add_argument("--ttl", default="1h", help="how long the link works (default 1h)")
    parser.add_argument("--view-only", action="store_true", help="the holder may only watch")
    parser.add_argument("--once", action="store_true", help="the link opens the viewer once")
    parser.add_argument("--link-key-file", type=Path, action="append", default=None,
                        help="the signing key (default: $VNCGATE_LINK_KEY_FILE; the first one)")
    parser.add_argument("--public-url", default=os.environ.get("VNCGATE_PUBLIC_URL", ""),
                        help="the relay's address as browsers see it (default $VNCGATE_PUBLIC_URL)")
    args = parser.parse_args(argv)
    namespace, slash, name = args.target.partition("/")
    try:
        if not slash:
            raise ValueError(f"{args.target!r}: write NAMESPACE/NAME")
        check_key(namespace, name)
        ttl = parse_duration(args.ttl, "--ttl")
        paths = args.link_key_file or [Path(p) for p in os.environ.get(
            "VNCGATE_LINK_KEY_FILE", "").split(",") if p.strip()]
        if not paths:
            raise ValueError("give --link-key-file (or set VNCGATE_LINK_KEY_FILE)")
        keys = links.load_keys(paths)
        token, grant = links.mint(keys[0], f"{namespace}/{name}", ttl, args.view_only, args.once)
    except (ValueError, SpecError) as exc:
        parser.error(str(exc))
    base = args.public_url.rstrip("/") or "http://127.0.0.1:8080"
    print(f"{base}/t/{namespace}/{name}/#link={token}")
    logging.getLogger("vncgate.audit").info("link mint", extra={"fields": {
        "event": "link mint", "via": "cli", "target": grant.target, "link": grant.link_id,
        "expires": grant.expires,
        "view_only": grant.view_only, "once": grant.once, "key": links.key_id(keys[0])}})
    return 0


def hash_password_main(argv: Sequence[str]) -> int:
    """`vncgate-relay hash-password`: read a secret without echo, print its scrypt hash."""
    FlagParser(prog="vncgate-relay hash-password",
                            description="Print the hash of a password or token for a users "
                                        "file (reads it from the terminal or stdin)."
                            ).parse_args(argv)
    secret = getpass.getpass("Password: ") if sys.stdin.isatty() else sys.stdin.readline()
    secret = secret.rstrip("\n")
    if len(secret) < 12:
        print("vncgate-relay: use at least 12 characters", file=sys.stderr)
        return 2
    print(hash_secret(secret))
    return 0


SUBCOMMANDS = {"link": link_main, "hash-password": hash_password_main,
               "recordings": recordings_main}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SUBCOMMANDS:
        logs.configure("text", "INFO")
        return SUBCOMMANDS[args[0]](args[1:])
    settings = settings_from_args(args)
    logs.configure(settings.log_format, settings.log_level)
    if host_names(settings) is None:
        log.warning("--listen %s without --public-url or --allowed-host: the public port "
                    "answers to any host name, so a page on a name rebound to this address "
                    "(DNS rebinding) can reach it; name the relay's host names",
                    settings.listen)
    if settings.auth.mode in (AuthMode.TOKEN, AuthMode.OIDC) and \
            settings.auth.session_secret is None:
        log.warning("no --session-secret-file: sign-ins end when this process restarts and do "
                    "not carry across replicas")
    try:
        asyncio.run(serve(settings))
    except ManifestError as exc:
        print("vncgate-relay: cannot start; fix these targets:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    except TlsError as exc:
        print(f"vncgate-relay: cannot start TLS: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"vncgate-relay: cannot listen: {exc}", file=sys.stderr)
        return 1
    except KubeConfigError as exc:
        print(f"vncgate-relay: no credentials for the Kubernetes API ({exc}): give "
              "--kubeconfig, or --authorization manifest and no --lease-namespace",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
