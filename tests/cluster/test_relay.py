"""`vncgate-relay` with the chart's relay ServiceAccount, against a real API server:
SubjectAccessReviews decide who may open a console and who may watch its recordings, exclusive
consoles are Leases shared by two relay processes, and the API server's resourceVersion check
is what makes a takeover race safe.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from harness.cluster import free_port
from harness.waiting import eventually, wait_until
from harness.xvnc import XvncServer
from tests.cluster.conftest import Release
from tests.support.processes import ConsoleScript
from vncgate.common.kube import KubeClient, KubeError, kube_connection
from vncgate.common.model import Route
from vncgate.common.spec import SessionMode, SessionPolicy, Takeover
from vncgate.relay.recording.capture import (
    END,
    FORMAT_VERSION,
    HEADER,
    MAGIC,
    SERVER,
    encode_record,
)
from vncgate.relay.session.consoles import Holder, KubeConsoles

USERS = {
    "alice": {"token": "alice-secret-0123456789", "groups": ["lab-team"]},
    "bob": {"token": "bob-secret-0123456789", "groups": []},
    "carol": {"token": "carol-secret-0123456789", "groups": ["lab-team"]},
}


def relay_process(release: Release, workdir: Path, *args: str) -> tuple[ConsoleScript, int]:
    """A relay on loopback, authenticated to the API server as the chart's relay account."""
    workdir.mkdir(parents=True, exist_ok=True)
    kubeconfig = release.plane.service_account_kubeconfig(
        workdir / "kubeconfig", release.namespace, release.relay_account)
    public = free_port()
    script = ConsoleScript("vncgate-relay", [
        f"--listen=127.0.0.1:{public}", f"--internal-listen=127.0.0.1:{free_port()}",
        f"--kubeconfig={kubeconfig}", "--log-format=json", *args], workdir)
    return script, public


async def open_console(port: int, target: str, token: str | None = None
                       ) -> tuple[bytes | None, int | None, str]:
    """The first RFB bytes, or the close code and reason the relay ended with."""
    headers = {"Origin": f"http://127.0.0.1:{port}"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as session, session.ws_connect(
            f"http://127.0.0.1:{port}/t/{target}/websockify", protocols=("binary",),
            headers=headers) as ws:
        message = await ws.receive(timeout=20)
        if message.type == aiohttp.WSMsgType.BINARY:
            return bytes(message.data), None, ""
        return None, ws.close_code, str(message.extra or "")


@pytest.fixture
def sar_relay(release: Release, namespace: str, xvnc: XvncServer, tmp_path: Path
              ) -> Iterator[tuple[ConsoleScript, int]]:
    users = tmp_path / "users.yaml"
    users.write_text(yaml.safe_dump(USERS))
    release.plane.kubectl("create", "rolebinding", "lab-team-viewers", "-n", namespace,
                          "--clusterrole=vncgate-viewer", "--group=lab-team")
    script, port = relay_process(
        release, tmp_path / "relay", "--auth=token", f"--users-file={users}",
        "--authorization=kubernetes", f"--target={namespace}/desk=127.0.0.1:{xvnc.port}",
        f"--target={namespace}/other=127.0.0.1:{xvnc.port}")
    with script:
        script.wait_for_log("relay listening")
        yield script, port


def test_subject_access_reviews_decide(release: Release, namespace: str,
                                       sar_relay: tuple[ConsoleScript, int]) -> None:
    script, port = sar_relay
    data, code, reason = asyncio.run(open_console(port, f"{namespace}/desk",
                                                  USERS["alice"]["token"]))
    assert data is not None and data.startswith(b"RFB 003.00"), (code, reason, script.log())

    data, code, reason = asyncio.run(open_console(port, f"{namespace}/desk",
                                                  USERS["bob"]["token"]))
    assert data is None and code == 4403, (code, reason)
    assert "vncgate-viewer" in reason and namespace in reason


def test_refusals_name_the_roles_the_relay_is_given(release: Release, namespace: str,
                                                    xvnc: XvncServer, tmp_path: Path) -> None:
    """A release whose values renamed the roles passes the names to the relay (the chart
    test checks the rendering): the relay's 4403 and 4424 name those, not its defaults."""
    users = tmp_path / "users.yaml"
    users.write_text(yaml.safe_dump(USERS))
    release.plane.kubectl("create", "rolebinding", "lab-team-viewers", "-n", namespace,
                          "--clusterrole=vncgate-viewer", "--group=lab-team")
    manifest = tmp_path / "targets.yaml"
    manifest.write_text(yaml.safe_dump_all([{
        "apiVersion": "vncgate.io/v1alpha1", "kind": "VncTarget",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"endpoint": {"address": {"host": "127.0.0.1", "port": xvnc.port}}, **extra}}
        for name, extra in (("desk", {}), ("locked", {"credentials": {"secretName": "vnc"}}))]))
    script, port = relay_process(
        release, tmp_path / "relay", "--auth=token", f"--users-file={users}",
        "--authorization=kubernetes", f"--targets={manifest}",
        "--viewer-role=lab-console-viewer", "--credentials-role=consoles-relay-credentials")
    with script:
        script.wait_for_log("relay listening")
        data, code, reason = asyncio.run(open_console(port, f"{namespace}/desk",
                                                      USERS["bob"]["token"]))
        assert data is None and code == 4403, (code, reason)
        assert "lab-console-viewer" in reason and "vncgate-viewer" not in reason, reason
        # alice may open it; the relay may not read its Secret in this namespace.
        data, code, reason = asyncio.run(open_console(port, f"{namespace}/locked",
                                                      USERS["alice"]["token"]))
        assert data is None and code == 4424, (code, reason, script.log()[-2000:])
        assert "consoles-relay-credentials" in reason, reason


def test_an_api_server_that_is_down_denies(release: Release, namespace: str,
                                           sar_relay: tuple[ConsoleScript, int]) -> None:
    script, port = sar_relay
    plane = release.plane
    plane.stop_apiserver()
    try:
        # carol is allowed by RBAC, but nothing about her is cached: the relay cannot ask.
        data, code, reason = asyncio.run(open_console(port, f"{namespace}/other",
                                                      USERS["carol"]["token"]))
        assert data is None and code == 4503, (code, reason)  # refused, to be retried
        assert "could not check your access" in reason
    finally:
        plane.start_apiserver()
    data, code, reason = asyncio.run(open_console(port, f"{namespace}/other",
                                                  USERS["carol"]["token"]))
    assert data is not None, (code, reason, script.log()[-2000:])


def exclusive_manifest(path: Path, namespace: str, port: int) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "vncgate.io/v1alpha1", "kind": "VncTarget",
        "metadata": {"name": "console", "namespace": namespace},
        "spec": {"endpoint": {"address": {"host": "127.0.0.1", "port": port}},
                 "sessions": {"mode": "exclusive", "takeover": "deny"}}}))
    return path


def test_exclusive_consoles_across_two_relay_processes(
        release: Release, namespace: str, xvnc: XvncServer, tmp_path: Path) -> None:
    manifest = exclusive_manifest(tmp_path / "console.yaml", namespace, xvnc.port)
    common = ("--auth=none", "--authorization=manifest", f"--targets={manifest}",
              f"--lease-namespace={release.namespace}")
    relay_a, port_a = relay_process(release, tmp_path / "a", *common, "--identity=relay-a")
    relay_b, port_b = relay_process(release, tmp_path / "b", *common, "--identity=relay-b")
    plane = release.plane
    with relay_a, relay_b:
        relay_a.wait_for_log("relay listening")
        relay_b.wait_for_log("relay listening")

        async def scenario() -> None:
            async with aiohttp.ClientSession() as session, session.ws_connect(
                    f"http://127.0.0.1:{port_a}/t/{namespace}/console/websockify",
                    protocols=("binary",), headers={"Origin": f"http://127.0.0.1:{port_a}"}
                    ) as holder:
                first = await holder.receive(timeout=20)
                assert first.type == aiohttp.WSMsgType.BINARY, (first, relay_a.log()[-2000:])
                lease = plane.get("lease", f"vnc-{namespace}-console", "-n", release.namespace)
                assert lease["spec"]["holderIdentity"] == "relay-a"
                data, code, reason = await open_console(port_b, f"{namespace}/console")
                assert data is None and code == 4409, (code, reason)
                assert "in use" in reason.lower() or "holds" in reason.lower(), reason
            # The holder left: its Lease is released and the other replica's viewer gets in.
            tries: list[tuple[int | None, str]] = []

            async def opened() -> bytes | None:
                data, code, reason = await open_console(port_b, f"{namespace}/console")
                tries.append((code, reason))
                return data

            await eventually(opened, "the other replica's viewer in", timeout=30, interval=0.3,
                             context=lambda: tries[-3:])

        asyncio.run(scenario())
        replicas = plane.kubectl("get", "leases", "-n", release.namespace, "-o", "name").stdout
        assert "vncgate-relay-relay-a" in replicas and "vncgate-relay-relay-b" in replicas


def _route(namespace: str) -> Route:
    return Route(namespace=namespace, name="race", host="127.0.0.1", port=5900,
                 sessions=SessionPolicy(mode=SessionMode.EXCLUSIVE, takeover=Takeover.ALLOW))


def test_a_stale_resource_version_is_refused_and_races_have_one_winner(
        release: Release, namespace: str, tmp_path: Path) -> None:
    kubeconfig = release.plane.service_account_kubeconfig(
        tmp_path / "kubeconfig", release.namespace, release.relay_account)

    async def scenario() -> list[int]:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{release.namespace}/leases"
        client = KubeClient(kube_connection(kubeconfig))
        try:
            created = await client.request("POST", path, {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "stale-check"}, "spec": {"holderIdentity": "one"}})
            stale = created["metadata"]["resourceVersion"]
            await client.request("PATCH", f"{path}/stale-check",
                                 {"spec": {"holderIdentity": "two"}})
            with pytest.raises(KubeError) as refused:
                await client.request("PATCH", f"{path}/stale-check", {
                    "metadata": {"resourceVersion": stale}, "spec": {"holderIdentity": "three"}})
            assert refused.value.status == 409
        finally:
            await client.close()

        # Two replicas claim the same console at the same moment, again and again.
        one = KubeConsoles(KubeClient(kube_connection(kubeconfig)), release.namespace, "one")
        two = KubeConsoles(KubeClient(kube_connection(kubeconfig)), release.namespace, "two")
        await one.start(lambda *_: None)
        await two.start(lambda *_: None)
        winners: list[int] = []
        try:
            route = _route(namespace)
            for round_ in range(10):
                claims = [Holder(replica=r.identity, session_id=f"{r.identity}-{round_}",
                                 user="u", client="c", since=time.time()) for r in (one, two)]
                results: list[Any] = await asyncio.gather(
                    one.acquire(route, claims[0], lambda holder: False),
                    two.acquire(route, claims[1], lambda holder: False))
                assert sum(result is None for result in results) == 1, results
                winner = results.index(None)
                winners.append(winner)
                await (one, two)[winner].release(route, claims[winner])
        finally:
            await one.close()
            await two.close()
        return winners

    winners = asyncio.run(scenario())
    assert len(winners) == 10
    wait_until(lambda: "vnc-" not in release.plane.kubectl(
        "get", "leases", "-n", release.namespace, "-o", "name").stdout,
        "every console Lease released", timeout=10)


def write_recording(directory: Path, namespace: str, name: str) -> str:
    """A small valid recording file (format 1) of namespace/name; its id."""
    stamp = "20250101T120000Z-0123abcd"
    target = directory / namespace / name
    target.mkdir(parents=True)
    server_init = struct.pack("!HH16sI", 800, 600, b"\x00" * 16, 0)
    body = (MAGIC + bytes([FORMAT_VERSION])
            + encode_record(HEADER, 0, json.dumps({"format": 1, "namespace": namespace,
                                                   "name": name, "user": "alice"}).encode())
            + encode_record(SERVER, 0, server_init)
            + encode_record(END, 10, json.dumps({"code": 1000, "complete": True,
                                                 "durationMs": 10}).encode()))
    (target / f"{stamp}.vncrec").write_bytes(gzip.compress(body))
    return f"{namespace}/{name}/{stamp}"


async def get_page(port: int, path: str, token: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{port}{path}", allow_redirects=False,
            headers={"Authorization": f"Bearer {token}"}) as response:
        return response.status, await response.text(errors="replace")


def test_recordings_are_decided_by_get_on_the_subresource(
        release: Release, namespace: str, xvnc: XvncServer, tmp_path: Path) -> None:
    users = tmp_path / "users.yaml"
    users.write_text(yaml.safe_dump(USERS))
    recordings = tmp_path / "recordings"
    recording_id = write_recording(recordings, namespace, "desk")
    # carol may open the console (vncgate-viewer) but not watch it; alice may watch it.
    release.plane.kubectl("create", "rolebinding", "carol-viewer", "-n", namespace,
                          "--clusterrole=vncgate-viewer", "--user=carol")
    release.plane.kubectl("create", "rolebinding", "alice-recordings", "-n", namespace,
                          "--clusterrole=vncgate-recordings-viewer", "--user=alice")
    script, port = relay_process(
        release, tmp_path / "relay", "--auth=token", f"--users-file={users}",
        "--authorization=kubernetes", f"--recording-dir={recordings}",
        f"--target={namespace}/desk=127.0.0.1:{xvnc.port}")
    with script:
        script.wait_for_log("relay listening")
        alice, carol = USERS["alice"]["token"], USERS["carol"]["token"]
        status, text = asyncio.run(get_page(port, "/recordings/", alice))
        assert status == 200 and recording_id in text, (status, text[:500], script.log()[-2000:])
        status, _ = asyncio.run(get_page(port, f"/recordings/{recording_id}/file", alice))
        assert status == 200
        status, text = asyncio.run(get_page(port, "/recordings/", carol))
        assert status == 200 and recording_id not in text
        for suffix in ("/", "/file"):
            status, text = asyncio.run(get_page(port, f"/recordings/{recording_id}{suffix}",
                                                carol))
            assert status == 403 and "vncgate-recordings-viewer" in text, (status, text)
