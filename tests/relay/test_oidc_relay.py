"""A relay in `--auth oidc` mode against a real OpenID provider (oidc-provider under Node), over
HTTP without a browser: the code flow's state and cookie checks, the session's lifetime, bearer
ID tokens (kubectl vnc with an exec credential plugin, as kubelogin), the sign-in page's parts.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import pytest
import yaml

from harness.cluster import free_port
from harness.servers import GREETING, TcpServer
from tests.conftest import RelayFactory
from tests.relay.test_oidc import mint
from tests.support.oidc import Account, OidcProvider, kubelogin_token, need_provider
from tests.support.processes import ConsoleScript
from vncgate.common.addresses import Address
from vncgate.common.model import Route
from vncgate.common.spec import Access
from vncgate.relay.access.identity import AuthMode
from vncgate.relay.access.oidc import OidcSettings
from vncgate.relay.access.passwords import hash_secret
from vncgate.relay.access.users import User
from vncgate.relay.settings import AuthSettings

CLIENT, SECRET = "vncgate", "the relay's client secret"
KUBECTL_CLIENT = "kubernetes"  # the public client kubelogin signs in with
PASSWORD = "alice's provider password"
ID_TOKEN_TTL = 120
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def relay_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory, relay_port: int
             ) -> Iterator[OidcProvider]:
    need_provider()
    relay = f"http://127.0.0.1:{relay_port}"
    server = OidcProvider(tmp_path_factory.mktemp("oidc"), clients=[
        {"client_id": CLIENT, "client_secret": SECRET,
         "redirect_uris": [f"{relay}/login/oidc/callback"],
         "post_logout_redirect_uris": [f"{relay}/"]},
        {"client_id": KUBECTL_CLIENT, "token_endpoint_auth_method": "none",
         "redirect_uris": ["http://127.0.0.1:8000"]}],
        accounts={"alice": Account(PASSWORD, {"email": "alice@example.test",
                                              "groups": ["devs"]}),
                  "nameless": Account(PASSWORD, {"groups": ["devs"]}),
                  # Entra ID's group overage: the groups are elsewhere (a distributed claim).
                  "crowded": Account(PASSWORD, {
                      "email": "crowded@example.test",
                      "_claim_names": {"groups": "src1"},
                      "_claim_sources": {"src1": {
                          "endpoint": "https://graph.example.test/v1.0/users/1/getMemberObjects"
                      }}})},
        id_token_ttl=ID_TOKEN_TTL)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def oidc_auth(provider: OidcProvider, relay_port: int, **overrides: Any) -> AuthSettings:
    assert provider.ca is not None
    oidc = OidcSettings(issuer=provider.issuer, client_id=CLIENT, client_secret=SECRET,
                        ca_file=provider.ca.cert, username_claim="email",
                        groups_claim="groups", groups_prefix="oidc:", extra_scopes=("groups",),
                        bearer_audiences=(KUBECTL_CLIENT,))
    values: dict[str, Any] = {"mode": AuthMode.OIDC, "session_secret": b"s" * 32,
                              "public_url": f"http://127.0.0.1:{relay_port}", "oidc": oidc}
    values.update(overrides)
    return AuthSettings(**values)


ROUTES = [Route("lab", "mine", "127.0.0.1", 5999, access=Access(groups=("oidc:devs",)))]


@pytest.fixture
async def browser_like(provider: OidcProvider) -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client that keeps cookies (of IP-address hosts too) and trusts the test CA."""
    assert provider.ca is not None
    context = ssl.create_default_context(cafile=str(provider.ca.cert))
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     connector=aiohttp.TCPConnector(ssl=context)) as session:
        yield session


async def provider_login(http: aiohttp.ClientSession, start_url: str, login: str = "alice"
                         ) -> tuple[list[aiohttp.ClientResponse], aiohttp.ClientResponse]:
    """Follow a sign-in from `start_url` to the provider's login page, sign in, and follow the
    redirects back: the responses on the way, and the last one."""
    async with http.get(start_url) as page:
        assert "/interaction/" in str(page.url), await page.text()
        interaction, before = str(page.url), list(page.history)
    async with http.post(interaction, data={"login": login, "password": PASSWORD}) as done:
        await done.read()
        return [*before, *done.history], done


async def test_the_code_flow_signs_in_for_no_longer_than_the_id_token(
        make_relay: RelayFactory, provider: OidcProvider, relay_port: int,
        browser_like: aiohttp.ClientSession) -> None:
    async with make_relay(routes=ROUTES, auth=oidc_auth(provider, relay_port),
                          listen=Address("127.0.0.1", relay_port)) as relay:
        hops, done = await provider_login(browser_like, f"{relay.public_url}/login/oidc?next=./")
        assert str(done.url) == f"{relay.public_url}/", hops
        callback = next(r for r in hops if r.url.path == "/login/oidc/callback")
        cookie = callback.cookies["vncgate_session"]
        # The session lasts as long as the ID token (120 s), not the relay's 8 h default.
        assert 0 < int(cookie["max-age"]) <= ID_TOKEN_TTL
        # The first sign-in request went to the provider's /auth with an S256 PKCE challenge.
        authorize = parse_qs(next(r for r in hops if r.url.path == "/auth").url.query_string)
        assert authorize["code_challenge_method"] == ["S256"]
        assert authorize["nonce"] and authorize["state"]
        async with browser_like.get(f"{relay.public_url}/") as listing:
            text = await listing.text()
        assert listing.status == 200 and "alice@example.test" in text and "lab/mine" in text


async def test_a_callback_without_the_browsers_state_is_refused(
        make_relay: RelayFactory, provider: OidcProvider, relay_port: int,
        browser_like: aiohttp.ClientSession) -> None:
    async with make_relay(routes=ROUTES, auth=oidc_auth(provider, relay_port),
                          listen=Address("127.0.0.1", relay_port)) as relay:
        callback = f"{relay.public_url}/login/oidc/callback"
        # No sign-in was started by this browser (a code pushed from elsewhere: login CSRF).
        async with browser_like.get(f"{callback}?code=stolen&state=guess") as answer:
            assert answer.status == 400
            assert "not started here" in await answer.text()
        # One was, but the answer carries another state.
        async with browser_like.get(f"{relay.public_url}/login/oidc",
                                    allow_redirects=False) as started:
            assert started.status == 303
            assert started.headers["Location"].startswith(provider.issuer)
        async with browser_like.get(f"{callback}?code=stolen&state=guess") as answer:
            assert answer.status == 400
            assert "not for the sign-in this browser started" in await answer.text()
        assert "vncgate_session" not in {c.key for c in browser_like.cookie_jar}


async def test_a_person_without_the_username_claim_is_refused_naming_it(
        make_relay: RelayFactory, provider: OidcProvider, relay_port: int,
        browser_like: aiohttp.ClientSession) -> None:
    async with make_relay(routes=ROUTES, auth=oidc_auth(provider, relay_port),
                          listen=Address("127.0.0.1", relay_port)) as relay:
        _, done = await provider_login(browser_like, f"{relay.public_url}/login/oidc",
                                       login="nameless")
        assert done.status == 403
        assert "no &#39;email&#39; claim" in await done.text()
        assert "vncgate_session" not in {c.key for c in browser_like.cookie_jar}


async def test_a_group_overage_refuses_the_sign_in_naming_it(
        make_relay: RelayFactory, provider: OidcProvider, relay_port: int,
        browser_like: aiohttp.ClientSession) -> None:
    async with make_relay(routes=ROUTES, auth=oidc_auth(provider, relay_port),
                          listen=Address("127.0.0.1", relay_port)) as relay:
        _, done = await provider_login(browser_like, f"{relay.public_url}/login/oidc",
                                       login="crowded")
        text = await done.text()
        assert done.status == 403, text
        assert "group overage" in text and "ApplicationGroup" in text
        assert "vncgate_session" not in {c.key for c in browser_like.cookie_jar}


async def test_the_sign_in_page_offers_the_form_only_with_a_users_file(
        make_relay: RelayFactory, provider: OidcProvider, relay_port: int,
        http: aiohttp.ClientSession) -> None:
    async with make_relay(routes=ROUTES, auth=oidc_auth(provider, relay_port),
                          listen=Address("127.0.0.1", relay_port)) as relay:
        async with http.get(f"{relay.public_url}/login") as page:
            text = await page.text()
        assert 'id="provider"' in text and 'class="login"' not in text
        async with http.post(f"{relay.public_url}/login", data={}) as refused:
            assert refused.status == 404
    users = {"bob": User("bob", hash_secret("bob's password"))}
    async with make_relay(routes=ROUTES, auth=oidc_auth(provider, relay_port, users=users),
                          listen=Address("127.0.0.1", relay_port)) as relay:
        async with http.get(f"{relay.public_url}/login") as page:
            text = await page.text()
        assert 'id="provider"' in text and 'class="login"' in text


# -- bearer ID tokens: kubectl vnc with kubelogin --------------------------------------------------

def exec_kubeconfig(directory: Path, token: str) -> Path:
    credential = json.dumps({"apiVersion": "client.authentication.k8s.io/v1",
                             "kind": "ExecCredential", "status": {"token": token}})
    plugin = directory / "kubelogin"
    plugin.write_text(f"#!/bin/sh\ncat <<'EOF'\n{credential}\nEOF\n")
    plugin.chmod(0o755)
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "lab",
              "clusters": [{"name": "lab", "cluster": {"server": "https://127.0.0.1:1"}}],
              "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "alice",
                                                       "namespace": "lab"}}],
              "users": [{"name": "alice", "user": {"exec": {
                  "apiVersion": "client.authentication.k8s.io/v1", "command": str(plugin),
                  "interactiveMode": "Never"}}}]}
    path = directory / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def kubectl_vnc(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VNCGATE_")}
    env["KUBECONFIG"] = str(kubeconfig)
    return subprocess.run([str(BIN / "kubectl-vnc"), *args], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def kubectl_vnc_proxy(tmp_path: Path, kubeconfig: Path, relay_url: str
                      ) -> tuple[ConsoleScript, int]:
    script = ConsoleScript("kubectl-vnc", ["proxy", "mine", "--port", "0", "--relay-url",
                                           relay_url], tmp_path,
                           env={"KUBECONFIG": str(kubeconfig)})
    script.start()
    found = script.wait_for_log(r"Forwarding 127\.0\.0\.1:(\d+) ->")
    return script, int(found.group(1))


def first_bytes(port: int) -> bytes:
    """What a native viewer on the proxy's port is sent first (b"" when the relay refused)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.settimeout(60)
        return sock.recv(12)


async def test_kubectl_vnc_with_an_exec_plugin_id_token(
        make_relay: RelayFactory, provider: OidcProvider, relay_port: int, tmp_path: Path,
        browser_like: aiohttp.ClientSession, backend: TcpServer) -> None:
    token = await kubelogin_token(browser_like, provider, KUBECTL_CLIENT, "alice", PASSWORD)
    kubeconfig = exec_kubeconfig(tmp_path, token)
    routes = [Route("lab", "mine", "127.0.0.1", backend.port,
                    access=Access(groups=("oidc:devs",)))]
    async with make_relay(routes=routes, auth=oidc_auth(provider, relay_port),
                          listen=Address("127.0.0.1", relay_port)) as relay:
        # `kubectl vnc proxy`: the relay takes the exec plugin's ID token as alice, whose
        # prefixed group may open lab/mine, and the VNC server's greeting comes through.
        # (In a thread: the proxy asks the relay, which runs in this event loop, at its start.)
        script, port = await _in_thread(kubectl_vnc_proxy, tmp_path, kubeconfig,
                                        relay.public_url)
        with script:
            assert await _in_thread(first_bytes, port) == GREETING
        async with browser_like.get(f"{relay.public_url}/",
                                    headers={"Authorization": f"Bearer {token}"}) as answer:
            assert answer.status == 200 and "alice@example.test" in await answer.text()
        # Signed in but without the `sessions` right (manifest authorization): 403, not 401.
        result = await _in_thread(kubectl_vnc, kubeconfig, "sessions", "--relay-url",
                                  relay.public_url)
        assert "(403)" in result.stderr, result.stderr
        header, payload, signature = token.split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        claims["email"] = "mallory@example.test"
        forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
        tampered = f"{header}.{forged_payload.decode()}.{signature}"
        result = await _in_thread(kubectl_vnc, exec_kubeconfig(tmp_path, tampered), "sessions",
                                  "--relay-url", relay.public_url)
        assert result.returncode != 0 and "(401)" in result.stderr, result.stderr
    # A relay that does not take the kubectl client's ID tokens: the plugin does not send the
    # token, and says which tokens the relay takes.
    narrow = oidc_auth(provider, relay_port)
    assert narrow.oidc is not None
    narrow = oidc_auth(provider, relay_port, oidc=OidcSettings(
        **{**narrow.oidc.__dict__, "bearer_audiences": ()}))
    async with make_relay(routes=routes, auth=narrow,
                          listen=Address("127.0.0.1", relay_port)) as relay:
        result = await _in_thread(kubectl_vnc, kubeconfig, "sessions", "--relay-url",
                                  relay.public_url)
        assert result.returncode != 0, result.stderr
        assert "for the clients vncgate, and your kubeconfig's token is not one" in \
            result.stderr


async def test_bearer_tokens_follow_a_key_rotation(
        make_relay: RelayFactory, provider: OidcProvider, relay_port: int,
        http: aiohttp.ClientSession) -> None:
    now = int(time.time())
    claims = {"iss": provider.issuer, "aud": CLIENT, "sub": "alice", "iat": now,
              "exp": now + 300, "email": "alice@example.test", "groups": ["devs"]}
    async with make_relay(routes=ROUTES, auth=oidc_auth(provider, relay_port),
                          listen=Address("127.0.0.1", relay_port)) as relay:
        url = f"{relay.public_url}/"  # the list: 200 signed in, else 302 to the sign-in page

        async def status(token: str) -> int:
            async with http.get(url, headers={"Authorization": f"Bearer {token}"},
                                allow_redirects=False) as answer:
                return answer.status

        assert await status(mint(provider.keys[0], claims)) == 200
        provider.rotate_keys(f"key-{secrets.token_hex(4)}")
        assert await status(mint(provider.keys[0], claims)) == 200
        expired = mint(provider.keys[0], {**claims, "exp": now - 3600, "iat": now - 7200})
        assert await status(expired) == 302


async def _in_thread(function: Any, *args: Any) -> Any:
    return await asyncio.to_thread(function, *args)

