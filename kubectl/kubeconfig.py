"""The user's kubeconfig: the API server's address and credentials, the namespace, the token.

The `kubernetes` package reads the kubeconfig as kubectl does: `--kubeconfig`, else $KUBECONFIG
(a list of files, merged), else ~/.kube/config; the current context unless `--context`. An exec
credential plugin (kubelogin, aws eks get-token, gke-gcloud-auth-plugin) or an OIDC provider in
it is run by that package, as kubectl runs it, and gives a bearer token.

The relay accepts only bearer tokens: a kubeconfig that signs in with a client certificate
has none, and the plugin says how to get one (NoToken).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vncgate.common.kube import KubeConfigError, KubeConnection, kube_connection


class NoToken(Exception):
    """The relay needs a bearer token and the kubeconfig has none; the message says how."""


@dataclass(frozen=True)
class UserConfig:
    connection: KubeConnection
    namespace: str
    context: str
    token_flag: str | None = None

    def bearer(self) -> str:
        """`Authorization` for the relay: `--token`, or the kubeconfig's (refreshed) token."""
        if self.token_flag:
            return f"Bearer {self.token_flag}"
        header = self.connection.headers().get("Authorization")
        if header:
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


def load(flag: str | None, context: str | None, namespace: str | None,
         token: str | None = None) -> UserConfig:
    """The user's configuration; KubeConfigError says what is wrong with the kubeconfig."""
    from kubernetes import config  # heavy; imported when a command runs

    path = kubeconfig_path(flag)
    connection = kube_connection(path, context)
    try:
        contexts, active = config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
            config_file=str(path))
    except Exception as exc:  # the loader above read it already; this is belt and braces
        raise KubeConfigError(str(exc)) from None
    chosen = next((c for c in contexts if c.get("name") == context), None) if context \
        else active
    chosen = chosen or {}
    default_ns = (chosen.get("context") or {}).get("namespace") or "default"
    return UserConfig(connection=connection, namespace=namespace or default_ns,
                      context=str(chosen.get("name", "")), token_flag=token)
