"""What a kubeconfig gives an aiohttp client, whichever Kubernetes library read it: the TLS
context, and the error that says the kubeconfig cannot be used. Kept apart from `kube` so that
the kubectl plugin, which reads kubeconfigs with `kubernetes_asyncio`, never imports the server's
`kubernetes` package."""

from __future__ import annotations

import ssl
from typing import Any


class KubeConfigError(Exception):
    """No usable credentials for the Kubernetes API (no kubeconfig, not in a pod)."""


def ssl_context_for(configuration: Any) -> ssl.SSLContext | bool:
    """TLS for aiohttp from a client Configuration of `kubernetes` or `kubernetes_asyncio` (both
    name the kubeconfig's CA, client certificate and insecure-skip-tls-verify the same way)."""
    if not configuration.host.startswith("https"):
        return False
    if configuration.verify_ssl:
        context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
    else:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file)
    return context
