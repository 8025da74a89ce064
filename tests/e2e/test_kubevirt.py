"""A KubeVirt target in a real browser: noVNC -> relay -> kube-apiserver (aggregation layer) ->
KubeVirt's console contract -> Xvnc, and the canvas shows the red desktop.

The API server, its RBAC and the aggregated `subresources.kubevirt.io` API are real
(tests/support/kubevirt.py); the relay dials with a ServiceAccount token, as in a pod.
"""

from __future__ import annotations

from pathlib import Path

from playwright.async_api import Browser

from harness.cluster import ControlPlane
from harness.xvnc import XvncServer
from tests.cluster.conftest import (  # noqa: F401 - the real API server, KubeVirt's (fixtures)
    control_plane,
    kubevirt_api,
)
from tests.cluster.test_kubevirt import kubevirt_route, relay_account
from tests.conftest import ARTIFACTS, RelayFactory
from tests.e2e.test_viewer import wait_for_pixel
from tests.support.kubevirt import KubeVirtBackend


async def test_the_browser_shows_a_kubevirt_vm(
        kubevirt_api: KubeVirtBackend, control_plane: ControlPlane,  # noqa: F811
        make_relay: RelayFactory, xvnc: XvncServer, browser: Browser, tmp_path: Path) -> None:
    namespace = "e2e-kubevirt"
    control_plane.kubectl("create", "namespace", namespace)
    try:
        kubevirt_api.consoles[(namespace, "vm-1")] = xvnc.port
        kubeconfig = relay_account(control_plane, namespace, tmp_path, may_open=True)
        async with make_relay(routes=[kubevirt_route(namespace, "vm-1")],
                              kubeconfig=kubeconfig) as relay:
            page = await browser.new_page(viewport={"width": 1000, "height": 760})
            try:
                xvnc.paint("#ff0000")
                await page.goto(f"{relay.public_url}/t/{namespace}/vm-1/")
                await page.wait_for_selector("body[data-state=connected]", timeout=20_000)
                await wait_for_pixel(page, (255, 0, 0), timeout=20)
                await page.screenshot(path=str(ARTIFACTS / "viewer-kubevirt-red.png"))
            finally:
                await page.close()
        assert (f"system:serviceaccount:{namespace}:relay", namespace, "vm-1") in \
            kubevirt_api.requests
    finally:
        control_plane.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
