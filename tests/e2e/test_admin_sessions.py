"""The list page for console admins, in a real browser against a real API server: who is
connected, and "End session"; the viewer that was ended says who ended it.

RBAC decides (the relay asks with SubjectAccessReviews as the chart's relay ServiceAccount): ada
is bound to vncgate-admin in the namespace, vic to vncgate-viewer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.async_api import Browser, Page

from harness.waiting import eventually
from harness.xvnc import XvncServer

# The real API server's fixtures, by name (pytest finds fixtures in the module's namespace).
from tests.cluster.conftest import (  # noqa: F401
    Release,
    control_plane,
    release,
)
from tests.conftest import ARTIFACTS, RelayFactory
from vncgate.common.model import Route
from vncgate.relay.access.identity import AuthMode
from vncgate.relay.access.passwords import hash_secret
from vncgate.relay.access.users import User
from vncgate.relay.settings import AuthSettings

NAMESPACE = "admin-sessions-team"
PASSWORDS = {"ada": "ada's browser password", "vic": "vic's browser password"}


@pytest.fixture(scope="module")
def team(release: Release) -> str:  # noqa: F811 - the imported fixture, by name
    plane = release.plane
    if plane.kubectl("get", "namespace", NAMESPACE, check=False).returncode != 0:
        plane.kubectl("create", "namespace", NAMESPACE)
    plane.kubectl("create", "rolebinding", "ada", "-n", NAMESPACE,
                  "--clusterrole=vncgate-admin", "--user=ada")
    plane.kubectl("create", "rolebinding", "vic", "-n", NAMESPACE,
                  "--clusterrole=vncgate-viewer", "--user=vic")
    return NAMESPACE


async def sign_in(page: Page, base: str, user: str, next_path: str = "") -> None:
    await page.goto(f"{base}/login" + (f"?next={next_path}" if next_path else ""))
    await page.fill("input[name=user]", user)
    await page.fill("input[name=password]", PASSWORDS[user])
    await page.click("button[type=submit]")


async def test_an_admin_ends_a_session_and_the_viewer_says_who(
        make_relay: RelayFactory, xvnc: XvncServer, browser: Browser, team: str,
        release: Release, tmp_path: Path) -> None:  # noqa: F811
    kubeconfig = release.plane.service_account_kubeconfig(
        tmp_path / "relay.kubeconfig", release.namespace, release.relay_account)
    users = {name: User(name, hash_secret(secret)) for name, secret in PASSWORDS.items()}
    auth = AuthSettings(mode=AuthMode.TOKEN, users=users, session_secret=b"s" * 32,
                        authorization="kubernetes")
    routes = [Route(team, "desk", "127.0.0.1", xvnc.port, display_name="Team desk")]
    async with make_relay(routes=routes, auth=auth, kubeconfig=kubeconfig) as relay:
        base = relay.public_url
        viewer_context, admin_context = await browser.new_context(), await browser.new_context()
        try:
            viewer = await viewer_context.new_page()
            await sign_in(viewer, base, "vic", f"t/{team}/desk/")
            await viewer.wait_for_selector("body[data-state=connected]", timeout=60_000)

            # vic may open the console, not see its sessions: no session table for vic.
            listing = await viewer_context.new_page()
            await listing.goto(f"{base}/")
            await listing.wait_for_selector("text=Team desk")
            assert await listing.locator("table.sessions").count() == 0

            admin = await admin_context.new_page()
            await sign_in(admin, base, "ada")
            await admin.wait_for_selector("tr.session")
            row = admin.locator("tr.session")
            assert await row.count() == 1
            cells = [c.strip() for c in await row.locator("td").all_inner_texts()]
            assert cells[0] == "vic" and cells[1] == "127.0.0.1" and cells[3] == "interactive"
            await admin.screenshot(path=str(ARTIFACTS / "list-admin-sessions.png"))
            await row.locator("button", has_text="End session").click()

            await viewer.wait_for_selector("body[data-state=failed]", timeout=60_000)
            status = await viewer.text_content("#status") or ""
            assert "ended by ada" in status, status
            await viewer.screenshot(path=str(ARTIFACTS / "viewer-ended-by-admin.png"))

            # Back on the list (303 to it): no session left.
            async def no_sessions() -> bool:
                await admin.goto(f"{base}/")
                return await admin.locator("tr.session").count() == 0

            await eventually(no_sessions, "the ended session gone from the list", interval=0.3)
        finally:
            await viewer_context.close()
            await admin_context.close()
