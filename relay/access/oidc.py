"""OpenID Connect at the relay (`--auth oidc`): the provider, its keys, and who an ID token names.

The protocol steps that need care are a library's (joserfc: JWS signatures, JWK sets, the
registered claims); this module decides what the relay asks of them:

- Discovery: `<issuer>/.well-known/openid-configuration`, whose `issuer` must equal the configured
  one exactly (OpenID Connect Discovery 4.3), so that a provider cannot speak for another.
- Keys: the provider's JWKS, fetched on first use and again when a token names a key id the
  relay does not hold (the provider rotated its keys), at most once per KEYS_REFETCH_INTERVAL so
  that tokens with made-up key ids cannot make the relay hammer the provider (the first such
  refetch is never held back, so a rotation soon after start is followed at once).
- An ID token is believed only when: signed by one of those keys with an asymmetric algorithm
  (never `none` or an HMAC keyed with the public client secret), `iss` is the issuer, `aud`
  holds the client id (and `azp`, when present, is the client id), `exp` is in the future, `iat`
  not in the future, `sub` present, and, for a sign-in the relay started, `nonce` is the one it
  sent.
- Renewal (a provider that issues refresh tokens, e.g. for the `offline_access` scope): the
  refresh token grant at the same token endpoint; the new ID token passes the same checks, has
  the `sub` of the sign-in (and its `nonce`, if it carries one: OpenID Connect Core 12.2), and
  its names are derived again. A provider that refuses (the grant revoked, the person disabled)
  raises OidcRefused: the sign-in is over.
- Names as the API server's JWT authenticator derives them (`--oidc-username-claim`,
  `--oidc-username-prefix`, `--oidc-groups-claim`, `--oidc-groups-prefix`), so the relay's
  SubjectAccessReviews name the person as `kubectl` would: see `names`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import secrets
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus, urlencode, urlsplit

import aiohttp
from joserfc import jwt
from joserfc.errors import (
    BadSignatureError,
    ExpiredTokenError,
    InvalidClaimError,
    InvalidKeyIdError,
    JoseError,
    MissingClaimError,
)
from joserfc.jwk import KeySet
from joserfc.jws import extract_compact

log = logging.getLogger("vncgate.oidc")

# Signatures with a provider's public keys only: `none` and the HMAC family (whose key would be
# the client secret, known to every replica and the provider) are never accepted.
SIGNING_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                      "ES256", "ES384", "ES512", "EdDSA")
KEYS_REFETCH_INTERVAL = 5.0
METADATA_TTL = 3600.0
# Clock skew allowed between the provider and the relay, in seconds.
LEEWAY = 60
MAX_TOKEN_LENGTH = 16 * 1024
HTTP_TIMEOUT = 10.0


class OidcError(Exception):
    """A sign-in or token that is refused; the message says why in words a person can act on."""


class OidcClaimError(OidcError):
    """The ID token lacks a claim the relay names people by, or it has the wrong type."""


class OidcUnavailable(OidcError):
    """The provider could not be asked (down, or answering nonsense): nobody is let in."""


class OidcRefused(OidcError):
    """The provider refused to renew a sign-in (its refresh token): the sign-in is over."""


class OidcOverage(OidcClaimError):
    """The ID token names no groups but says where to fetch them (Entra ID's group overage)."""


@dataclass(frozen=True)
class OidcSettings:
    issuer: str
    client_id: str
    client_secret: str = field(repr=False, default="")
    # The CA bundle that signs the provider's certificate (default: the system's).
    ca_file: Path | None = None
    username_claim: str = "sub"
    # None: the API server's default (the issuer and '#' before claims other than email);
    # "-": no prefix.
    username_prefix: str | None = None
    groups_claim: str = ""
    groups_prefix: str = ""
    extra_scopes: tuple[str, ...] = ()
    # What the sign-in button says ("Sign in with <name>").
    provider_name: str = ""
    # Bearer ID tokens (kubectl vnc with kubelogin) may be for these clients too: the client id
    # that kubectl's exec plugin signs in with, usually the API server's audience.
    bearer_audiences: tuple[str, ...] = ()
    # With --lease-namespace: one renewal of a sign-in at a time across replicas, shared
    # (relay.replicas.KubeRenewalLedger); off: each replica renews on its own.
    shared_renewals: bool = True

    @property
    def user_prefix(self) -> str:
        """The prefix put before every user name, with the API server's default and `-`."""
        if self.username_prefix is None:
            return "" if self.username_claim == "email" else f"{self.issuer}#"
        return "" if self.username_prefix == "-" else self.username_prefix

    @property
    def scopes(self) -> str:
        wanted = ["openid", "email", "profile", *self.extra_scopes]
        return " ".join(dict.fromkeys(wanted))

    @property
    def button_label(self) -> str:
        return self.provider_name or urlsplit(self.issuer).hostname or self.issuer


@dataclass(frozen=True)
class ProviderMetadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    end_session_endpoint: str | None
    token_auth_methods: tuple[str, ...]


@dataclass(frozen=True)
class SignedInPerson:
    user: str
    groups: tuple[str, ...]
    expires: float
    subject: str
    # The `nonce` the ID token carried ("" for none): a renewed token that carries one must
    # carry the same.
    nonce: str = ""


@dataclass(frozen=True)
class Tokens:
    """What the token endpoint answered: the ID token, and a refresh token if it issued one."""
    id_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False, default=None)


@dataclass(frozen=True)
class RefreshGrant:
    """What renewing a sign-in takes: the refresh token, and the sign-in's `sub` and `nonce`."""
    refresh_token: str = field(repr=False)
    subject: str
    nonce: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"rt": self.refresh_token, "sub": self.subject, "n": self.nonce}

    @staticmethod
    def from_dict(value: Mapping[str, Any]) -> RefreshGrant | None:
        token, subject, nonce = value.get("rt"), value.get("sub"), value.get("n", "")
        if not isinstance(token, str) or not token or not isinstance(subject, str) \
                or not isinstance(nonce, str):
            return None
        return RefreshGrant(token, subject, nonce)


def check_issuer(issuer: str) -> str:
    """An issuer URL as the API server takes it: https, no query or fragment."""
    parts = urlsplit(issuer)
    if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
        raise OidcError(f"--oidc-issuer-url {issuer!r}: the provider's https URL exactly as "
                        "its tokens name it in `iss`, e.g. https://login.example.com/realms/lab")
    return issuer


def names(claims: Mapping[str, Any], settings: OidcSettings) -> tuple[str, tuple[str, ...]]:
    """The user name and groups the API server's JWT authenticator derives from these claims.

    As the API server: the username claim must be a non-empty string; with `email`, an
    `email_verified` claim that is present must be true; the groups claim may be missing (no
    groups), a string (one group) or a list of strings. Stricter than the API server: a name
    that comes out as `system:...` is refused (a provider must never name a cluster component).
    """
    claim = settings.username_claim
    if claim not in claims:
        raise OidcClaimError(f"the provider's ID token has no {claim!r} claim, which names the "
                             f"user (--oidc-username-claim {claim}); ask its administrator to "
                             "add it to the ID token, or choose another claim")
    value = claims[claim]
    if not isinstance(value, str) or not value:
        raise OidcClaimError(f"the ID token's {claim!r} claim is not a non-empty string "
                             f"(it is {type(value).__name__}); --oidc-username-claim needs a "
                             "claim that holds one name")
    if claim == "email" and "email_verified" in claims and claims["email_verified"] is not True:
        raise OidcClaimError("the ID token's 'email_verified' claim is not true: the provider "
                             "has not verified this e-mail address, so it cannot name you")
    user = settings.user_prefix + value
    if user.startswith("system:"):
        raise OidcClaimError(f"the ID token's {claim!r} claim makes the name {user!r}, which "
                             "Kubernetes keeps for its own components; set "
                             "--oidc-username-prefix")
    groups: tuple[str, ...] = ()
    if settings.groups_claim and settings.groups_claim not in claims:
        sources = claims.get("_claim_names")
        if isinstance(sources, dict) and settings.groups_claim in sources:
            # Entra ID's group overage: too many groups for the token, which names a Graph
            # API call instead. Signing in with no groups would silently grant less (or, with
            # deny rules, more) than RBAC says: refuse, and say what to do.
            raise OidcOverage(
                f"the ID token's {settings.groups_claim!r} claim is not in the token: the "
                "provider moved it elsewhere (_claim_names; Entra ID does so for people in "
                "more than 200 groups, the 'group overage'), which the relay does not "
                "follow. Ask the provider's administrator to send only the groups assigned "
                "to the application (Entra ID: groupMembershipClaims 'ApplicationGroup')")
    if settings.groups_claim and settings.groups_claim in claims:
        raw = claims[settings.groups_claim]
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not all(isinstance(g, str) for g in raw):
            raise OidcClaimError(f"the ID token's {settings.groups_claim!r} claim is neither a "
                                 "string nor a list of strings (--oidc-groups-claim "
                                 f"{settings.groups_claim})")
        groups = tuple(dict.fromkeys(settings.groups_prefix + g for g in raw if g))
    return user, groups


def unverified_issuer(token: str) -> str | None:
    """The `iss` a compact JWS claims, before any check: only to pick who should check it."""
    try:
        payload = json.loads(extract_compact(token.encode()).payload)
    except (JoseError, ValueError, UnicodeDecodeError):
        return None
    issuer = payload.get("iss") if isinstance(payload, dict) else None
    return issuer if isinstance(issuer, str) else None


def pkce_pair() -> tuple[str, str]:
    """A PKCE code verifier and its S256 challenge (RFC 7636 4.1, 4.2)."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class OidcClient:
    """The relay's side of one provider: discovery, keys, the code exchange, ID token checks."""

    def __init__(self, settings: OidcSettings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._metadata: ProviderMetadata | None = None
        self._metadata_at = 0.0
        self._keys: KeySet | None = None
        self._keys_at = -math.inf
        # When an unknown key id last made the relay read the JWKS again (throttled).
        self._refreshed_at = -math.inf
        self._lock = asyncio.Lock()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            context = ssl.create_default_context(
                cafile=str(self.settings.ca_file) if self.settings.ca_file else None)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context),
                timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT), trust_env=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _get_json(self, url: str, what: str) -> dict[str, Any]:
        try:
            async with self._client().get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise OidcUnavailable(f"the provider answered {response.status} for {what} "
                                          f"({url})")
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise OidcUnavailable(f"the provider's {what} ({url}) could not be read: "
                                  f"{exc or type(exc).__name__}") from None
        if not isinstance(body, dict):
            raise OidcUnavailable(f"the provider's {what} ({url}) is not a JSON object")
        return body

    async def metadata(self) -> ProviderMetadata:
        now = time.monotonic()
        if self._metadata is not None and now - self._metadata_at < METADATA_TTL:
            return self._metadata
        async with self._lock:
            if self._metadata is not None and now - self._metadata_at < METADATA_TTL:
                return self._metadata
            url = self.settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
            body = await self._get_json(url, "discovery document")
            if body.get("issuer") != self.settings.issuer:
                raise OidcUnavailable(
                    f"the discovery document at {url} names the issuer {body.get('issuer')!r}, "
                    f"not {self.settings.issuer!r}: set --oidc-issuer-url to exactly the "
                    "provider's issuer")
            endpoints = {}
            for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                value = body.get(name)
                if not isinstance(value, str) or urlsplit(value).scheme != "https":
                    raise OidcUnavailable(f"the discovery document at {url} has no https "
                                          f"{name}")
                endpoints[name] = value
            end_session = body.get("end_session_endpoint")
            methods = body.get("token_endpoint_auth_methods_supported", ["client_secret_basic"])
            self._metadata = ProviderMetadata(
                issuer=self.settings.issuer,
                authorization_endpoint=endpoints["authorization_endpoint"],
                token_endpoint=endpoints["token_endpoint"], jwks_uri=endpoints["jwks_uri"],
                end_session_endpoint=end_session if isinstance(end_session, str)
                and urlsplit(end_session).scheme == "https" else None,
                token_auth_methods=tuple(m for m in methods if isinstance(m, str))
                if isinstance(methods, list) else ("client_secret_basic",))
            self._metadata_at = now
            return self._metadata

    async def _key_set(self, *, refresh: bool) -> KeySet:
        async with self._lock:
            now = time.monotonic()
            if self._keys is not None:
                if not refresh or now - self._refreshed_at < KEYS_REFETCH_INTERVAL:
                    return self._keys
                self._refreshed_at = now
        meta = await self.metadata()
        body = await self._get_json(meta.jwks_uri, "signing keys (JWKS)")
        keys = body.get("keys")
        if not isinstance(keys, list):
            raise OidcUnavailable(f"the provider's JWKS at {meta.jwks_uri} has no keys")
        usable = [k for k in keys if isinstance(k, dict) and k.get("use", "sig") == "sig"
                  and k.get("kty") in ("RSA", "EC", "OKP")]
        try:
            key_set = KeySet.import_key_set({"keys": usable})
        except (JoseError, ValueError) as exc:
            raise OidcUnavailable(f"the provider's JWKS at {meta.jwks_uri} cannot be read: "
                                  f"{exc}") from None
        async with self._lock:
            self._keys, self._keys_at = key_set, time.monotonic()
        log.info("oidc: read %d signing keys from %s", len(usable), meta.jwks_uri)
        return key_set

    def form_targets(self) -> tuple[str, ...]:
        """The origins the relay's forms may end up at: the issuer's, and its end-session
        endpoint's once discovery named it (for the CSP's form-action)."""
        urls = [self.settings.issuer]
        if self._metadata is not None and self._metadata.end_session_endpoint:
            urls.append(self._metadata.end_session_endpoint)
        origins = (urlsplit(url) for url in urls)
        return tuple(dict.fromkeys(f"{o.scheme}://{o.netloc}" for o in origins))

    def authorization_url(self, meta: ProviderMetadata, redirect_uri: str, state: str,
                          nonce: str, challenge: str) -> str:
        query = urlencode({"response_type": "code", "client_id": self.settings.client_id,
                           "redirect_uri": redirect_uri, "scope": self.settings.scopes,
                           "state": state, "nonce": nonce, "code_challenge": challenge,
                           "code_challenge_method": "S256"})
        separator = "&" if "?" in meta.authorization_endpoint else "?"
        return f"{meta.authorization_endpoint}{separator}{query}"

    def logout_url(self, meta: ProviderMetadata, after: str) -> str | None:
        """RP-initiated logout at the provider, if it offers it (end_session_endpoint)."""
        if meta.end_session_endpoint is None:
            return None
        query = urlencode({"client_id": self.settings.client_id,
                           "post_logout_redirect_uri": after})
        separator = "&" if "?" in meta.end_session_endpoint else "?"
        return f"{meta.end_session_endpoint}{separator}{query}"

    async def exchange(self, code: str, verifier: str, redirect_uri: str) -> Tokens:
        """The ID token (and refresh token, if the provider issues one) for an authorization
        code (the token endpoint, with PKCE)."""
        body, status = await self._token_request({
            "grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
            "code_verifier": verifier})
        if status != 200:
            error = body.get("error")
            raise OidcError(f"the provider refused the sign-in code ({status}"
                            f"{': ' + str(error)[:100] if error else ''}); sign in again")
        return self._tokens(body)

    async def refresh(self, refresh_token: str) -> Tokens:
        """A new ID token for a refresh token (RFC 6749 6). OidcRefused when the provider says
        no (invalid_grant: revoked, expired, the person disabled); OidcUnavailable when it
        cannot be asked or fails (5xx)."""
        body, status = await self._token_request({"grant_type": "refresh_token",
                                                  "refresh_token": refresh_token})
        if status >= 500 or status == 429:
            raise OidcUnavailable(f"the provider's token endpoint failed ({status})")
        if status != 200:
            error = body.get("error")
            raise OidcRefused(f"the provider refused to renew the sign-in ({status}"
                              f"{': ' + str(error)[:100] if error else ''})")
        try:
            return self._tokens(body)
        except OidcError as exc:
            raise OidcRefused(str(exc)) from None

    @staticmethod
    def _tokens(body: dict[str, Any]) -> Tokens:
        token, refresh = body.get("id_token"), body.get("refresh_token")
        if not isinstance(token, str):
            raise OidcError("the provider answered without an ID token: the relay's client "
                            "must be allowed the openid scope")
        return Tokens(token, refresh if isinstance(refresh, str) and refresh else None)

    async def _token_request(self, form: dict[str, str]) -> tuple[dict[str, Any], int]:
        """POST to the token endpoint with the client's credentials: the JSON body and status."""
        meta = await self.metadata()
        headers = {}
        if "client_secret_basic" in meta.token_auth_methods or \
                "client_secret_post" not in meta.token_auth_methods:
            pair = f"{_form_quote(self.settings.client_id)}:" \
                   f"{_form_quote(self.settings.client_secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form |= {"client_id": self.settings.client_id,
                     "client_secret": self.settings.client_secret}
        try:
            async with self._client().post(meta.token_endpoint, data=form, headers=headers,
                                           allow_redirects=False) as response:
                status = response.status
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise OidcUnavailable(f"the provider's token endpoint could not be asked: "
                                  f"{exc or type(exc).__name__}") from None
        if not isinstance(body, dict):
            if status >= 500:
                return {}, status
            raise OidcUnavailable(f"the provider's token endpoint answered {status} without "
                                  "a JSON object")
        return body, status

    async def validate(self, token: str, nonce: str | None = None,
                       now: float | None = None, *, bearer: bool = False) -> dict[str, Any]:
        """The claims of an ID token of this provider for this client (or, `bearer`, for one
        of --oidc-bearer-audience too), or OidcError."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise OidcError("the ID token is too long")
        keys = await self._key_set(refresh=False)
        try:
            try:
                decoded = jwt.decode(token, keys, algorithms=SIGNING_ALGORITHMS)
            except InvalidKeyIdError:
                # A key the relay has not seen: the provider may have rotated. Read the JWKS
                # again (throttled) and try once more.
                keys = await self._key_set(refresh=True)
                decoded = jwt.decode(token, keys, algorithms=SIGNING_ALGORITHMS)
        except InvalidKeyIdError:
            raise OidcError("the ID token is signed with a key the provider does not "
                            "publish") from None
        except BadSignatureError:
            raise OidcError("the ID token's signature does not verify") from None
        except JoseError as exc:
            raise OidcError(f"the ID token cannot be read ({exc.error})") from None
        claims = decoded.claims
        audiences = (self.settings.client_id,
                     *(self.settings.bearer_audiences if bearer else ()))
        expected: dict[str, Any] = {
            "iss": {"essential": True, "value": self.settings.issuer},
            "aud": {"essential": True, "values": list(audiences)},
            "exp": {"essential": True}, "iat": {"essential": True},
            "sub": {"essential": True}}
        if nonce is not None:
            expected["nonce"] = {"essential": True, "value": nonce}
        registry = jwt.JWTClaimsRegistry(
            now=int(now if now is not None else time.time()), leeway=LEEWAY, **expected)
        try:
            registry.validate(claims)
        except ExpiredTokenError:
            raise OidcError("the ID token has expired; sign in again") from None
        except (InvalidClaimError, MissingClaimError) as exc:
            raise OidcError(f"the ID token's {exc.claim!r} claim is wrong or missing "
                            f"for this relay ({_claim_hint(exc.claim)})") from None
        named = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        azp = claims.get("azp")
        if (azp is not None or len(named) > 1) and azp not in audiences:
            raise OidcError("the ID token was issued to another client (azp); it is not for "
                            "this relay")
        return claims

    async def person(self, token: str, nonce: str | None = None,
                     now: float | None = None, *, bearer: bool = False) -> SignedInPerson:
        claims = await self.validate(token, nonce, now, bearer=bearer)
        user, groups = names(claims, self.settings)
        nonce_claim = claims.get("nonce")
        return SignedInPerson(user=user, groups=groups, expires=float(claims["exp"]),
                              subject=str(claims["sub"]),
                              nonce=nonce_claim if isinstance(nonce_claim, str) else "")

    async def renew(self, grant: RefreshGrant, now: float | None = None
                    ) -> tuple[SignedInPerson, RefreshGrant]:
        """Renew a sign-in with its refresh token: the person the new ID token names (all the
        checks of a sign-in; the same `sub`; the same `nonce` if it carries one, none asked
        for) and the grant for the next renewal (the new refresh token if the provider rotated
        it). OidcRefused if the provider refuses or its answer is not this sign-in's."""
        tokens = await self.refresh(grant.refresh_token)
        try:
            claims = await self.validate(tokens.id_token, None, now)
            if str(claims["sub"]) != grant.subject:
                raise OidcRefused("the renewed ID token names another subject (sub)")
            if "nonce" in claims and claims["nonce"] != grant.nonce:
                raise OidcRefused("the renewed ID token carries another sign-in's nonce")
            user, groups = names(claims, self.settings)
        except OidcUnavailable:
            raise
        except OidcRefused:
            raise
        except OidcError as exc:
            raise OidcRefused(f"the renewed ID token is refused: {exc}") from None
        person = SignedInPerson(user=user, groups=groups, expires=float(claims["exp"]),
                                subject=grant.subject, nonce=grant.nonce)
        return person, RefreshGrant(tokens.refresh_token or grant.refresh_token, grant.subject,
                                    grant.nonce)


def _claim_hint(claim: str) -> str:
    return {"iss": "another issuer", "aud": "another client: check --oidc-client-id",
            "nonce": "not the sign-in this browser started",
            "iat": "issued in the future: check the clocks"}.get(claim, "required")


def _form_quote(value: str) -> str:
    # RFC 6749 2.3.1: the client id and secret are form-encoded before HTTP Basic.
    return quote_plus(value)
