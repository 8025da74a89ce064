"""Where the relay gets what it answers a VNC server's security with, at each session's start.

Read per session, never cached: a rotated Secret, file or variable takes effect for the next
session without a restart, and a password lives in the relay only while a login runs.

- In a cluster, `spec.credentials.secretName` and `spec.tls.caSecret` / `caConfigMap` name
  objects in the target's namespace. The relay reads them itself with its ServiceAccount, over
  the API server's TLS connection (so the password never crosses the network in the clear; the
  registration API carries only the names). It may read them only where the namespace opted in
  with a RoleBinding to the chart's ClusterRole `<release>-relay-credentials`
  (docs/KUBERNETES.md). Nothing grants the relay Secrets cluster-wide. A credentials Secret must
  also consent (`check_consent`): type `vncgate.io/credentials`, or the annotation
  `vncgate.io/allowed-targets` naming the target. CA Secrets need no consent: a CA certificate
  is public, and the relay only verifies with it.
- Standalone, the manifests (written by the relay's own admin) give `passwordFile` /
  `passwordEnv` and `caFile`; the registration API refuses those (relay.model).
"""

from __future__ import annotations

import base64
import binascii
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vncgate.common.kube import KubeClient, KubeConfigError, KubeError, kube_connection
from vncgate.common.model import (
    LOGIN_FORBIDDEN,
    LOGIN_HELD,
    LOGIN_OK,
    LOGIN_REFUSED,
    LOGIN_UNREADABLE,
    LoginOutcome,
    Route,
)
from vncgate.relay import closecodes
from vncgate.relay.rfb.security import SecurityRefused, UpstreamLogin
from vncgate.relay.settings import RelaySettings

# A Secret's consent to be used as a VNC credential (check_consent).
CREDENTIALS_TYPE = "vncgate.io/credentials"
ALLOWED_TARGETS = "vncgate.io/allowed-targets"


def _read_text(path: str) -> str:
    # A small local file (a mounted Secret): reading it does not hold up the event loop.
    return Path(path).read_text(encoding="utf-8")


def _refused(reason: str, *, forbidden: bool = False) -> SecurityRefused:
    return SecurityRefused(closecodes.CREDENTIAL_REFUSED, reason, forbidden=forbidden)


def check_consent(route: Route, name: str, secret: dict[str, Any]) -> None:
    """A Secret gives the relay its password only if it says it is for VNC: its type is
    `vncgate.io/credentials`, or its annotation `vncgate.io/allowed-targets` lists this target
    (comma-separated names of VncTargets in its namespace) or is `*`.

    The second lock beside the admission webhook: it holds for VncTargets written before the
    webhook, or past it, and it is the Secret's owner who decides, not the target's author."""
    if secret.get("type") == CREDENTIALS_TYPE:
        return
    meta = secret.get("metadata")
    annotations = meta.get("annotations") if isinstance(meta, dict) else None
    allowed = annotations.get(ALLOWED_TARGETS) if isinstance(annotations, dict) else None
    names = {n.strip() for n in str(allowed or "").split(",") if n.strip()}
    if "*" in names or route.name in names:
        return
    # Short, the fix first: a close frame holds 123 bytes.
    raise _refused(f"Secret {route.namespace}/{name} is not for VNC: annotate it "
                   f"{ALLOWED_TARGETS}={route.name}")


class CredentialStore:
    """Builds an `UpstreamLogin` for a route; talks to the API server only for Secret routes."""

    def __init__(self, settings: RelaySettings,
                 kube: Callable[[], KubeClient] | None = None) -> None:
        self._settings = settings
        # Makes the client on first use (the relay's shares its pool: relay.state.RelayKube).
        self._make_kube = kube or (lambda: KubeClient(kube_connection(settings.kubeconfig)))
        self._kube: KubeClient | None = None
        # The last login per route (at most one entry per route: dropped when the route goes
        # or changes), reported in the table summary that the operator polls.
        self.outcomes: dict[str, LoginOutcome] = {}

    def logged_in(self, key: str) -> None:
        self.outcomes[key] = LoginOutcome(LOGIN_OK, time.time())

    def login_failed(self, key: str, refused: SecurityRefused) -> None:
        """Record a failed login if it was about the credential: the server refused it, or
        the relay could not read it. (An unreachable server is the probe's business.)"""
        if refused.credential_refused:
            result = LOGIN_REFUSED
        elif refused.forbidden:
            result = LOGIN_FORBIDDEN
        elif refused.code == closecodes.CREDENTIAL_REFUSED:
            result = LOGIN_UNREADABLE
        else:
            return
        self.outcomes[key] = LoginOutcome(result, time.time(), refused.reason)

    def console_held(self, key: str, reason: str) -> None:
        """KubeVirt kept the VM's console for another client (preserveSession): status says
        so until a later session opens it."""
        self.outcomes[key] = LoginOutcome(LOGIN_HELD, time.time(), reason)

    def forget(self, key: str) -> None:
        self.outcomes.pop(key, None)

    async def close(self) -> None:
        if self._kube is not None:
            await self._kube.close()
            self._kube = None

    def _client(self) -> KubeClient:
        if self._kube is None:
            try:
                self._kube = self._make_kube()
            except KubeConfigError as exc:
                raise _refused("this relay has no Kubernetes credentials to read the target's "
                               f"Secret ({exc}); run it in the cluster or with --kubeconfig"
                               ) from None
        return self._kube

    async def _object_data(self, route: Route, kind: str, name: str) -> dict[str, Any]:
        data = (await self._object(route, kind, name)).get("data")
        return data if isinstance(data, dict) else {}

    async def _object(self, route: Route, kind: str, name: str) -> dict[str, Any]:
        resource = "secrets" if kind == "Secret" else "configmaps"
        try:
            body = await self._client().request(
                "GET", f"/api/v1/namespaces/{route.namespace}/{resource}/{name}")
        except KubeError as exc:
            if exc.status == 403:
                # Short: it must fit a close frame (123 bytes) with the names.
                # (what to do first: a close frame clips long names at the end)
                raise _refused(
                    f"needs a RoleBinding to ClusterRole {self._settings.roles.credentials}: "
                    f"the relay may not read {kind} {route.namespace}/{name}",
                    forbidden=True) from None
            if exc.status == 404:
                raise _refused(f"{kind} {route.namespace}/{name} does not exist") from None
            if exc.status == 429 or exc.status >= 500:
                # The API server is busy or failing: nothing is wrong with the credential, and
                # no login was tried, so the viewer may ask again (4503, not the final 4424).
                raise SecurityRefused(closecodes.UNAVAILABLE,
                                      f"try again in a moment: reading {kind} "
                                      f"{route.namespace}/{name} failed: HTTP {exc.status}"
                                      ) from None
            raise _refused(f"reading {kind} {route.namespace}/{name} failed: "
                           f"HTTP {exc.status}") from None
        except OSError as exc:  # refused, reset, timed out (TimeoutError is an OSError)
            raise SecurityRefused(closecodes.UNAVAILABLE,
                                  "try again in a moment: the Kubernetes API cannot be reached "
                                  f"({str(exc) or type(exc).__name__})") from None
        return body if isinstance(body, dict) else {}

    async def _secret_value(self, route: Route, name: str, key: str,
                            required: bool = True) -> str | None:
        return self._decoded(route, name, await self._object_data(route, "Secret", name), key,
                             required)

    @staticmethod
    def _decoded(route: Route, name: str, data: dict[str, Any], key: str,
                 required: bool = True) -> str | None:
        raw = data.get(key)
        if raw is None:
            if required:
                raise _refused(f"Secret {route.namespace}/{name} has no key {key}")
            return None
        try:
            return base64.b64decode(str(raw), validate=True).decode("utf-8").rstrip("\r\n")
        except (binascii.Error, UnicodeDecodeError):
            raise _refused(f"Secret {route.namespace}/{name}: key {key} is not "
                           "UTF-8 text") from None

    async def login_for(self, route: Route) -> UpstreamLogin:
        password: str | None = None
        username: str | None = None
        creds = route.credentials
        if creds is not None:
            username = creds.username
            if creds.secret_name is not None:
                secret = await self._object(route, "Secret", creds.secret_name)
                check_consent(route, creds.secret_name, secret)
                data = secret.get("data")
                data = data if isinstance(data, dict) else {}
                password = self._decoded(route, creds.secret_name, data, "password")
                username = self._decoded(route, creds.secret_name, data, "username",
                                         required=False)
            elif creds.password_file is not None:
                try:
                    password = _read_text(creds.password_file).rstrip("\r\n")
                except (OSError, UnicodeDecodeError) as exc:
                    raise _refused(f"cannot read the password file of {route.key}: "
                                   f"{getattr(exc, 'strerror', None) or exc}") from None
            elif creds.password_env is not None:
                password = os.environ.get(creds.password_env)
                if password is None:
                    raise _refused(f"the relay's environment has no {creds.password_env} "
                                   f"(the password of {route.key})")
        tls = route.tls
        if tls is None:
            return UpstreamLogin(password=password, username=username)
        context = await self._tls_context(route)
        return UpstreamLogin(password=password, username=username, tls=context,
                             server_name=tls.server_name or route.host or route.kubevirt,
                             insecure=tls.insecure_skip_verify)

    async def _tls_context(self, route: Route) -> ssl.SSLContext:
        tls = route.tls
        assert tls is not None
        if tls.insecure_skip_verify:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        pem: str | None = None
        if tls.ca_file is not None:
            try:
                pem = _read_text(tls.ca_file)
            except (OSError, UnicodeDecodeError) as exc:
                raise _refused(f"cannot read the CA file of {route.key}: "
                               f"{getattr(exc, 'strerror', None) or exc}") from None
        elif tls.ca_secret is not None:
            pem = await self._secret_value(route, tls.ca_secret.name, tls.ca_secret.key)
        elif tls.ca_config_map is not None:
            ref = tls.ca_config_map
            value = (await self._object_data(route, "ConfigMap", ref.name)).get(ref.key)
            if not isinstance(value, str):
                raise _refused(f"ConfigMap {route.namespace}/{ref.name} has no key {ref.key}")
            pem = value
        try:
            # No CA given: the system's trust store, as for any TLS client.
            return ssl.create_default_context(cadata=pem) if pem else ssl.create_default_context()
        except ssl.SSLError:
            raise _refused(f"the CA of {route.key} is not a PEM certificate") from None
