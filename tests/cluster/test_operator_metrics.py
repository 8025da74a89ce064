"""`vncgate-operator --metrics-listen` as the chart runs it: the real operator process, with the
chart's operator account, against the real API server, counts its handler runs."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from harness.cluster import free_port
from harness.waiting import wait_until
from harness.xvnc import XvncServer
from tests.cluster.conftest import Release
from tests.cluster.test_operator import (  # noqa: F401 - fixtures, used by name
    OperatorFactory,
    Relay,
    address_target,
    relay,
    start_operator,
    wait_phase,
)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def runs(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], outcome: str) -> float:
    return sum(value for (name, labels), value in samples.items()
               if name == "vncgate_operator_handler_runs_total" and ("outcome", outcome) in labels)


def test_operator_metrics(release: Release, namespace: str, relay: Relay,  # noqa: F811
                          xvnc: XvncServer, start_operator: OperatorFactory) -> None:  # noqa: F811
    port = free_port()
    operator = start_operator(f"--metrics-listen=127.0.0.1:{port}")
    release.plane.apply(address_target(namespace, "desk", "127.0.0.1", xvnc.port))
    wait_phase(release.plane, namespace, "desk", "Ready", operator, relay.script)
    # The reconcile that made it Ready has been counted once it returned.
    wait_until(lambda: runs(scrape(port), "success") >= 1, "a successful handler run counted",
               timeout=30)
    samples = scrape(port)
    assert sum(v for (name, _), v in samples.items()
               if name == "vncgate_operator_handler_seconds_count") >= runs(samples, "success")
    assert samples[("process_resident_memory_bytes", ())] > 0
    assert samples[("process_cpu_seconds_total", ())] > 0
