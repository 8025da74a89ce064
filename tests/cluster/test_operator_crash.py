"""The operator SIGKILLed while it creates statuses, then started again, as a pod is restarted.

An operator killed mid-write once posted two identical "new -> Ready" Events for one
transition, or none, and left a target Pending "not checked yet". Here the real
`vncgate-operator` process is killed while a batch of targets is being created, a new one is
started, and every target must end Ready with exactly one Event per phase transition it went
through (none twice, none missing).
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

from harness.cluster import ControlPlane, wait_until
from harness.xvnc import XvncServer
from tests.cluster.test_operator import Relay, address_target
from tests.support.processes import ConsoleScript

TARGETS = 30


def operator_process(plane: ControlPlane, relay: Relay, workdir: Path) -> ConsoleScript:
    workdir.mkdir(parents=True, exist_ok=True)
    return ConsoleScript("vncgate-operator", [
        f"--relay-url={relay.internal_url}", f"--api-token-file={relay.token_file}",
        "--public-url=https://vnc.example.com", "--allow-cidr=127.0.0.0/8",
        "--probe-interval=30s", "--resync-interval=5s", "--liveness=off", "--standalone"],
        workdir, env={"KUBECONFIG": str(plane.admin_kubeconfig)})


def phases(plane: ControlPlane, namespace: str) -> dict[str, str]:
    items = plane.get("vnc", "-n", namespace)["items"]
    return {item["metadata"]["name"]: (item.get("status") or {}).get("phase", "")
            for item in items}


def transition_events(plane: ControlPlane, namespace: str) -> list[dict[str, Any]]:
    return [event for event in plane.get("events", "-n", namespace)["items"]
            if event["involvedObject"].get("kind") == "VncTarget"]


def test_a_killed_operator_posts_each_transition_once(
        crd: ControlPlane, namespace: str, xvnc: XvncServer, tmp_path: Path) -> None:
    plane = crd
    (tmp_path / "relay-files").mkdir()
    relay = Relay(tmp_path / "relay-files")
    with relay.script:
        relay.script.wait_for_log("relay listening")
        first = operator_process(plane, relay, tmp_path / "first").start()
        try:
            plane.apply([address_target(namespace, f"desk-{i}", "127.0.0.1", xvnc.port)
                         for i in range(TARGETS)])
            # Killed mid-way: some statuses written, some not yet.
            wait_until(lambda: first.check_running() and Counter(
                phases(plane, namespace).values())["Ready"] > 0, "a first target Ready",
                timeout=60)
            os.killpg(first.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
            first.proc.wait(timeout=10)  # type: ignore[union-attr]
        finally:
            first.stop()
        ready_at_kill = Counter(phases(plane, namespace).values())["Ready"]

        with operator_process(plane, relay, tmp_path / "second") as second:
            def all_ready() -> bool:
                second.check_running()
                return set(phases(plane, namespace).values()) == {"Ready"}

            wait_until(all_ready, f"all {TARGETS} targets Ready after the restart", timeout=90)
            # Events follow the status write; the restart re-posts recent ones (a no-op when
            # they exist). Wait until every target has its Ready Event, then count.
            wait_until(lambda: {e["involvedObject"]["name"] for e in transition_events(
                plane, namespace) if e["reason"] == "Ready"} == set(phases(plane, namespace)),
                "a Ready Event for every target", timeout=60)

    events = transition_events(plane, namespace)
    per_transition = Counter((e["involvedObject"]["name"], e["message"]) for e in events)
    repeated = {key: n for key, n in per_transition.items() if n > 1}
    assert not repeated, f"transitions with more than one Event: {repeated}"
    assert all(e.get("count", 1) == 1 for e in events), [e for e in events if e.get("count")]
    ready = Counter(e["involvedObject"]["name"] for e in events if e["reason"] == "Ready")
    assert set(ready.values()) == {1} and len(ready) == TARGETS, (ready, ready_at_kill)
