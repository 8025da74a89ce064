"""The viewer's identity as the relay knows it, and the `--auth` modes.

Modes (`--auth`):
- `none`: nobody signs in; everyone who reaches the port may open every console.
- `proxy`: an auth proxy in front (oauth2-proxy style) names the user in headers; only requests
  from `--trusted-proxy` addresses are believed, headers from anyone else are ignored
  (vncgate.relay.access.proxies).
- `token`: users and their secrets from `--users-file` (vncgate.relay.access.users, hashes in
  vncgate.relay.access.passwords); a login page (vncgate.relay.web.login) sets a signed session
  cookie (vncgate.relay.access.cookies); scripts send `Authorization: Bearer <token>`.
- `oidc`: the organisation's OpenID Connect provider (vncgate.relay.access.oidc): the browser
  signs in there (vncgate.relay.web.oidclogin), names and groups come from the ID token as the
  API server derives them; scripts send the provider's ID token as a bearer token. A users file
  may be given too: its form and tokens then work beside the provider.

Share links (`vncgate.relay.access.links`) admit a viewer to one target in every mode. Who is
asking is worked out per request in vncgate.relay.web.requester.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class AuthMode(StrEnum):
    """`--auth`: who a viewer is. none: nobody is asked; proxy: an auth proxy's headers;
    token: the relay's own users file (sign-in, bearer tokens); oidc: an OpenID provider."""

    NONE = "none"
    PROXY = "proxy"
    TOKEN = "token"  # noqa: S105 (the name of a mode, not a secret)
    OIDC = "oidc"


AUTH_MODES = tuple(mode.value for mode in AuthMode)


class AuthConfigError(ValueError):
    """A users file or an auth setting that cannot work; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is asking. `method` says how we know: proxy, token, cookie, link or none."""

    user: str
    groups: tuple[str, ...] = ()
    method: str = "none"
    # Set for share-link viewers: the only target they may open, and whether only to watch.
    link_target: str | None = None
    view_only: bool = False
    # When the credential stops being valid (a cookie's or link's expiry, epoch seconds):
    # sessions opened with it end then. None: it does not expire (bearer, proxy, none).
    expires: float | None = None
    # The signed-in cookie's id, so that signing out can revoke it (and end its sessions).
    credential_id: str = ""
    # The users-file entry it was checked against (a cookie or token of the file), so that its
    # sessions end when the entry is removed or its secret changes.
    account: str = ""
    # A renewable OpenID sign-in: `expires` is its ID token's, after which the relay renews
    # the names with the sealed refresh grant (`sealed`), up to `renewable_until` (the
    # cookie's own expiry, --session-ttl after the sign-in).
    renewable_until: float | None = None
    sealed: str = field(default="", repr=False)

    @property
    def label(self) -> str:
        return self.user or "anonymous"

    @property
    def credential_ends(self) -> float | None:
        """When the credential itself stops working (a sign-out is kept until then)."""
        return self.renewable_until if self.renewable_until is not None else self.expires


ANONYMOUS = Identity(user="", method="none")
