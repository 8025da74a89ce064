"""The user's kubeconfig: the API server's address and credentials, the namespace, the token.

`kubernetes_asyncio` reads the kubeconfig as kubectl does: `--kubeconfig`, else $KUBECONFIG
(a list of files, merged), else ~/.kube/config; the current context unless `--context`. An exec
credential plugin (kubelogin, aws eks get-token, gke-gcloud-auth-plugin) or an OIDC provider in
it is run by that package, as kubectl runs it, and gives a bearer token; an expired one is
fetched again before the next request. It is the asyncio sibling of the `kubernetes` package the
server uses, chosen here because it and its dependencies are pure Python: the plugin ships as
one zipapp for Linux and macOS (packaging/kubectl/).

The relay accepts only bearer tokens: a kubeconfig that signs in with a client certificate
has none, and the plugin says how to get one (NoToken).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vncgate.common.kubetls import KubeConfigError, ssl_context_for


class NoToken(Exception):
    """The relay needs a bearer token and the kubeconfig has none; the message says how."""


@dataclass(frozen=True)
class Connection:
    """The API server of the chosen context, and how to sign requests to it."""

    server: str
    ssl_context: ssl.SSLContext | bool
    configuration: Any  # kubernetes_asyncio.client.Configuration, with the loader's refresh hook

    async def headers(self) -> dict[str, str]:
        # The hook runs first: an exec plugin's or OIDC token that expired is fetched again.
        try:
            token = await self.configuration.get_api_key_with_prefix("BearerToken")
        except Exception as exc:  # an exec plugin that fails, an OIDC refresh refused
            raise KubeConfigError(f"cannot get credentials: {exc}") from None
        return {"Authorization": token} if token else {}


@dataclass(frozen=True)
class UserConfig:
    connection: Connection
    namespace: str
    context: str
    token_flag: str | None = None

    async def bearer(self) -> str:
        """`Authorization` for the relay: `--token`, or the kubeconfig's (refreshed) token."""
        if self.token_flag:
            return f"Bearer {self.token_flag}"
        header = (await self.connection.headers()).get("Authorization")
        if header and header.lower().startswith("bearer "):
            return header
        raise NoToken(
            f"the kubeconfig's context {self.context!r} has no token (it signs in with a client "
            "certificate, which only the API server can check); the relay needs a bearer token. "
            "Get one and pass it with --token, e.g. "
            "--token \"$(kubectl create token NAME -n NAMESPACE)\" for a ServiceAccount, or use a "
            "kubeconfig with an OIDC exec plugin (kubelogin), which kubectl vnc runs as kubectl "
            "does")


def kubeconfig_path(flag: str | None) -> Path:
    value = flag or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    return Path(value)


def _check_exists(path: Path) -> None:
    """The loader only logs a missing file, then fails on its emptiness; say it plainly."""
    files = [Path(part).expanduser() for part in str(path).split(os.pathsep) if part]
    if not any(file.is_file() for file in files):
        raise KubeConfigError("no such file: give --kubeconfig, set KUBECONFIG, or write "
                              "~/.kube/config (kubectl config view shows what kubectl uses)")


async def load(flag: str | None, context: str | None, namespace: str | None,
               token: str | None = None) -> UserConfig:
    """The user's configuration; KubeConfigError says what is wrong with the kubeconfig."""
    # Imported when a command runs: the client's generated models take a while to import.
    from kubernetes_asyncio.client import Configuration
    from kubernetes_asyncio.config import ConfigException, kube_config

    path = kubeconfig_path(flag)
    _check_exists(path)
    configuration = Configuration()
    try:
        loader = await kube_config.load_kube_config(
            config_file=str(path), context=context, client_configuration=configuration)
        chosen = loader.current_context or {}
    except (ConfigException, OSError, ValueError, TypeError, KeyError, AssertionError) as exc:
        # AssertionError: the loader asserts that the named context and cluster exist.
        raise KubeConfigError(str(exc) or f"no context {context!r} or its cluster in the "
                              "kubeconfig") from None

    async def refresh(target: Any) -> None:
        await loader.load_and_set(target)

    configuration.refresh_api_key_hook = refresh
    host = configuration.host or ""
    if not host.startswith(("https://", "http://")):
        raise KubeConfigError(f"the context's cluster has no usable server URL ({host!r})")
    connection = Connection(server=host.rstrip("/"),
                            ssl_context=ssl_context_for(configuration),
                            configuration=configuration)
    default_ns = (chosen.get("context") or {}).get("namespace") or "default"
    return UserConfig(connection=connection, namespace=namespace or default_ns,
                      context=str(chosen.get("name", "")), token_flag=token)
