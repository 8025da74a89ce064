"""The names and flags of the relay's cookies in a browser: Secure and `__Host-` under https."""

from __future__ import annotations

from aiohttp import web

from vncgate.relay.access.proxies import address_in
from vncgate.relay.state import RelayState


def secure_cookies(request: web.Request, state: RelayState) -> bool:
    """Cookies get Secure when the browser reached the relay over https (its own TLS, or a
    trusted proxy's), or the public URL is https."""
    proto = request.headers.get("X-Forwarded-Proto", "")
    behind_tls_proxy = proto == "https" and address_in(request.remote,
                                                       state.settings.auth.trusted_proxies)
    return request.secure or behind_tls_proxy or state.settings.auth.public_url.startswith(
        "https://")


def cookie_name(request: web.Request, state: RelayState, base: str) -> str:
    """`__Host-<base>` under https: a browser takes such a cookie only from this very host
    (Secure, Path=/, no Domain), so a sibling host under the same domain cannot plant one
    (`Domain=example.test`) the way it can plant a plain name. Plain over http, where
    browsers refuse the prefix."""
    return f"__Host-{base}" if secure_cookies(request, state) else base


def set_cookie(response: web.StreamResponse, request: web.Request, state: RelayState,
               base: str, value: str, *, max_age: float | None = None,
               samesite: str = "Strict") -> None:
    """Set one of the relay's cookies: HttpOnly, Path=/ (every prefix an Ingress may put in
    front), Secure and `__Host-` under https."""
    secure = secure_cookies(request, state)
    response.set_cookie(cookie_name(request, state, base), value, path="/", httponly=True,
                        samesite=samesite, secure=secure,
                        max_age=int(max_age) if max_age is not None else None)


def delete_cookie(response: web.StreamResponse, request: web.Request, state: RelayState,
                  base: str, *, samesite: str = "Strict") -> None:
    response.del_cookie(cookie_name(request, state, base), path="/",
                        secure=secure_cookies(request, state), httponly=True, samesite=samesite)
