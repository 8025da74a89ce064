"""The relay in front of a real TigerVNC server: a full RFB handshake through the bridge."""

from __future__ import annotations

import struct

import aiohttp

from harness.xvnc import XvncServer
from tests.conftest import RelayFactory
from tests.support.rfbclient import viewer_handshake
from vncgate.common.model import Route


async def test_full_rfb_handshake_with_xvnc_through_the_relay(
        make_relay: RelayFactory, xvnc: XvncServer) -> None:
    async with make_relay(routes=[Route("lab", "xvnc", "127.0.0.1", xvnc.port)]) as relay, \
            aiohttp.ClientSession() as http, \
            http.ws_connect(f"{relay.public_url}/t/lab/xvnc/websockify",
                            protocols=("binary",)) as ws:
        stream, init = await viewer_handshake(ws)
        assert (init.width, init.height) == (800, 600)
        assert init.name  # TigerVNC names the desktop after host and display
        # FramebufferUpdateRequest for one pixel: the server answers with a FramebufferUpdate.
        await ws.send_bytes(struct.pack("!BBHHHH", 3, 0, 400, 300, 1, 1))
        (message_type,) = await stream.read(1)
        assert message_type == 0
