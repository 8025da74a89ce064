"""Fixtures shared by every part: a real VNC server, a relay in the test's event loop, a client
session, stand-in VNC servers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from harness import reaper
from harness.servers import TcpServer, echo_rfb, sink
from harness.xvnc import XvncServer
from vncgate.common.addresses import Address
from vncgate.common.model import Route
from vncgate.relay.settings import RelaySettings
from vncgate.relay.web.server import RelayServer

ROOT = Path(__file__).resolve().parent.parent
API_TOKEN = "test-registration-token-0123456789"
ARTIFACTS = ROOT / "test-artifacts"


def pytest_configure(config: pytest.Config) -> None:
    # Marks every process the run starts, and makes SIGTERM (a CI time-out) end the run as
    # Ctrl-C does, with its teardowns (harness.reaper).
    reaper.install()


@pytest.hookimpl(trylast=True)  # after the session's teardowns (pytest's runner finishes them)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    report = reaper.finish()
    if report is None:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_sep("=", "processes left running", red=True, bold=True)
        reporter.write_line(report)
    else:
        print(report)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def xvnc() -> Iterator[XvncServer]:
    """One real TigerVNC server for the session, painted red, on 127.0.0.1 only.

    Shared by hundreds of tests from one address, many of which read the greeting and hang up
    on purpose; TigerVNC counts each such connection, and at its default threshold (5) would
    refuse the address ("Too many security failures") to whichever test comes next. So this
    one's threshold is out of reach; the lock-out itself is tested against servers of their
    own at the defaults (tests/operator/test_probes.py)."""
    ARTIFACTS.mkdir(exist_ok=True)
    with XvncServer(colour="#ff0000", log_path=ARTIFACTS / "xvnc.log",
                    extra_args=("-BlacklistThreshold", "1000000")) as server:
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


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for the test, closed at its end."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def backend() -> AsyncIterator[TcpServer]:
    """A stand-in VNC server on 127.0.0.1: greets, then echoes what it gets."""
    async with TcpServer(echo_rfb) as server:
        yield server


@pytest.fixture
async def sink_backend() -> AsyncIterator[TcpServer]:
    """A stand-in VNC server on 127.0.0.1: greets, then reads and keeps what it gets (30 s)."""
    async with TcpServer(sink(seconds=30)) as server:
        yield server
