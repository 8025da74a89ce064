"""Every metric name the docs, the dashboard and the alert rules use is one the relay or the
operator serves on /metrics: a counter by its `_total` sample, a histogram or gauge by its name."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RelayFactory
from vncgate.operator.metrics import OperatorMetrics
from vncgate.relay.recording.store import RecordingSettings

ROOT = Path(__file__).resolve().parents[2]
# Not a path like operator/vncgate_operator/.
NAME = re.compile(r"(?<![/\w])vncgate_[a-z_]+(?![/\w])")
# Names of the kind that are not metrics: the folder of the operator's package.
NOT_METRICS = {"vncgate_operator",
               "vncgate_csrf", "vncgate_device",  # cookie names
               "vncgate_kubectl"}  # the plugin's wheel
WHERE = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md",
         *sorted((ROOT / "charts/vncgate/dashboards").glob("*.json")),
         ROOT / "charts/vncgate/templates/prometheusrule.yaml"]


SUFFIXES = {"counter": ("_total",), "histogram": ("", "_bucket", "_count", "_sum"),
            "gauge": ("",), "summary": ("", "_count", "_sum"), "info": ("_info",)}


def servable(exposition: str) -> set[str]:
    # From the families' TYPE lines: a labelled metric has no sample until it is first used.
    return {family.name + suffix for family in text_string_to_metric_families(exposition)
            for suffix in SUFFIXES.get(family.type, ("",))}


async def test_documented_metric_names_are_served(make_relay: RelayFactory,
                                                  http: aiohttp.ClientSession,
                                                  tmp_path: Path) -> None:
    async with (make_relay(recording=RecordingSettings(directory=tmp_path)) as relay,
                http.get(f"{relay.internal_url}/metrics") as resp):
        assert resp.status == 200
        served = servable(await resp.text())
    served |= servable(generate_latest(OperatorMetrics.create(process=False).registry).decode())
    assert "vncgate_sessions_total" in served and "vncgate_operator_handler_runs_total" in served
    wrong = sorted({(path.relative_to(ROOT).as_posix(), name) for path in WHERE
                    for name in NAME.findall(path.read_text())
                    if name not in served | NOT_METRICS})
    assert not wrong, f"names /metrics does not serve (a counter is read as NAME_total): {wrong}"
