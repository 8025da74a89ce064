"""Kubernetes bearer tokens at the relay (`--kubernetes-tokens`), on a real API server.

The relay runs as the chart's relay ServiceAccount (so with exactly the chart's RBAC: `create`
on tokenreviews and subjectaccessreviews); viewers present ServiceAccount tokens made with the
TokenRequest API (`kubectl create token`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from harness.cluster import free_port, kubeconfig
from harness.xvnc import XvncServer
from tests.cluster.conftest import Release
from tests.cluster.test_relay import open_console, relay_process
from tests.support.processes import ConsoleScript
from vncgate.common.kube import KubeClient, kube_connection
from vncgate.relay.access.tokenreview import TokenReviewer, TokenReviewUnavailable

USERS = {"browser": {"token": "browser-secret-0123456789", "groups": []}}


def _forged(token: str) -> str:
    """The token with its claims changed (another subject): the signature no longer fits."""
    header, claims, signature = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    data["sub"] = "system:serviceaccount:kube-system:default"
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")
    return f"{header}.{forged}.{signature}"


@pytest.fixture
def token_relay(release: Release, namespace: str, xvnc: XvncServer, tmp_path: Path
                ) -> Iterator[tuple[ConsoleScript, int]]:
    plane = release.plane
    for account in ("viewer", "stranger"):
        plane.kubectl("create", "serviceaccount", account, "-n", namespace)
    plane.kubectl("create", "rolebinding", "viewers", "-n", namespace,
                  "--clusterrole=vncgate-viewer", f"--serviceaccount={namespace}:viewer")
    users = tmp_path / "users.yaml"
    users.write_text(yaml.safe_dump(USERS))
    script, port = relay_process(
        release, tmp_path / "relay", "--auth=token", f"--users-file={users}",
        "--authorization=kubernetes", "--kubernetes-tokens",
        f"--target={namespace}/desk=127.0.0.1:{xvnc.port}")
    with script:
        script.wait_for_log("relay listening")
        yield script, port


def test_a_service_account_token_opens_what_rbac_allows(
        release: Release, namespace: str, token_relay: tuple[ConsoleScript, int]) -> None:
    script, port = token_relay
    plane = release.plane
    viewer = plane.service_account_token(namespace, "viewer")
    data, code, reason = asyncio.run(open_console(port, f"{namespace}/desk", viewer))
    assert data is not None and data.startswith(b"RFB 003.00"), (code, reason, script.log())

    # Authenticated, but RBAC does not let this account connect: the SubjectAccessReview says no.
    stranger = plane.service_account_token(namespace, "stranger")
    data, code, reason = asyncio.run(open_console(port, f"{namespace}/desk", stranger))
    assert data is None and code == 4403, (code, reason)
    assert f"system:serviceaccount:{namespace}:stranger may not connect" in reason

    # A token whose signature does not fit: the TokenReview does not authenticate it.
    data, code, reason = asyncio.run(open_console(port, f"{namespace}/desk", _forged(viewer)))
    assert data is None and code == 4401, (code, reason)

    # The users file still works beside Kubernetes tokens.
    data, code, reason = asyncio.run(open_console(port, f"{namespace}/desk",
                                                  USERS["browser"]["token"]))
    assert data is None and code == 4403, (code, reason)  # signed in, but no RoleBinding
    assert "browser may not connect" in reason

    # No token, nor any part of one, lands in the relay's log.
    log = script.log()
    for token in (viewer, stranger):
        assert token.split(".")[2][:20] not in log and token.split(".")[1][:20] not in log


def test_an_api_server_that_cannot_be_reached_denies(
        release: Release, namespace: str, xvnc: XvncServer, tmp_path: Path) -> None:
    plane = release.plane
    plane.kubectl("create", "serviceaccount", "viewer", "-n", namespace)
    plane.kubectl("create", "rolebinding", "viewers", "-n", namespace,
                  "--clusterrole=vncgate-viewer", f"--serviceaccount={namespace}:viewer")
    token = plane.service_account_token(namespace, "viewer")
    # The relay's API server is a port where nothing listens: every TokenReview fails.
    down = tmp_path / "down.kubeconfig"
    down.write_text(kubeconfig(f"https://127.0.0.1:{free_port()}", plane.certs.ca_crt,
                               token=plane.service_account_token(release.namespace,
                                                                 release.relay_account)))
    users = tmp_path / "users.yaml"
    users.write_text(yaml.safe_dump(USERS))
    public = free_port()
    script = ConsoleScript("vncgate-relay", [
        f"--listen=127.0.0.1:{public}", f"--internal-listen=127.0.0.1:{free_port()}",
        f"--kubeconfig={down}", "--auth=token", f"--users-file={users}",
        "--authorization=kubernetes", "--kubernetes-tokens", "--log-format=json",
        f"--target={namespace}/desk=127.0.0.1:{xvnc.port}"], tmp_path)
    with script:
        script.wait_for_log("relay listening")
        data, code, reason = asyncio.run(open_console(public, f"{namespace}/desk", token))
        assert data is None and code == 4503, (code, reason)
        assert "could not check your Kubernetes token" in reason
        assert "TokenReview failed; denying" in script.log()
        assert token.split(".")[2][:20] not in script.log()


def test_reviews_are_cached_briefly_in_a_bounded_cache(
        release: Release, namespace: str, tmp_path: Path) -> None:
    plane = release.plane
    accounts = ("one", "two", "three")
    for account in accounts:
        plane.kubectl("create", "serviceaccount", account, "-n", namespace)
    tokens = [plane.service_account_token(namespace, account) for account in accounts]
    relay_config = plane.service_account_kubeconfig(tmp_path / "relay.kubeconfig",
                                                    release.namespace, release.relay_account)

    async def scenario() -> None:
        reviewer = TokenReviewer(KubeClient(kube_connection(relay_config)), max_cached=2)
        try:
            first = await reviewer.review(tokens[0])
            assert first is not None and first.user == f"system:serviceaccount:{namespace}:one"
            assert f"system:serviceaccounts:{namespace}" in first.groups
            # The session ends with the token: the identity carries the signed `exp`.
            claims = tokens[0].split(".")[1]
            exp = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))["exp"]
            assert first.expires == exp > time.time()
            assert await reviewer.review(tokens[0]) == first
            assert reviewer.reviews == 1  # the second answer came from the cache
            for token in tokens[1:]:
                assert await reviewer.review(token) is not None
            assert len(reviewer) == 2  # bounded: the oldest answer was dropped
            assert await reviewer.review(_forged(tokens[0])) is None
            assert await reviewer.review("") is None
        finally:
            await reviewer.close()
        # An expired entry is asked again.
        reviewer = TokenReviewer(KubeClient(kube_connection(relay_config)), ttl=0.0)
        try:
            await reviewer.review(tokens[1])
            await reviewer.review(tokens[1])
            assert reviewer.reviews == 2
        finally:
            await reviewer.close()
        # The relay's account without `create` on tokenreviews: the API's 403 denies.
        plane.kubectl("create", "serviceaccount", "no-rights", "-n", namespace)
        weak = plane.service_account_kubeconfig(tmp_path / "weak.kubeconfig", namespace,
                                                "no-rights")
        reviewer = TokenReviewer(KubeClient(kube_connection(weak)))
        try:
            with pytest.raises(TokenReviewUnavailable):
                await reviewer.review(tokens[0])
        finally:
            await reviewer.close()

    asyncio.run(scenario())
