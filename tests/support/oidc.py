"""A real OpenID provider for tests: panva's `oidc-provider` under Node
(tests/support/oidcprovider.mjs) on https://127.0.0.1:PORT, with a certificate from a test CA,
and the clients, accounts and signing keys the test gives. `rotate_keys()` makes the provider
sign with a new key from then on; `remove_account()` disables a person (their sign-ins can no
longer be renewed).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import aiohttp
import pytest
from joserfc.jwk import RSAKey

from harness import reaper
from harness.certs import Pem, make_ca, make_server_cert
from harness.cluster import free_port
from harness.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "support" / "oidcprovider.mjs"
PACKAGE = ROOT / "node_modules" / "oidc-provider"


def signing_key(kid: str) -> dict[str, Any]:
    key = RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig", "alg": "RS256"})
    return key.as_dict(private=True)


@dataclass
class Account:
    password: str
    claims: dict[str, Any] = field(default_factory=dict)


@dataclass
class OidcProvider:
    directory: Path
    clients: list[dict[str, Any]]
    accounts: dict[str, Account]
    id_token_ttl: int = 3600
    # Refresh tokens for clients allowed the refresh_token grant; rotated on every use.
    refresh_tokens: bool = False
    rotate_refresh_tokens: bool = False
    port: int = 0
    ca: Pem | None = None
    keys: list[dict[str, Any]] = field(default_factory=list)
    process: subprocess.Popen[str] | None = None
    _reloads: int = 0

    @property
    def issuer(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.directory / "provider.json"

    def _write_config(self) -> None:
        assert self.ca is not None
        tls = self.directory / "tls"
        self.config_path.write_text(json.dumps({
            "port": self.port, "issuer": self.issuer, "cert": str(tls / "tls.crt"),
            "key": str(tls / "tls.key"), "keys": self.keys, "clients": self.clients,
            "idTokenTTL": self.id_token_ttl, "refreshTokens": self.refresh_tokens,
            "rotateRefreshTokens": self.rotate_refresh_tokens,
            "accounts": {name: {"password": a.password, "claims": a.claims}
                         for name, a in self.accounts.items()}}))

    def start(self) -> OidcProvider:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca = make_ca(self.directory / "ca")
        make_server_cert(self.ca, self.directory / "tls", "oidc provider")
        self.port = free_port()
        self.keys = [signing_key("key-1")]
        self._write_config()
        self.log = (self.directory / "provider.log").open("w")
        self.process = reaper.popen(["node", SCRIPT, self.config_path], cwd=ROOT,
                                    stdout=self.log, stderr=subprocess.STDOUT, text=True)
        wait_until(lambda: "ready" in self.output() or self.process.poll() is not None,  # type: ignore[union-attr]
                   "the OpenID provider to listen", timeout=60)
        if self.process.poll() is not None:
            raise RuntimeError(f"the OpenID provider exited: {self.output()}")
        return self

    def output(self) -> str:
        return (self.directory / "provider.log").read_text()

    def rotate_keys(self, kid: str) -> None:
        """Sign with a new key from now on; the old one is no longer published."""
        self.keys = [signing_key(kid)]
        self.reload()

    def remove_account(self, name: str) -> None:
        """The person is gone at the provider (disabled, deleted): refresh tokens of their
        sign-ins are refused from now on."""
        del self.accounts[name]
        self.reload()

    def reload(self) -> None:
        """Write the configuration and make the provider take it (SIGHUP)."""
        assert self.process is not None
        self._write_config()
        self._reloads += 1
        self.process.send_signal(signal.SIGHUP)
        wait_until(lambda: self.output().count("reloaded") >= self._reloads,
                   "the OpenID provider to take its new keys", timeout=30)

    def stop(self) -> None:
        if self.process is not None:
            reaper.end(self.process)
            self.process = None
            self.log.close()


def need_provider() -> None:
    if shutil.which("node") is None or not PACKAGE.is_dir():
        pytest.skip("the OpenID provider needs node and node_modules/oidc-provider: run "
                    "scripts/setup")


async def kubelogin_token(http: aiohttp.ClientSession, provider: OidcProvider, client_id: str,
                          login: str, password: str) -> str:
    """What kubelogin does: the code flow with PKCE for a public client (`client_id`, with the
    redirect URI http://127.0.0.1:8000), as a person signing in at the provider's login page;
    the ID token it hands to kubectl. `http` keeps cookies and trusts the provider's CA."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(
        hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    redirect = "http://127.0.0.1:8000"
    query = urlencode({"client_id": client_id, "response_type": "code",
                       "scope": "openid email groups", "redirect_uri": redirect,
                       "code_challenge": challenge, "code_challenge_method": "S256",
                       "state": "s", "nonce": "n"})
    async with http.get(f"{provider.issuer}/auth?{query}") as page:
        interaction = str(page.url)
    # Follow the provider's redirects by hand: the last one goes to kubelogin's own loopback
    # listener (not running here), and carries the code.
    async with http.post(interaction, data={"login": login, "password": password},
                         allow_redirects=False) as answer:
        location = answer.headers.get("Location", "")
    for _ in range(10):
        if location.startswith(redirect):
            break
        async with http.get(urljoin(provider.issuer, location),
                            allow_redirects=False) as answer:
            location = answer.headers.get("Location", "")
    assert location.startswith(redirect), location
    code = parse_qs(urlsplit(location).query)["code"][0]
    async with http.post(f"{provider.issuer}/token", data={
            "grant_type": "authorization_code", "code": code, "redirect_uri": redirect,
            "client_id": client_id, "code_verifier": verifier}) as tokens:
        body = await tokens.json()
    return str(body["id_token"])
