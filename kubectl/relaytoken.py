"""The token `kubectl vnc` sends the relay: one minted for the relay's own audience if it can.

A token for the API server itself, sent to the relay, is one the relay could replay against the
API server as you. So the relay (the chart's default) takes only tokens minted for an audience
of its own, and the plugin, before its first request to a relay, asks which
(`GET /api/v1/auth`, no credentials):

- audiences: the API server mints a token for the first of them, for the kubeconfig's own
  identity, with the TokenRequest API. That API exists for ServiceAccounts only
  (`create` on `serviceaccounts/token`, which RBAC may grant an account for its own name), so
  the plugin first asks who the kubeconfig signs in as (a SelfSubjectReview). A person's token
  (OIDC, an exec plugin such as kubelogin, a client certificate) cannot be re-minted for
  another audience: the plugin then stops and says what works (the browser; `--token` with a
  ServiceAccount's token for that audience; or the relay's operator accepting API tokens). It
  never falls back to sending the kubeconfig's token to such a relay.
- no audiences (the relay's operator set `relay.auth.kubernetesTokens.apiServerTokens`): the
  kubeconfig's own token, with a note that the relay could use it as you.
- a relay in `--auth oidc` mode names its provider (`oidc: {issuer, audiences}`): a kubeconfig
  token that is an ID token of that issuer, for one of those clients (kubelogin's), is sent as
  it is: the relay checks it itself. Its operator chose those clients (`--oidc-bearer-audience`).

`--token` is sent as given, without asking.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from vncgate.kubectl.kubeconfig import NoToken, UserConfig

SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
LIFETIME = 3600  # seconds asked for; the API server may give less (never under 10 minutes)
# A proxy's next viewer gets a fresh token when less than this is left: the relay ends a
# session when its token expires, so each session has at least half an hour.
RENEW_BEFORE = LIFETIME // 2

Bearer = Callable[[], Awaitable[str]]


class RelayTokenError(NoToken):
    """No token fit for this relay; the message says why and what works instead."""


class Unreachable(RelayTokenError):
    """The relay or the API server could not be asked (not listening, or an untrusted
    certificate): `reason` is what went wrong, without the address."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


async def _call(session: aiohttp.ClientSession, method: str, url: str, what: str, *,
                headers: dict[str, str] | None = None, body: Any = None,
                ssl: Any = True) -> tuple[int, Any]:
    try:
        async with session.request(method, url, headers=headers, ssl=ssl,
                                   data=None if body is None else json.dumps(body)) as resp:
            text = await resp.text()
    except aiohttp.ClientConnectorCertificateError as exc:
        reason = (f"its certificate is not trusted ({exc.certificate_error}): give the CA that "
                  "signed it with --certificate-authority FILE")
        raise Unreachable(f"{what} {urlsplit(url).netloc} has a certificate this machine does "
                          f"not trust ({exc.certificate_error}): give the CA that signed it "
                          "with --certificate-authority FILE", reason) from None
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise Unreachable(f"cannot reach {what} {urlsplit(url).netloc}: {exc}",
                          str(exc)) from None
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, {"message": text.strip()[:300]}


def _message(reply: Any) -> str:
    return str(reply.get("message") or reply.get("error") or "") if isinstance(reply, dict) \
        else ""


async def relay_auth(base: str, ssl: Any = True) -> dict[str, Any]:
    """What the relay says about the tokens it takes (GET /api/v1/auth)."""
    host = urlsplit(base).netloc
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        status, reply = await _call(http, "GET", f"{base}/api/v1/auth", "the relay at",
                                    ssl=ssl)
    if status != 200 or not isinstance(reply, dict) or not isinstance(
            reply.get("audiences"), list):
        raise RelayTokenError(
            f"the relay at {host} does not say which tokens it takes (GET /api/v1/auth: HTTP "
            f"{status}): is it a vncgate relay of the same version? Pass a token with --token")
    return reply


def _unverified_claims(header: str) -> dict[str, Any]:
    """The claims a bearer JWT states, unchecked: only to tell whose token it is (the relay
    checks the signature)."""
    token = header.partition(" ")[2]
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, UnicodeDecodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


def provider_token_fits(claims: dict[str, Any], oidc: Any) -> bool:
    """Whether an ID token's (unchecked) claims are for the relay's OpenID provider and one of
    the clients it takes."""
    if not isinstance(oidc, dict) or not isinstance(oidc.get("audiences"), list):
        return False
    audience = claims.get("aud")
    audiences = audience if isinstance(audience, list) else [audience]
    return claims.get("iss") == oidc.get("issuer") and any(
        a in oidc["audiences"] for a in audiences if isinstance(a, str))


async def accepted_audiences(base: str, ssl: Any = True) -> tuple[str, ...]:
    """The audiences the relay takes Kubernetes tokens for; () for the API server's own.
    `ssl`: how the relay's certificate is checked (kubectl vnc --certificate-authority)."""
    return _kubernetes_audiences(base, await relay_auth(base, ssl))


def _kubernetes_audiences(base: str, reply: dict[str, Any]) -> tuple[str, ...]:
    host = urlsplit(base).netloc
    if reply.get("kubernetesTokens") is not True:
        raise RelayTokenError(
            f"the relay at {host} takes no Kubernetes tokens (it runs without "
            "--kubernetes-tokens; the chart's relay.auth.kubernetesTokens.enabled): pass a token "
            "of its users file with --token")
    return tuple(str(a) for a in reply["audiences"])


class MintedToken:
    """A ServiceAccount's token for one audience (TokenRequest API), minted again when it is
    about to expire (a proxy runs for hours)."""

    def __init__(self, user: UserConfig, namespace: str, name: str, audience: str) -> None:
        self.user, self.namespace, self.name, self.audience = user, namespace, name, audience
        self._token = ""
        self._expires = 0.0

    async def __call__(self) -> str:
        if not self._token or self._expires - time.time() < RENEW_BEFORE:
            self._token, self._expires = await self._mint()
        return f"Bearer {self._token}"

    async def _mint(self) -> tuple[str, float]:
        connection = self.user.connection
        path = f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{self.name}/token"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"audiences": [self.audience], "expirationSeconds": LIFETIME}}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            status, reply = await _call(
                http, "POST", f"{connection.server}{path}", "the API server",
                headers={**await connection.headers(), "Content-Type": "application/json"},
                body=body, ssl=connection.ssl_context)
        answer = reply.get("status") if isinstance(reply, dict) else None
        status_body: dict[str, Any] = answer if isinstance(answer, dict) else {}
        token = status_body.get("token")
        if status == 201 and isinstance(token, str) and token:
            expires = time.time() + LIFETIME
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                expires = datetime.fromisoformat(
                    str(status_body.get("expirationTimestamp")).replace("Z", "+00:00")
                ).timestamp()
            return token, expires
        account = f"{self.namespace}/{self.name}"
        command = (f"kubectl create token {self.name} -n {self.namespace} "
                   f"--audience {self.audience}")
        if status == 403:
            raise RelayTokenError(
                f"the relay takes only tokens minted for its audience {self.audience}, and your "
                f"ServiceAccount {account} may not mint its own (RBAC: create on "
                f"serviceaccounts/token with resourceNames [{self.name}] in {self.namespace}). "
                f"Ask for that right, or pass such a token: --token \"$({command})\"")
        raise RelayTokenError(
            f"the API server did not mint a token for the audience {self.audience} for "
            f"{account}: {_message(reply) or 'no token in the answer'} (HTTP {status}); pass one "
            f"with --token \"$({command})\"")


async def who_am_i(user: UserConfig) -> str:
    """The kubeconfig's user name, as the API server sees it (a SelfSubjectReview)."""
    connection = user.connection
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        status, reply = await _call(
            http, "POST", f"{connection.server}/apis/authentication.k8s.io/v1/selfsubjectreviews",
            "the API server", headers={**await connection.headers(),
                                       "Content-Type": "application/json"},
            body=body, ssl=connection.ssl_context)
    info = ((reply.get("status") or {}).get("userInfo") or {}) if isinstance(reply, dict) else {}
    name = info.get("username") if isinstance(info, dict) else None
    if status >= 300 or not isinstance(name, str) or not name:
        raise RelayTokenError(
            "cannot learn who the kubeconfig signs in as, to mint a token for the relay "
            f"(SelfSubjectReview: {_message(reply) or 'no user'}, HTTP {status}); pass a token "
            "with --token")
    return name


class Deferred:
    """A bearer found at first use, and again after a relay that could not be reached: for a
    proxy started while its relay is down (its viewers are told so until it is up)."""

    def __init__(self, user: UserConfig, base: str, ssl: Any = True) -> None:
        self.user, self.base, self.ssl = user, base, ssl
        self._bearer: Bearer | None = None

    async def __call__(self) -> str:
        if self._bearer is None:
            self._bearer = await for_relay(self.user, self.base, self.ssl)
        return await self._bearer()


async def for_relay(user: UserConfig, base: str, ssl: Any = True) -> Bearer:
    """How to get `Authorization` for the relay at `base` (its certificate checked as `ssl`
    says); RelayTokenError (a NoToken) says why there is none that fits."""
    if user.token_flag:
        return user.bearer
    reply = await relay_auth(base, ssl)
    if reply.get("oidc") is not None:
        # A relay that signs people in at an OpenID provider takes that provider's ID tokens
        # (kubelogin's) and checks them itself.
        header = await user.bearer()
        if provider_token_fits(_unverified_claims(header), reply["oidc"]):
            return user.bearer
        if reply.get("kubernetesTokens") is not True:
            raise RelayTokenError(
                f"the relay at {urlsplit(base).netloc} takes ID tokens of "
                f"{reply['oidc'].get('issuer')} for the clients "
                f"{', '.join(map(str, reply['oidc'].get('audiences', [])))}, and your "
                "kubeconfig's token is not one; use a kubeconfig that signs in there (kubelogin) "
                "or open the console in a browser (kubectl vnc open NAME)")
    audiences = _kubernetes_audiences(base, reply)
    host = urlsplit(base).netloc
    if not audiences:
        await user.bearer()  # no token at all (a client certificate): NoToken says so now
        print(f"kubectl vnc: note: the relay at {host} takes tokens minted for the API server "
              "itself, so it is sent your kubeconfig's token, which it could use against the "
              "API server as you; its operator can give it an audience of its own "
              "(relay.auth.kubernetesTokens)", file=sys.stderr)
        return user.bearer
    audience = audiences[0]
    name = await who_am_i(user)
    namespace, _, account = name.removeprefix(SERVICE_ACCOUNT_PREFIX).partition(":")
    if not name.startswith(SERVICE_ACCOUNT_PREFIX) or not account:
        raise RelayTokenError(
            f"the relay at {host} takes only tokens minted for its audience {audience}. The API "
            f"server mints those for ServiceAccounts only, and your kubeconfig signs in as "
            f"{name}, whose token (OIDC, an exec plugin, a client certificate) cannot be "
            "re-minted for another audience; it is not sent. Open the console in a browser "
            "(kubectl vnc open NAME), or pass a ServiceAccount's token for that audience: "
            f"--token \"$(kubectl create token NAME -n NAMESPACE --audience {audience})\"")
    bearer = MintedToken(user, namespace, account, audience)
    await bearer()  # mint now: a refusal is reported before anything else happens
    return bearer
