"""The sign-in page: the users-file form, the OpenID provider's button, or both."""

from __future__ import annotations

import re

from aiohttp import web

from vncgate.relay.access.identity import AuthMode
from vncgate.relay.state import STATE
from vncgate.relay.web.csrf import csrf_for_page, set_csrf_cookie
from vncgate.relay.web.pages import render_page

# A `next` after login: a relative path on this site (no scheme, no `//`, no backslash).
_SAFE_NEXT = re.compile(r"^(?!/)(?!.*//)[A-Za-z0-9._~/-]*$")


# `next` of a viewer: the console the page names (as the address bar does; its display name is
# shown only to those who may open it, so not before sign-in).
_VIEWER_NEXT = re.compile(r"^t/([^/]+)/([^/]+)/$")


def login_page(request: web.Request, message: str = "", next_path: str = "", status: int = 200,
               headers: dict[str, str] | None = None, user: str = "") -> web.Response:
    csrf = csrf_for_page(request, None)
    viewer = _VIEWER_NEXT.match(next_path)
    state = request.app[STATE]
    auth = state.settings.auth
    provider = auth.oidc.button_label if auth.mode == AuthMode.OIDC and auth.oidc else ""
    response = render_page(request, "login.html",
                           {"message": message, "next": next_path, "csrf": csrf.token,
                            "target": f"{viewer[1]}/{viewer[2]}" if viewer else "",
                            "user": user[:256], "provider": provider,
                            "form": auth.mode == AuthMode.TOKEN or bool(state.users.current)},
                           status=status, headers=headers)
    set_csrf_cookie(response, request, csrf)
    return response


def safe_next(value: str) -> str:
    return value if value and len(value) < 512 and _SAFE_NEXT.match(value) else "./"
