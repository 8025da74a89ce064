"""`vncgate-relay`: the relay from the command line (standalone or as the chart runs it)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence

from relay import logs
from relay.manifests import ManifestError, load_routes
from relay.server import RelayServer
from relay.settings import RelaySettings, settings_from_args

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
            "routes": len(relay.registry),
            "registration_api": "on" if settings.api_token else "off (no --api-token-file)"}})
        for route in relay.registry:
            log.info("target", extra={"fields": {
                "target": route.key, "endpoint": route.address,
                "url": f"{relay.public_url}/t/{route.namespace}/{route.name}/"}})
        await stop.wait()
        log.info("shutting down: closing sessions")


def main(argv: Sequence[str] | None = None) -> int:
    settings = settings_from_args(argv)
    logs.configure(settings.log_format, settings.log_level)
    try:
        asyncio.run(serve(settings))
    except ManifestError as exc:
        print("vncgate-relay: cannot start; fix these targets:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"vncgate-relay: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
