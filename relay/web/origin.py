"""Host and Origin checks of the public port: DNS rebinding and cross-site WebSockets."""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web

from vncgate.relay.access.proxies import address_in, canonical_ip
from vncgate.relay.state import STATE, RelayState
from vncgate.relay.web.audit import audit_event


def host_allowed(request: web.Request, state: RelayState) -> bool:
    """The Host header names this relay (DNS rebinding: a page on a name rebound to the relay's
    address reaches it with that name, and with a matching Origin).

    IP addresses always pass: a rebinding page has a name of its own, never an address.
    """
    names = state.host_names
    if names is None:
        return True
    host = request.headers.get("Host", "")
    if host.startswith("["):
        name = host[1:].partition("]")[0]
    else:
        name = host.rpartition(":")[0] if host.count(":") == 1 else host
    if canonical_ip(name) is not None:
        return True
    return name.lower().rstrip(".") in names


def check_host(request: web.Request) -> None:
    state = request.app[STATE]
    if not host_allowed(request, state):
        audit_event("denied", request, state, result="unknown Host",
                    host=request.headers.get("Host", "")[:100])
        raise web.HTTPMisdirectedRequest(
            text="this relay does not answer to that host name: open it by its own address, "
                 "or add the name with --allowed-host\n")


def request_scheme(request: web.Request, state: RelayState) -> str:
    """http or https, as the browser sees it (a trusted proxy's X-Forwarded-Proto counts)."""
    if request.secure:
        return "https"
    proto = request.headers.get("X-Forwarded-Proto", "").strip().lower()
    if proto in ("http", "https") and address_in(request.remote,
                                                 state.settings.auth.trusted_proxies):
        return proto
    return "http"


def origin_allowed(request: web.Request, allowed: tuple[str, ...]) -> bool:
    """A browser's request must come from this page's own origin or an allowed one.

    Requests without Origin come from non-browser clients, which could send any Origin they
    like; the check exists against cross-site requests (WebSocket hijacking, login CSRF), which
    need a browser, and browsers always send Origin on those.
    """
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    origin = origin.rstrip("/")
    if origin in allowed:
        return True
    state = request.app[STATE]
    public = state.settings.auth.public_url
    if public and origin.lower() == public_origin(public):
        return True
    return same_origin(origin, request.host, request_scheme(request, state))


def same_origin(origin: str, host: str, scheme: str) -> bool:
    """Whether a browser's Origin is the page at `scheme://host` (default ports folded)."""
    parts = urlsplit(origin.rstrip("/"))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    # The scheme counts too: an http:// page is not the https:// one (TLS stripped).
    if parts.scheme != scheme:
        return False
    default_port = {"http": ":80", "https": ":443"}[scheme]
    netloc = parts.netloc.lower().removesuffix(default_port)
    return netloc == host.lower().removesuffix(default_port)


def public_origin(url: str) -> str:
    """`https://vnc.example.com/prefix` -> `https://vnc.example.com`."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def origin_not_foreign(request: web.Request) -> bool:
    # "null" (a page that hides its origin, a sandboxed frame, a redirect) proves nothing
    # either way; a real foreign origin is refused. Forms that change state refuse "null" too
    # (relay/web/csrf.py).
    if request.headers.get("Origin") == "null":
        return True
    return origin_allowed(request, request.app[STATE].settings.allowed_origins)
