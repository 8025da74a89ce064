"""`--auth oidc`: ID tokens checked against a real OpenID provider's discovery and keys.

The provider is panva's oidc-provider under Node (tests/support/oidc.py) on loopback https. Tokens
are minted here with its own signing key (so the signature is good and one claim is wrong), or
with keys the test makes (a forger's).
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import OctKey, RSAKey

from tests.support.oidc import Account, OidcProvider, need_provider, signing_key
from vncgate.relay.access.cookies import seal, unseal
from vncgate.relay.access.oidc import (
    OidcClaimError,
    OidcClient,
    OidcError,
    OidcOverage,
    OidcRefused,
    OidcSettings,
    OidcUnavailable,
    RefreshGrant,
    Tokens,
    names,
)
from vncgate.relay.access.renewals import Renewals
from vncgate.relay.settings import settings_from_args

CLIENT = "vncgate"
SECRET = "a client secret of the relay"


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    need_provider()
    server = OidcProvider(tmp_path_factory.mktemp("oidc"), clients=[{
        "client_id": CLIENT, "client_secret": SECRET,
        "redirect_uris": ["http://127.0.0.1:9/login/oidc/callback"]}],
        accounts={"alice": Account("pw", {"email": "alice@example.test"})})
    server.start()
    try:
        yield server
    finally:
        server.stop()


def settings(provider: OidcProvider, **overrides: Any) -> OidcSettings:
    assert provider.ca is not None
    values: dict[str, Any] = {"issuer": provider.issuer, "client_id": CLIENT,
                              "client_secret": SECRET, "ca_file": provider.ca.cert,
                              "username_claim": "email", "groups_claim": "groups",
                              "groups_prefix": "oidc:"}
    values.update(overrides)
    return OidcSettings(**values)


def claims(provider: OidcProvider, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {"iss": provider.issuer, "aud": CLIENT, "sub": "alice",
                              "iat": now, "exp": now + 300, "nonce": "n-1",
                              "email": "alice@example.test", "email_verified": True,
                              "groups": ["devs", "ops"]}
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


def mint(key: dict[str, Any] | RSAKey | OctKey, payload: dict[str, Any],
         alg: str = "RS256") -> str:
    signer = key if not isinstance(key, dict) else RSAKey.import_key(key)
    kid = signer.kid if isinstance(signer, RSAKey) else None
    header = {"alg": alg, **({"kid": kid} if kid else {})}
    return jwt.encode(header, payload, signer, algorithms=[alg])


async def test_a_good_token_names_the_person_as_the_api_server_would(
        provider: OidcProvider) -> None:
    client = OidcClient(settings(provider))
    try:
        person = await client.person(mint(provider.keys[0], claims(provider)), nonce="n-1")
    finally:
        await client.close()
    assert person.user == "alice@example.test"  # email: no prefix by default
    assert person.groups == ("oidc:devs", "oidc:ops")


@pytest.mark.parametrize(("change", "says"), [
    ({"aud": "another-client"}, "'aud' claim"),
    ({"iss": "https://127.0.0.1:1"}, "'iss' claim"),
    ({"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200}, "expired"),
    ({"nonce": "someone else's"}, "'nonce' claim"),
    ({"nonce": None}, "nonce"),
    ({"iat": int(time.time()) + 3600}, "'iat' claim"),
    ({"aud": [CLIENT, "other"], "azp": "other"}, "another client (azp)"),
])
async def test_a_token_with_a_wrong_claim_is_refused(
        provider: OidcProvider, change: dict[str, Any], says: str) -> None:
    client = OidcClient(settings(provider))
    try:
        with pytest.raises(OidcError, match=says.replace("(", r"\(").replace(")", r"\)")):
            await client.person(mint(provider.keys[0], claims(provider, **change)),
                                nonce="n-1")
    finally:
        await client.close()


async def test_tampered_forged_and_unsigned_tokens_are_refused(provider: OidcProvider) -> None:
    client = OidcClient(settings(provider))
    try:
        good = mint(provider.keys[0], claims(provider))
        header, payload, signature = good.split(".")
        other = mint(provider.keys[0], claims(provider, email="mallory@example.test"))
        tampered = f"{header}.{other.split('.')[1]}.{signature}"
        with pytest.raises(OidcError, match="signature does not verify"):
            await client.person(tampered, nonce="n-1")
        # A forger's key under the provider's key id.
        forged = signing_key(str(provider.keys[0]["kid"]))
        with pytest.raises(OidcError, match="signature does not verify"):
            await client.person(mint(forged, claims(provider)), nonce="n-1")
        # A forger's key under a new key id: the relay asks the provider again, in vain.
        with pytest.raises(OidcError, match="key the provider does not publish"):
            await client.person(mint(signing_key("made-up"), claims(provider)), nonce="n-1")
        # HMAC with the client secret (known to the relay, not only to the provider).
        hmac_key = OctKey.import_key(SECRET.encode().ljust(32, b"."))
        with pytest.raises(OidcError):
            await client.person(mint(hmac_key, claims(provider), alg="HS256"), nonce="n-1")
        unsigned = f"{header.replace(header, 'eyJhbGciOiJub25lIn0')}.{payload}."
        with pytest.raises(OidcError):
            await client.person(unsigned, nonce="n-1")
    finally:
        await client.close()


async def test_a_key_rotation_at_the_provider_is_followed(provider: OidcProvider) -> None:
    client = OidcClient(settings(provider))
    try:
        await client.person(mint(provider.keys[0], claims(provider)), nonce="n-1")
        old = provider.keys[0]
        provider.rotate_keys("key-rotated")
        person = await client.person(mint(provider.keys[0], claims(provider)), nonce="n-1")
        assert person.user == "alice@example.test"
        # The retired key is no longer published: once the relay has read the new set, tokens
        # it signed are refused.
        with pytest.raises(OidcError, match="key the provider does not publish"):
            await client.person(mint(old, claims(provider)), nonce="n-1")
    finally:
        await client.close()


async def test_discovery_of_another_issuer_is_refused(provider: OidcProvider) -> None:
    client = OidcClient(settings(provider, issuer=provider.issuer + "/"))
    try:
        with pytest.raises(OidcUnavailable, match="names the issuer"):
            await client.metadata()
    finally:
        await client.close()


def test_names_follow_the_api_servers_claim_mappings(tmp_path: Path) -> None:
    issuer = "https://idp.example.test"
    base = OidcSettings(issuer=issuer, client_id=CLIENT)
    token = {"sub": "1234", "email": "a@example.test", "groups": "admins"}
    # sub is the default, prefixed with the issuer and '#', as the API server does.
    assert names(token, base) == (f"{issuer}#1234", ())
    assert names(token, OidcSettings(issuer=issuer, client_id=CLIENT,
                                     username_prefix="-")) == ("1234", ())
    assert names(token, OidcSettings(issuer=issuer, client_id=CLIENT, username_claim="email",
                                     groups_claim="groups", groups_prefix="idp:")
                 ) == ("a@example.test", ("idp:admins",))
    # No groups claim in the token: no groups (the API server too).
    assert names({"sub": "x"}, OidcSettings(issuer=issuer, client_id=CLIENT,
                                            groups_claim="groups"))[1] == ()


@pytest.mark.parametrize(("token", "mapping", "says"), [
    ({"sub": "x"}, {"username_claim": "email"}, "no 'email' claim"),
    ({"sub": "x", "preferred_username": 7}, {"username_claim": "preferred_username"},
     "'preferred_username' claim is not a non-empty string"),
    ({"sub": "x", "email": "a@b", "email_verified": False}, {"username_claim": "email"},
     "email_verified"),
    ({"sub": "x", "groups": [1, 2]}, {"groups_claim": "groups"}, "'groups' claim"),
    ({"sub": "x", "groups": {"a": 1}}, {"groups_claim": "groups"}, "'groups' claim"),
    ({"sub": "system:admin"}, {"username_prefix": "-"}, "Kubernetes keeps"),
    # Entra ID's group overage: no groups claim, but a pointer to where they are.
    ({"sub": "x", "_claim_names": {"groups": "src1"},
      "_claim_sources": {"src1": {"endpoint": "https://graph.example.test/me/getMemberObjects"}}},
     {"groups_claim": "groups"}, "group overage"),
])
def test_a_missing_or_wrong_typed_claim_refuses_naming_it(
        token: dict[str, Any], mapping: dict[str, Any], says: str) -> None:
    with pytest.raises(OidcClaimError, match=says):
        names(token, OidcSettings(issuer="https://idp.example.test", client_id=CLIENT,
                                  **mapping))


@pytest.mark.parametrize(("args", "words"), [
    ([], "--auth oidc needs --oidc-issuer-url"),
    (["--oidc-issuer-url", "http://idp.example.test", "--oidc-client-id", "vncgate",
      "--oidc-client-secret-file", "SECRET", "--public-url", "https://vnc.example.test"],
     "the provider's https URL"),
    (["--oidc-issuer-url", "https://idp.example.test"], "needs --oidc-client-id"),
    (["--oidc-issuer-url", "https://idp.example.test", "--oidc-client-id", "vncgate"],
     "needs --oidc-client-secret-file"),
    (["--oidc-issuer-url", "https://idp.example.test", "--oidc-client-id", "vncgate",
      "--oidc-client-secret-file", "SECRET"], "needs --public-url"),
])
def test_incomplete_oidc_settings_stop_the_relay(tmp_path: Path, args: list[str],
                                                 words: str) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    argv = ["--auth", "oidc", *(str(secret) if a == "SECRET" else a for a in args)]
    with pytest.raises(SystemExit):
        settings_from_args(argv)
    result = subprocess.run([sys.executable, "-m", "vncgate.relay", *argv], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2 and words in result.stderr, result.stderr


def test_oidc_flags_make_the_settings(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    settings = settings_from_args([
        "--listen", "0.0.0.0:8080", "--auth", "oidc", "--public-url", "https://vnc.example.test",
        "--oidc-issuer-url", "https://idp.example.test/realms/lab", "--oidc-client-id", CLIENT,
        "--oidc-client-secret-file", str(secret), "--oidc-username-claim", "email",
        "--oidc-groups-claim", "groups", "--oidc-groups-prefix", "oidc:",
        "--oidc-scope", "groups", "--oidc-bearer-audience", "kubernetes"])
    oidc = settings.auth.oidc
    assert oidc is not None and oidc.client_secret == SECRET
    assert (oidc.user_prefix, oidc.groups_prefix, oidc.bearer_audiences) == (
        "", "oidc:", ("kubernetes",))
    assert oidc.scopes == "openid email profile groups"
    assert oidc.shared_renewals  # with --lease-namespace, one renewal at a time (the default)
    with pytest.raises(SystemExit):
        settings_from_args(["--auth", "token", "--oidc-issuer-url", "https://idp.example.test"])


def test_shared_renewals_can_be_turned_off(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    argv = ["--auth", "oidc", "--public-url", "https://vnc.example.test",
            "--oidc-issuer-url", "https://idp.example.test", "--oidc-client-id", CLIENT,
            "--oidc-client-secret-file", str(secret)]
    off = settings_from_args([*argv, "--no-oidc-shared-renewals"]).auth.oidc
    assert off is not None and not off.shared_renewals
    monkeypatch.setenv("VNCGATE_OIDC_SHARED_RENEWALS", "false")
    by_env = settings_from_args(argv).auth.oidc
    assert by_env is not None and not by_env.shared_renewals


def test_an_entra_id_group_overage_is_refused_not_taken_for_no_groups() -> None:
    overage = {"sub": "x", "_claim_names": {"groups": "src1"},
               "_claim_sources": {"src1": {"endpoint": "https://graph.example.test/"}}}
    settings = OidcSettings(issuer="https://idp.example.test", client_id=CLIENT,
                            groups_claim="groups")
    with pytest.raises(OidcOverage, match="ApplicationGroup"):
        names(overage, settings)
    # Without a groups claim configured, the pointer does not matter.
    assert names(overage, OidcSettings(issuer="https://idp.example.test", client_id=CLIENT,
                                       username_prefix="-")) == ("x", ())


def test_a_sealed_grant_opens_only_with_its_key_and_cookie_id() -> None:
    key, grant = b"k" * 32, {"rt": "a refresh token", "sub": "alice", "n": "n-1"}
    sealed = seal(key, "sid-1", grant)
    assert "a refresh token" not in sealed and unseal(key, "sid-1", sealed) == grant
    assert seal(key, "sid-1", grant) != sealed  # a fresh nonce every time
    assert unseal(b"j" * 32, "sid-1", sealed) is None
    assert unseal(key, "sid-2", sealed) is None
    flipped = sealed[:20] + ("A" if sealed[20] != "A" else "B") + sealed[21:]
    for broken in (flipped, sealed[:-3], sealed[:10], "", "!!not base64!!"):
        assert unseal(key, "sid-1", broken) is None


class AnsweringClient(OidcClient):
    """The real provider's discovery and keys; the token endpoint's answer to a refresh is the
    test's (an ID token signed with the provider's key), to check what the relay makes of it."""

    answer: Tokens

    async def refresh(self, refresh_token: str) -> Tokens:
        assert refresh_token == "rt-1"
        return self.answer


@pytest.mark.parametrize(("change", "refused"), [
    ({}, None),
    ({"nonce": None}, None),  # OpenID Connect Core 12.2: a renewed token need not carry one
    ({"sub": "mallory"}, "another subject"),
    ({"nonce": "n-2"}, "another sign-in's nonce"),
    ({"aud": "another-client"}, "'aud' claim"),
    ({"exp": int(time.time()) - 3600}, "expired"),
    ({"groups": 7}, "'groups' claim"),
])
async def test_a_renewed_id_token_must_be_the_same_sign_ins(
        provider: OidcProvider, change: dict[str, Any], refused: str | None) -> None:
    client = AnsweringClient(settings(provider))
    try:
        client.answer = Tokens(mint(provider.keys[0], claims(provider, **change)), "rt-2")
        grant = RefreshGrant("rt-1", "alice", "n-1")
        if refused is None:
            person, following = await client.renew(grant)
            assert (person.user, person.groups) == ("alice@example.test",
                                                    ("oidc:devs", "oidc:ops"))
            assert following == RefreshGrant("rt-2", "alice", "n-1")
        else:
            with pytest.raises(OidcRefused, match=refused):
                await client.renew(grant)
    finally:
        await client.close()


async def test_a_renewal_without_a_new_refresh_token_keeps_the_old_one(
        provider: OidcProvider) -> None:
    client = AnsweringClient(settings(provider))
    try:
        client.answer = Tokens(mint(provider.keys[0], claims(provider)), None)
        _, following = await client.renew(RefreshGrant("rt-1", "alice", "n-1"))
        assert following.refresh_token == "rt-1"
    finally:
        await client.close()


class CountingClient(AnsweringClient):
    """Counts the refresh token grants it makes, and rotates the refresh token each time."""

    def __init__(self, settings: OidcSettings, token: str) -> None:
        super().__init__(settings)
        self.token, self.sent = token, []

    async def refresh(self, refresh_token: str) -> Tokens:
        self.sent.append(refresh_token)
        await asyncio.sleep(0.05)  # the provider takes a moment: callers arrive meanwhile
        return Tokens(self.token, f"rt-{len(self.sent) + 1}")


async def test_renewals_of_one_sign_in_share_one_call_and_the_newest_refresh_token(
        provider: OidcProvider) -> None:
    token = mint(provider.keys[0], claims(provider))
    client = CountingClient(settings(provider), token)
    renewals = Renewals(client)
    try:
        grant = RefreshGrant("rt-1", "alice", "n-1")
        results = await asyncio.gather(*(renewals.renew("sid-1", grant, time.time() + 3600)
                                         for _ in range(5)))
        assert client.sent == ["rt-1"]  # five callers, one call to the provider
        assert {following.refresh_token for _, following in results} == {"rt-2"}
        # While the renewed ID token lasts, no call at all.
        await renewals.renew("sid-1", grant, time.time() + 3600)
        assert client.sent == ["rt-1"]
        # Once it has expired, the next renewal sends the newest refresh token this replica
        # holds, even when the caller still has the one it replaced.
        client.token = mint(provider.keys[0], claims(provider, exp=int(time.time()) + 300))
        renewals._latest["sid-1"] = dataclasses.replace(
            renewals._latest["sid-1"], person=dataclasses.replace(
                renewals._latest["sid-1"].person, expires=time.time() - 1))
        await renewals.renew("sid-1", grant, time.time() + 3600)
        assert client.sent == ["rt-1", "rt-2"]
        # Another sign-in is its own.
        await renewals.renew("sid-2", RefreshGrant("rt-9", "alice", "n-1"), time.time() + 3600)
        assert client.sent == ["rt-1", "rt-2", "rt-9"]
    finally:
        await client.close()
