"""TLS on the public port: https with the test's own CA, HSTS, and certificates reloaded when
the files change (new connections get the new one; a broken pair keeps the old one)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import ssl
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from harness.certs import Pem, make_ca, make_server_cert
from tests.conftest import RelayFactory
from vncgate.relay.settings import settings_from_args


def served_name(url: str, ca: Pem) -> str:
    """The CN of the certificate the listener serves a new connection, verified by `ca`."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    context = ssl.create_default_context(cafile=ca.cert)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=parts.hostname) as tls:
        cert = tls.getpeercert()
    assert cert is not None
    subject = dict(item[0] for item in cert["subject"])
    return str(subject["commonName"])


def install(pem: Pem, live: Pem) -> None:
    """Replace the live files the way a Secret update or cert-manager does: whole files."""
    for source, target in ((pem.key, live.key), (pem.cert, live.cert)):
        shutil.copyfile(source, target.with_suffix(".new"))
        os.replace(target.with_suffix(".new"), target)


async def wait_for_name(url: str, ca: Pem, name: str, timeout: float = 15) -> None:
    last = ""
    try:
        async with asyncio.timeout(timeout):
            while (last := await asyncio.to_thread(served_name, url, ca)) != name:
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"the listener still serves {last!r}, not {name!r}") from None


async def test_https_with_hsts_then_a_rotated_certificate_is_served(
        make_relay: RelayFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ca = make_ca(tmp_path / "ca")
    first = make_server_cert(ca, tmp_path / "first", "first")
    second = make_server_cert(ca, tmp_path / "second", "second")
    live = Pem(tmp_path / "tls.crt", tmp_path / "tls.key")
    install(first, live)
    async with make_relay(routes=[], tls_cert=live.cert, tls_key=live.key,
                          tls_reload_interval=0.2) as relay:
        assert relay.public_url.startswith("https://127.0.0.1:")
        assert relay.internal_url.startswith("http://")  # the internal port is unchanged
        context = ssl.create_default_context(cafile=ca.cert)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{relay.public_url}/healthz", ssl=context) as response:
                assert response.status == 200
                assert response.headers["Strict-Transport-Security"] == "max-age=31536000"
            plain = relay.public_url.replace("https://", "http://")
            with pytest.raises(aiohttp.ClientError):  # no plain http on the TLS port
                async with http.get(f"{plain}/healthz") as response:
                    pass
        assert await asyncio.to_thread(served_name, relay.public_url, ca) == "first"
        install(second, live)
        await wait_for_name(relay.public_url, ca, "second")
        # A broken pair (the first certificate with the second's key) is refused and logged;
        # the working pair stays in service.
        with caplog.at_level(logging.ERROR, "vncgate.relay"):
            shutil.copyfile(first.cert, live.cert)
            async with asyncio.timeout(15):
                while not any("not reloaded" in r.getMessage() for r in caplog.records):
                    await asyncio.sleep(0.1)
        assert await asyncio.to_thread(served_name, relay.public_url, ca) == "second"


async def test_plain_listener_sends_no_hsts(make_relay: RelayFactory) -> None:
    async with make_relay(routes=[]) as relay, aiohttp.ClientSession() as http, \
            http.get(f"{relay.public_url}/healthz") as response:
        assert response.status == 200
        assert "Strict-Transport-Security" not in response.headers


def test_tls_flags_and_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    pem = make_server_cert(make_ca(tmp_path / "ca"), tmp_path, "x")
    settings = settings_from_args(["--tls-cert", str(pem.cert), "--tls-key", str(pem.key)])
    assert (settings.tls_cert, settings.tls_key) == (pem.cert, pem.key)
    monkeypatch.setenv("VNCGATE_TLS_CERT", str(pem.cert))
    monkeypatch.setenv("VNCGATE_TLS_KEY", str(pem.key))
    assert settings_from_args([]).tls_key == pem.key
    monkeypatch.delenv("VNCGATE_TLS_KEY")
    with pytest.raises(SystemExit):
        settings_from_args([])
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        settings_from_args(["--tls-cert", str(pem.cert), "--tls-key", str(tmp_path / "nope")])
    error = capsys.readouterr().err
    assert "--tls-key" in error and "no such file" in error


async def test_origin_check_knows_the_listener_speaks_https(
        make_relay: RelayFactory, tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    pem = make_server_cert(ca, tmp_path / "server", "relay")
    context = ssl.create_default_context(cafile=ca.cert)
    async with make_relay(routes=[], tls_cert=pem.cert, tls_key=pem.key) as relay, \
            aiohttp.ClientSession() as http:
        url = f"{relay.public_url}/t/lab/nope/websockify"
        async with http.ws_connect(url, ssl=context, headers={"Origin": relay.public_url}) as ws:
            assert (await ws.receive(timeout=5)).data == 4404  # own https origin: admitted
        plain_origin = relay.public_url.replace("https://", "http://")
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(url, ssl=context, headers={"Origin": plain_origin})
        assert refused.value.status == 403  # the http:// page is another origin
