"""The users file is re-read when it changes: people added sign in, people removed (or given a
new secret) are signed out and their open consoles end, without restarting the relay."""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
import pytest

from harness.servers import TcpServer
from harness.waiting import eventually
from tests.conftest import RelayFactory
from tests.relay.test_auth import GREETING
from vncgate.common.model import Route
from vncgate.relay import closecodes
from vncgate.relay.access.identity import AuthMode
from vncgate.relay.access.users import load_users
from vncgate.relay.settings import AuthSettings

ALICE, BOB = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef"


def write(path: Path, **tokens: str) -> None:
    # A new file in place, as a Secret volume's atomic swap gives a new inode.
    fresh = path.with_suffix(".new")
    fresh.write_text("".join(f"{name}: {{token: {token}}}\n" for name, token in tokens.items()))
    fresh.replace(path)


async def test_removed_users_are_signed_out_and_added_users_sign_in(
        make_relay: RelayFactory, backend: TcpServer, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    users_file = tmp_path / "users.yaml"
    write(users_file, alice=ALICE)
    auth = AuthSettings(mode=AuthMode.TOKEN, users=load_users(users_file), users_file=users_file)
    routes = [Route("lab", "desk", "127.0.0.1", backend.port)]
    async with make_relay(routes=routes, auth=auth, users_reload_interval=0.05) as relay, \
            aiohttp.ClientSession() as http:
        url = f"{relay.public_url}/"  # the list: 200 signed in, else 302 to the sign-in page

        async def status(token: str) -> int:
            async with http.get(url, headers={"Authorization": f"Bearer {token}"},
                                allow_redirects=False) as answer:
                return answer.status

        assert await status(BOB) == 302
        async with http.ws_connect(f"{relay.public_url}/t/lab/desk/websockify",
                                   origin=relay.public_url,
                                   headers={"Authorization": f"Bearer {ALICE}"}) as ws:
            assert (await ws.receive(timeout=60)).data == GREETING
            write(users_file, bob=BOB)
            # Alice's open console ends, saying why; her token stops working; Bob's works.
            ended = await ws.receive(timeout=60)
            assert ended.type is aiohttp.WSMsgType.CLOSE
            assert ended.data == closecodes.UNAUTHENTICATED
            assert "removed" in (ended.extra or "")
        assert await status(ALICE) == 302

        async def works(token: str) -> bool:
            return await status(token) == 200

        await eventually(lambda: works(BOB), "bob's token to work", timeout=60)
        # A file that no longer loads keeps the users read before, and says so in the log.
        with caplog.at_level(logging.ERROR, logger="vncgate.auth"):
            users_file.write_text("bob: short\n")
            await eventually(lambda: "users file not re-read" in caplog.text,
                             "the log to say the file was not re-read", timeout=60)
        assert await status(BOB) == 200
