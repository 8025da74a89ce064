"""`vncgate-operator`: parse the flags, then run kopf with vncgate's registry.

This is the one way to start the operator. (`kopf run -m vncgate_operator.handlers` has nothing to
run: the handlers need the settings, so they are registered by `build_registry(settings)`.)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import kopf

from vncgate_operator.handlers import build_registry
from vncgate_operator.settings import OperatorSettings, parse_args


class _QuietTimers(logging.Filter):
    """Drop kopf's "Timer 'refresh' succeeded." line: one per target per probe interval."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timer 'refresh' succeeded")


def namespaces_to_watch(settings: OperatorSettings) -> tuple[str, ...]:
    """The namespaces kopf watches; the relay's own is added so its EndpointSlices are seen."""
    namespaces = settings.namespaces
    if namespaces and settings.relay_service and settings.relay_service[0] not in namespaces:
        namespaces = (*namespaces, settings.relay_service[0])
    return namespaces


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_args(argv)
    kopf.configure(
        debug=settings.verbose, verbose=settings.verbose,
        log_format=kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.FULL)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietTimers())
    namespaces = namespaces_to_watch(settings)
    kopf.run(
        registry=build_registry(settings),
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=True if settings.standalone else None,
        liveness_endpoint=settings.liveness_endpoint,
    )


if __name__ == "__main__":
    main()
