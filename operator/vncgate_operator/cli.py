"""`vncgate-operator`: parse the flags, then run kopf with vncgate's registry.

This is the one way to start the operator. (`kopf run -m vncgate.operator.handlers` has nothing to
run: the handlers need the settings, so they are registered by `build_registry(settings)`.)
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence

import kopf

from vncgate.operator import metrics
from vncgate.operator.handlers import WEBHOOK_ID, build_registry
from vncgate.operator.settings import OperatorSettings, parse_args


class KopfNoise(logging.Filter):
    """kopf's per-object lines ("Handler 'target_event' succeeded.", one per watch event) are
    DEBUG: shown with --verbose only. The operator's own lines name the object they are about."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("kopf.objects") and record.levelno == logging.ERROR and \
                str(record.msg).startswith(f"Webhook '{WEBHOOK_ID}' failed"):
            # An admission refusal is the webhook doing its job, not an operator error.
            record.levelno, record.levelname = logging.INFO, "INFO"
            return True
        if record.name.startswith("kopf.objects") and record.levelno <= logging.INFO:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


# Collect the youngest generation every 10,000 net allocations instead of 700. With the default,
# the objects of requests in flight (kopf holds each event's body, patch and handler state across
# its API calls) live through two young collections, are promoted to the oldest generation and
# count towards its next full collection, which scans every object the operator holds: with
# thousands of VncTargets those full collections came more often and cost more each, and the
# operator's CPU per target grew with the number of targets (`python -m bench.operator`: 1.27x
# from 1,000 to 5,000 targets with the default, about 1.1x with this; docs/PERFORMANCE.md).
GC_THRESHOLDS = (10_000, 10, 10)


def tune_gc() -> None:
    """Set the cyclic collector's thresholds for an operator holding many objects."""
    gc.set_threshold(*GC_THRESHOLDS)


def namespaces_to_watch(settings: OperatorSettings) -> tuple[str, ...]:
    """The namespaces kopf watches; the relay's own is added so its EndpointSlices are seen."""
    namespaces = settings.namespaces
    if namespaces and settings.relay_service and settings.relay_service[0] not in namespaces:
        namespaces = (*namespaces, settings.relay_service[0])
    return namespaces


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_args(argv)
    tune_gc()
    kopf.configure(
        debug=settings.verbose, verbose=settings.verbose,
        log_format=kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.FULL)
    for handler in logging.getLogger().handlers:
        handler.addFilter(KopfNoise())
    namespaces = namespaces_to_watch(settings)
    registry = build_registry(settings)
    if settings.metrics_listen:
        observed = metrics.OperatorMetrics.create()
        metrics.instrument(registry, observed)
        metrics.serve(observed, *settings.metrics_listen)
    kopf.run(
        registry=registry,
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=True if settings.standalone else None,
        liveness_endpoint=settings.liveness_endpoint,
    )


if __name__ == "__main__":
    main()
