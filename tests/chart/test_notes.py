"""NOTES.txt tells the admin where to open the list and how to make a first VncTarget.

`helm template` does not render NOTES.txt; `helm install --dry-run=client` does, offline.
"""

from __future__ import annotations

from tests.chart.conftest import CHART, install_dry_run


def test_notes_print_the_ingress_url() -> None:
    notes = install_dry_run(sets=["ingress.host=vnc.example.com"])["info"]["notes"]
    assert "https://vnc.example.com/" in notes
    assert "port-forward" not in notes
    assert "kind: VncTarget" in notes
    assert "kubectl get vnc" in notes
    assert "No sign-in (relay.auth.mode=none)" in notes


def test_notes_without_ingress_print_a_port_forward() -> None:
    notes = install_dry_run()["info"]["notes"]
    assert "kubectl --namespace vncgate-system port-forward svc/vncgate-relay 8080:8080" in notes
    assert "http://127.0.0.1:8080/" in notes


def test_notes_name_the_watched_namespaces_and_allowed_addresses() -> None:
    notes = install_dry_run(values_files=[CHART / "ci" / "restricted-namespaces-values.yaml"],
                            sets=["operator.addressPolicy.allowCidrs={10.20.0.0/16}"]
                            )["info"]["notes"]
    assert "https://vnc.lab.example.com/" in notes
    assert "only in: lab, desktops" in notes
    assert "namespace: lab" in notes
    assert "allowed here: 10.20.0.0/16" in notes


def test_install_dry_run_renders_the_same_objects() -> None:
    manifest = install_dry_run(sets=["ingress.host=vnc.example.com"])["manifest"]
    assert "kind: Ingress" in manifest
    assert "name: vncgate-relay-headless" in manifest


def test_notes_say_how_to_sign_in_through_the_proxy() -> None:
    release = install_dry_run(values_files=[CHART / "ci" / "ingress-tls-values.yaml"])
    notes = release["info"]["notes"]
    assert "Sign in through your authenticating proxy" in notes
    assert "10.42.0.0/16" in notes
