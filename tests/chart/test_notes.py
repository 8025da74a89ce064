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
    assert "relay.auth.mode=none" not in notes, "sign-in is on by default"


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
    release = install_dry_run(values_files=[CHART / "ci" / "auth-proxy-values.yaml"])
    notes = release["info"]["notes"]
    assert "Sign in through your authenticating proxy" in notes
    assert "X-Auth-Request-User" in notes
    assert "10.42.0.0/16, fd00:42::/64" in notes
    assert "spec.access" in notes, "manifest authorization: the targets' access lists"
    assert "RoleBinding" not in notes
    assert "Secret vncgate-users" not in notes


def test_notes_say_how_to_sign_in_at_the_openid_provider() -> None:
    notes = install_dry_run(values_files=[CHART / "ci" / "auth-oidc-values.yaml"]
                            )["info"]["notes"]
    assert "Sign in at Keycloak" in notes
    assert "https://vnc.example.com/login/oidc/callback" in notes
    assert 'the prefix "oidc:"' in notes
    assert "relay.auth.mode=none" not in notes and "Secret vncgate-users" not in notes


def test_notes_tell_how_to_read_the_initial_password_and_grant_access() -> None:
    notes = install_dry_run(sets=["ingress.host=vnc.example.com"])["info"]["notes"]
    assert 'Sign in as "admin"' in notes
    assert ("kubectl --namespace vncgate-system get secret vncgate-users "
            "-o jsonpath='{.data.users\\.yaml}' | base64 -d") in notes
    # The initial user opens every console; say so, and why.
    assert "may open every console in the cluster" in notes
    assert "vncgate-initial-user-" in notes
    # Teams grant access with a RoleBinding to the viewer ClusterRole in their namespace.
    assert "kind: RoleBinding" in notes
    assert "kind: ClusterRole\n       name: vncgate-viewer" in notes
    assert "kind: Group" in notes
    # More users: hash-password, then the Secret, then a restart.
    assert "vncgate-relay hash-password" in notes
    assert "rollout restart deploy/vncgate-relay" in notes
    assert "vncgate-relay link default/desk-1" in notes
    assert "vncgate-users" in notes.rsplit("Generated Secrets", 1)[1]
    # kubectl vnc, with the roles its commands need.
    assert "kubectl vnc link desk-1 -n default --ttl 30m     # needs vncgate-editor" in notes
    no_tokens = install_dry_run(sets=["ingress.host=vnc.example.com",
                                      "relay.auth.kubernetesTokens.enabled=false"])
    assert "kubectl vnc" not in no_tokens["info"]["notes"]


def test_notes_with_users_of_your_own() -> None:
    notes = install_dry_run(values_files=[CHART / "ci" / "existing-secret-values.yaml"]
                            )["info"]["notes"]
    assert "Secret vncgate-users" in notes
    assert "Sign in as" not in notes
    assert "every console in the cluster" not in notes
    assert "Generated Secrets" not in notes


def test_notes_warn_loudly_without_sign_in() -> None:
    notes = install_dry_run(sets=["relay.auth.mode=none"])["info"]["notes"]
    assert "WARNING: NO SIGN-IN (relay.auth.mode=none)" in notes
    assert notes.index("WARNING") < notes.index("1. Open the list"), "before anything else"
    assert "EVERY console" in notes
    assert "RoleBinding" not in notes and "Sign in as" not in notes


def test_notes_need_no_affinity_with_several_relays_and_warn_without_leases() -> None:
    notes = install_dry_run(sets=["relay.replicas=3"])["info"]["notes"]
    assert "hashByTarget" not in notes and "per pod" not in notes
    hashed = install_dry_run(values_files=[CHART / "ci" / "ha-hpa-values.yaml"])["info"]["notes"]
    assert "hashByTarget" not in hashed
    alone = install_dry_run(sets=["relay.replicas=3", "relay.leases.enabled=false"])
    assert "hold per pod only" in alone["info"]["notes"]
