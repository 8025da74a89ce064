"""Fixtures shared by every part: a real VNC server, a relay in the test's event loop."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.xvnc import XvncServer
from vncgate.common.addresses import Address
from vncgate.common.model import Route
from vncgate.relay.server import RelayServer
from vncgate.relay.settings import RelaySettings

ROOT = Path(__file__).resolve().parent.parent
API_TOKEN = "test-registration-token-0123456789"
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="session")
def xvnc() -> Iterator[XvncServer]:
    """One real TigerVNC server for the session, painted red, on 127.0.0.1 only."""
    ARTIFACTS.mkdir(exist_ok=True)
    with XvncServer(colour="#ff0000", log_path=ARTIFACTS / "xvnc.log") as server:
        yield server


def relay_settings(**overrides: Any) -> RelaySettings:
    values: dict[str, Any] = {
        "listen": Address("127.0.0.1", 0),
        "internal_listen": Address("127.0.0.1", 0),
        "api_token": API_TOKEN,
        "connect_timeout": 2.0,
    }
    values.update(overrides)
    return RelaySettings(**values)


RelayFactory = Callable[..., AbstractAsyncContextManager[RelayServer]]


@pytest.fixture
def make_relay() -> RelayFactory:
    """`async with make_relay(routes=[...], max_sessions=2) as relay:` a relay on free ports."""

    @asynccontextmanager
    async def factory(routes: list[Route] | None = None, **overrides: Any
                      ) -> AsyncIterator[RelayServer]:
        async with RelayServer(relay_settings(**overrides), routes) as relay:
            yield relay

    return factory
