"""The deputy rule on a real API server: the operator's validating admission webhook refuses a
VncTarget that would let the relay use what its author may not use, and the API server refuses
every VncTarget write while the webhook is down.

The chart is installed for real (its RBAC, its ValidatingWebhookConfiguration); the API server
reaches the webhook of an operator process by URL (`https://127.0.0.1:PORT/validate-vnctarget`,
a certificate from the test's own CA) instead of through the chart's Service, which has no pod
here. The authors are ServiceAccounts bound only to the chart's `vncgate-editor`, applying with
their own tokens through the real kubectl.
"""

from __future__ import annotations

import base64
import json
import shlex
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.certs import make_ca, make_server_cert
from harness.cluster import ControlPlane, free_port
from harness.waiting import wait_until
from tests.cluster.conftest import CHART, CRD_APPLIED, CRDS, HELM, helm
from tests.support.processes import ConsoleScript

NAMESPACE = "vncgate-admission"
WEBHOOK_CONFIGURATION = f"vncgate-operator-{NAMESPACE}"
WEBHOOK_NAME = "deputy-rule.vnctargets.vncgate.io"
GRANTED_PORT = 5900
OPERATOR = "vncgate-operator"


@dataclass
class Webhook:
    plane: ControlPlane
    operator: ConsoleScript
    workdir: Path
    port: int
    ca: Path
    operator_kubeconfig: Path


def point_at_operator(plane: ControlPlane, port: int, ca: Path) -> None:
    """The chart's own configuration (rules, failurePolicy, name), reached by URL."""
    configuration = plane.get("validatingwebhookconfiguration", WEBHOOK_CONFIGURATION)
    path = configuration["webhooks"][0]["clientConfig"]["service"]["path"]
    plane.kubectl("patch", "validatingwebhookconfiguration", WEBHOOK_CONFIGURATION,
                  "--type=json", "-p", yaml.safe_dump([{
                      "op": "replace", "path": "/webhooks/0/clientConfig",
                      "value": {"url": f"https://127.0.0.1:{port}{path}",
                                "caBundle": base64.b64encode(ca.read_bytes()).decode()}}]))


def serving(operator: ConsoleScript, port: int) -> None:
    """Wait until the operator accepts connections on its webhook port."""
    def accepting() -> bool:
        operator.check_running()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True
    wait_until(accepting, "the operator serving its admission webhook")


@pytest.fixture(scope="module")
def webhook(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Webhook]:
    """The chart installed (webhook and grants on, as a fresh install has them), its webhook
    configuration pointed at a local operator that serves it with the test CA's certificate."""
    if not HELM.exists():
        pytest.fail(f"helm is not at {HELM}: run scripts/setup")
    plane = control_plane
    if plane.kubectl("get", "crd", "vnctargets.vncgate.io", check=False).returncode != 0:
        plane.kubectl("apply", "--server-side", "-f", str(CRDS))
    plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                  "crd/vnctargets.vncgate.io")
    workdir = tmp_path_factory.mktemp("admission")
    # kubevirt.discovery: the chart lets the operator create VncTargets itself.
    helm(plane, workdir, "install", "vncgate", str(CHART), "--namespace", NAMESPACE,
         "--create-namespace", "--set", "ingress.host=vnc.example.com",
         "--set", "kubevirt.enabled=true", "--set", "kubevirt.discovery=true", *CRD_APPLIED)
    try:
        ca = make_ca(workdir / "ca")
        server = make_server_cert(ca, workdir / "webhook", "vncgate-operator-webhook")
        port = free_port()
        configuration = plane.get("validatingwebhookconfiguration", WEBHOOK_CONFIGURATION)
        assert configuration["webhooks"][0]["failurePolicy"] == "Fail"
        point_at_operator(plane, port, ca.cert)
        token = workdir / "token"
        token.write_text("admission-test-registration-token")
        grants = workdir / "grants.yaml"
        grants.write_text(yaml.safe_dump({"grants": [{
            "namespaces": ["t*"], "cidrs": ["127.0.0.1/32"],
            "ports": [GRANTED_PORT]}]}))
        kubeconfig = plane.service_account_kubeconfig(workdir / "operator.kubeconfig",
                                                      NAMESPACE, OPERATOR)
        operator = ConsoleScript("vncgate-operator", [
            f"--relay-url=http://127.0.0.1:{free_port()}", f"--api-token-file={token}",
            "--liveness=off", "--standalone", "--allow-cidr=127.0.0.0/8",
            f"--address-grants={grants}", f"--webhook-listen=127.0.0.1:{port}",
            f"--webhook-cert-file={server.cert}", f"--webhook-key-file={server.key}"],
            workdir, env={"KUBECONFIG": str(kubeconfig)})
        with operator:
            serving(operator, port)
            yield Webhook(plane, operator, workdir, port, ca.cert, kubeconfig)
    finally:
        helm(plane, workdir, "uninstall", "vncgate", "--namespace", NAMESPACE)
        plane.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


@pytest.fixture
def editor(webhook: Webhook, namespace: str, tmp_path: Path) -> Path:
    """A kubeconfig of ServiceAccount `alice` in `namespace`, bound only to vncgate-editor."""
    plane = webhook.plane
    plane.kubectl("-n", namespace, "create", "serviceaccount", "alice")
    plane.kubectl("-n", namespace, "create", "rolebinding", "alice-vncgate-editor",
                  "--clusterrole=vncgate-editor", f"--serviceaccount={namespace}:alice")
    return plane.service_account_kubeconfig(tmp_path / "alice.kubeconfig", namespace, "alice")


def target(namespace: str, name: str, **spec: Any) -> str:
    spec.setdefault("endpoint", {"address": {"host": "127.0.0.1", "port": GRANTED_PORT}})
    return yaml.safe_dump({"apiVersion": "vncgate.io/v1alpha1", "kind": "VncTarget",
                           "metadata": {"name": name, "namespace": namespace}, "spec": spec})


def apply_as(plane: ControlPlane, kubeconfig: Path, manifest: str) -> tuple[bool, str]:
    result = plane.kubectl("apply", "-f", "-", input=manifest, check=False,
                           kubeconfig_path=kubeconfig)
    return result.returncode == 0, result.stdout + result.stderr


def run_hint(plane: ControlPlane, message: str) -> None:
    """Run, as the admin, exactly the commands the refusal gives."""
    hint = message.split("To grant it: ", 1)[1].splitlines()[0]
    for command in hint.split(" && "):
        words = shlex.split(command)
        assert words[0] == "kubectl", command
        plane.kubectl(*words[1:])


def test_credentials_secret_needs_get_on_it(webhook: Webhook, namespace: str,
                                            editor: Path) -> None:
    plane = webhook.plane
    plane.kubectl("-n", namespace, "create", "secret", "generic", "db-password",
                  "--from-literal=password=S3cr3t")
    # The editor cannot read the Secret itself...
    assert plane.kubectl("-n", namespace, "get", "secret", "db-password", check=False,
                         kubeconfig_path=editor).returncode != 0
    # ... so it may not have the relay use it.
    manifest = target(namespace, "desk", credentials={"secretName": "db-password"},
                      tls={"insecureSkipVerify": True})
    ok, said = apply_as(plane, editor, manifest)
    assert not ok, said
    assert f"system:serviceaccount:{namespace}:alice may not get secrets" in said, said
    assert f"Secret {namespace}/db-password" in said and "--resource-name=db-password" in said
    assert plane.kubectl("-n", namespace, "get", "vnctarget", "desk",
                         check=False).returncode != 0

    run_hint(plane, said)
    ok, said = apply_as(plane, editor, manifest)
    assert ok, said

    # An update that adds nothing new needs nothing new; one that names another Secret does.
    plane.kubectl("-n", namespace, "create", "secret", "generic", "other",
                  "--from-literal=password=x")
    ok, said = apply_as(plane, editor, target(
        namespace, "desk", displayName="Desk", credentials={"secretName": "db-password"},
        tls={"insecureSkipVerify": True}))
    assert ok, said
    ok, said = apply_as(plane, editor, target(namespace, "desk",
                                              credentials={"secretName": "other"}))
    assert not ok and f"Secret {namespace}/other" in said, said


def test_ca_secret_needs_get_on_it(webhook: Webhook, namespace: str, editor: Path) -> None:
    plane = webhook.plane
    manifest = target(namespace, "tls-desk", tls={"caSecret": {"name": "lab-ca"}})
    ok, said = apply_as(plane, editor, manifest)
    assert not ok and f"get secrets on Secret {namespace}/lab-ca" in said, said
    run_hint(plane, said)
    ok, said = apply_as(plane, editor, manifest)
    assert ok, said
    # The same for a CA in a ConfigMap.
    manifest = target(namespace, "tls-desk-2", tls={"caConfigMap": {"name": "lab-ca-bundle"}})
    ok, said = apply_as(plane, editor, manifest)
    assert not ok and f"get configmaps on ConfigMap {namespace}/lab-ca-bundle" in said, said
    run_hint(plane, said)
    ok, said = apply_as(plane, editor, manifest)
    assert ok, said


def test_kubevirt_console_needs_get_on_vnc(webhook: Webhook, namespace: str,
                                           editor: Path) -> None:
    plane = webhook.plane
    manifest = target(namespace, "vm-desk", endpoint={"kubevirt": {"name": "vm1"}})
    ok, said = apply_as(plane, editor, manifest)
    assert not ok, said
    assert "get virtualmachineinstances/vnc (subresources.kubevirt.io)" in said, said
    assert "--resource=virtualmachineinstances.subresources.kubevirt.io/vnc" in said
    # The grant as KubeVirt's docs write it (kubectl create role needs KubeVirt's API served
    # to map the resource; this API server has none).
    plane.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                 "metadata": {"name": "vm1-console", "namespace": namespace},
                 "rules": [{"apiGroups": ["subresources.kubevirt.io"],
                            "resources": ["virtualmachineinstances/vnc"],
                            "resourceNames": ["vm1"], "verbs": ["get"]}]})
    plane.kubectl("-n", namespace, "create", "rolebinding", "vm1-console", "--role=vm1-console",
                  f"--serviceaccount={namespace}:alice")
    ok, said = apply_as(plane, editor, manifest)
    assert ok, said


def test_the_operators_own_discovered_targets_are_admitted(webhook: Webhook,
                                                           namespace: str) -> None:
    """`--kubevirt-discovery` creates a VncTarget for each labelled VM with the operator's own
    account, which may not open consoles itself (labelling the VM is the consent): the webhook
    knows that account (a SelfSubjectReview at start) and admits its writes."""
    plane = webhook.plane
    manifest = target(namespace, "vm2", endpoint={"kubevirt": {"name": "vm2"}})
    review = plane.kubectl("create", "-f", "-", "-o", "json", input=json.dumps({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {
            "namespace": namespace, "verb": "get", "group": "subresources.kubevirt.io",
            "resource": "virtualmachineinstances", "subresource": "vnc", "name": "vm2"}}}),
        kubeconfig_path=webhook.operator_kubeconfig)
    assert not json.loads(review.stdout)["status"].get("allowed"), review.stdout
    ok, said = apply_as(plane, webhook.operator_kubeconfig, manifest)
    assert ok, said


def test_address_outside_the_namespace_grant(webhook: Webhook, namespace: str,
                                             editor: Path) -> None:
    plane = webhook.plane
    for host, port in (("127.0.0.2", GRANTED_PORT), ("127.0.0.1", 22)):
        ok, said = apply_as(plane, editor, target(
            namespace, "bmc", endpoint={"address": {"host": host, "port": port}}))
        assert not ok, said
        assert f"{host}:{port} is outside what namespace {namespace} is granted" in said, said
        assert "127.0.0.1/32 (ports 5900)" in said and "addressPolicy.grants" in said
    ok, said = apply_as(plane, editor, target(namespace, "bmc"))
    assert ok, said


def test_webhook_down_refuses_writes(webhook: Webhook, namespace: str, editor: Path) -> None:
    plane = webhook.plane
    webhook.operator.stop()
    try:
        for kubeconfig in (editor, plane.admin_kubeconfig):
            ok, said = apply_as(plane, kubeconfig, target(namespace, "plain"))
            assert not ok, said
            assert f'failed calling webhook "{WEBHOOK_NAME}"' in said, said
            assert "connection refused" in said, said
    finally:
        webhook.operator.start()
        serving(webhook.operator, webhook.port)


def test_metadata_writes_do_not_need_the_webhook(webhook: Webhook, namespace: str,
                                                editor: Path) -> None:
    """The chart's matchCondition asks the webhook about creates and spec updates only: while
    the operator is down a spec change is still refused, but a label, and the removal of the
    finalizers of a VncTarget being deleted, go through (failurePolicy Fail would otherwise
    leave it stuck in deletion until the operator is back)."""
    plane = webhook.plane
    held = yaml.safe_load(target(namespace, "held"))
    held["metadata"]["finalizers"] = ["example.com/hold"]
    ok, said = apply_as(plane, plane.admin_kubeconfig, yaml.safe_dump(held))
    assert ok, said
    webhook.operator.stop()
    try:
        ok, said = apply_as(plane, editor, target(namespace, "held", viewOnly=True))
        assert not ok, said
        assert f'failed calling webhook "{WEBHOOK_NAME}"' in said, said
        labelled = plane.kubectl("-n", namespace, "label", "vnctarget", "held", "team=a",
                                 check=False, kubeconfig_path=editor)
        assert labelled.returncode == 0, labelled.stdout + labelled.stderr
        plane.kubectl("-n", namespace, "delete", "vnctarget", "held", "--wait=false")
        plane.kubectl("-n", namespace, "patch", "vnctarget", "held", "--type=merge",
                      "-p", '{"metadata": {"finalizers": null}}')
        wait_until(lambda: plane.kubectl("-n", namespace, "get", "vnctarget", "held",
                                         check=False).returncode != 0,
                   "the VncTarget gone once its finalizers were removed")
    finally:
        webhook.operator.start()
        serving(webhook.operator, webhook.port)


def test_upgrade_keeps_the_webhook_certificate(webhook: Webhook) -> None:
    """The chart's CA and serving certificate survive `helm upgrade` (lookup), and the
    configuration's caBundle is that CA."""
    plane = webhook.plane

    def pair() -> tuple[str, str]:
        data = plane.get("secret", "vncgate-operator-webhook-tls", "-n", NAMESPACE)["data"]
        return data["tls.crt"], data["ca.crt"]

    before = pair()
    # The configuration as this test patched it (a URL) would not merge with the chart's
    # (a Service): the upgrade makes it anew, as it has it.
    plane.kubectl("delete", "validatingwebhookconfiguration", WEBHOOK_CONFIGURATION)
    helm(plane, webhook.workdir, "upgrade", "vncgate", str(CHART), "--namespace", NAMESPACE,
         "--reset-then-reuse-values", "--set", "relay.replicas=2")
    try:
        assert pair() == before
        configuration = plane.get("validatingwebhookconfiguration", WEBHOOK_CONFIGURATION)
        assert configuration["webhooks"][0]["clientConfig"]["caBundle"] == before[1]
    finally:
        point_at_operator(plane, webhook.port, webhook.ca)
