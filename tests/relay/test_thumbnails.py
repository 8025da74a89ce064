"""Thumbnails made by the relay from real Xvnc servers: the screen's colour, reduced; kept 30 s
(one connection however often the list asks); a server that asks for a password the relay does
not have is asked once, not at every request (each such connection counts towards TigerVNC's
lock-out); the relay's own credentials work; only for those who may open the console."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from harness.vncsecurity import SERVER_NAME, make_ca, write_vnc_password
from harness.xvnc import XvncServer
from tests.conftest import RelayFactory
from tests.relay.test_auth import ALICE_PASSWORD, USERS, jar_session, sign_in
from vncgate.common.model import Route, route_from_json
from vncgate.common.spec import Access, Credentials, SpecError, TlsSpec, parse_spec
from vncgate.relay.access.identity import AuthMode
from vncgate.relay.settings import AuthSettings

PASSWORD = "thumbs-pw"


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    (tmp_path / "plain").write_text(PASSWORD + "\n")
    return write_vnc_password(tmp_path / "passwd", PASSWORD)


@pytest.fixture
def open_desk() -> Iterator[XvncServer]:
    with XvncServer(geometry="1024x768", colour="#0000d0") as server:
        yield server


@pytest.fixture
def locked_desk(password_file: Path) -> Iterator[XvncServer]:
    with XvncServer(colour="#d00000", extra_args=("-SecurityTypes", "VncAuth",
                                                  "-PasswordFile", str(password_file))) as server:
        yield server


def centre(jpeg: bytes) -> tuple[int, int, int]:
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    assert max(image.size) <= 320
    pixel = image.getpixel((image.width // 2, image.height // 2))
    assert isinstance(pixel, tuple)
    return pixel[0], pixel[1], pixel[2]


async def test_thumbnails(make_relay: RelayFactory, open_desk: XvncServer,
                          locked_desk: XvncServer, tmp_path: Path) -> None:
    auth = AuthSettings(mode=AuthMode.TOKEN, users=USERS, session_secret=b"s" * 32)
    routes = [
        Route("lab", "desk", "127.0.0.1", open_desk.port, thumbnail=True),
        Route("lab", "locked", "127.0.0.1", locked_desk.port, thumbnail=True),
        Route("lab", "withpw", "127.0.0.1", locked_desk.port, thumbnail=True,
              credentials=Credentials(password_file=str(tmp_path / "plain"))),
        Route("lab", "bobs", "127.0.0.1", open_desk.port, thumbnail=True,
              access=Access(users=("bob",))),
        Route("lab", "off", "127.0.0.1", open_desk.port),
    ]
    async with make_relay(routes=routes, auth=auth) as relay, jar_session() as http:
        base = relay.public_url
        async with http.get(f"{base}/t/lab/desk/thumbnail") as resp:
            assert resp.status == 401
        assert (await sign_in(http, relay, "alice", ALICE_PASSWORD)).status == 303

        async def get(name: str) -> aiohttp.ClientResponse:
            resp = await http.get(f"{base}/t/lab/{name}/thumbnail")
            await resp.read()
            return resp

        first, again = await get("desk"), await get("desk")
        assert first.status == again.status == 200
        assert first.headers["Content-Type"] == "image/jpeg"
        red, green, blue = centre(await first.read())
        assert blue > 150 and red < 60 and green < 60, (red, green, blue)
        assert relay.state.thumbnails.grabs == 1  # kept: one connection for both
        seen = relay.state.health.get("lab/desk")  # and the list's status learnt from it
        assert seen is not None and seen.phase == "Ready"

        locked = await get("locked")
        assert locked.status == 404 and "asks for a password" in await locked.text()
        assert (await get("locked")).status == 404
        assert relay.state.thumbnails.grabs == 2  # the refusal is kept too: asked once

        withpw = await get("withpw")
        assert withpw.status == 200
        red, green, blue = centre(await withpw.read())
        assert red > 150 and green < 60 and blue < 60, (red, green, blue)

        bobs, off = await get("bobs"), await get("off")
        assert bobs.status == 404 and "that you may open" in await bobs.text()
        assert off.status == 404 and "spec.thumbnail.enabled" in await off.text()
        assert relay.state.thumbnails.grabs == 3


async def test_a_vencrypt_console_gets_its_thumbnail_over_verified_tls(
        make_relay: RelayFactory, password_file: Path, tmp_path: Path) -> None:
    """`spec.tls`: the grab logs in with X509Vnc (the test CA, the server's name) and reads the
    screen over TLS; with a CA that did not sign the server's certificate, no thumbnail."""
    make_ca(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    make_ca(other)
    with XvncServer(colour="#00c000", extra_args=(
            "-SecurityTypes", "X509Vnc", "-PasswordFile", str(password_file),
            "-X509Cert", str(tmp_path / "server.crt"),
            "-X509Key", str(tmp_path / "server.key"))) as server:
        credentials = Credentials(password_file=str(tmp_path / "plain"))
        routes = [
            Route("lab", "bmc", "127.0.0.1", server.port, thumbnail=True, credentials=credentials,
                  tls=TlsSpec(ca_file=str(tmp_path / "ca.crt"), server_name=SERVER_NAME)),
            Route("lab", "untrusted", "127.0.0.1", server.port, thumbnail=True,
                  credentials=credentials,
                  tls=TlsSpec(ca_file=str(other / "ca.crt"), server_name=SERVER_NAME)),
        ]
        async with make_relay(routes=routes) as relay, aiohttp.ClientSession() as http:
            async with http.get(f"{relay.public_url}/t/lab/bmc/thumbnail") as resp:
                assert resp.status == 200, await resp.text()
                red, green, blue = centre(await resp.read())
            assert green > 150 and red < 60 and blue < 60, (red, green, blue)
            async with http.get(f"{relay.public_url}/t/lab/untrusted/thumbnail") as resp:
                assert resp.status == 404 and "not trusted" in await resp.text()


@pytest.mark.parametrize(("value", "words"), [
    ({"enabled": "yes"}, "spec.thumbnail.enabled: must be true or false"),
    ({"enable": True}, "spec.thumbnail"),
    (True, "spec.thumbnail"),
])
def test_bad_thumbnail_specs_are_named(value: object, words: str) -> None:
    with pytest.raises(SpecError, match=words):
        parse_spec({"endpoint": {"address": {"host": "10.0.0.5", "port": 5900}},
                    "thumbnail": value})


def test_thumbnail_in_the_wire_form() -> None:
    route = Route("lab", "desk", "10.0.0.5", 5900, thumbnail=True)
    assert route.to_json()["thumbnail"] == {"enabled": True}
    assert route_from_json(route.to_json()).thumbnail is True
    assert "thumbnail" not in Route("lab", "desk", "10.0.0.5", 5900).to_json()
