"""The audit log (`vncgate.audit`): sign-ins, refusals, link uses, with the client's address."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from vncgate.relay.access.proxies import address_in
from vncgate.relay.state import RelayState

audit = logging.getLogger("vncgate.audit")


def client_address(request: web.Request, state: RelayState) -> str:
    """The viewer's address: X-Forwarded-For's last untrusted hop when a trusted proxy sent it."""
    remote = request.remote or ""
    proxies = state.settings.auth.trusted_proxies
    forwarded = request.headers.get("X-Forwarded-For")
    if forwarded and address_in(remote, proxies):
        for hop in reversed([h.strip() for h in forwarded.split(",") if h.strip()]):
            if not address_in(hop, proxies):
                return hop
    return remote


def audit_event(event: str, request: web.Request, state: RelayState, **fields: Any) -> None:
    audit.info(event, extra={"fields": {"event": event,
                                        "client": client_address(request, state), **fields}})
