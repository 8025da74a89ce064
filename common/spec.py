"""The `VncTarget` resource as both the relay (standalone manifests) and the operator read it.

One parser for the spec, so a manifest means the same thing with and without a cluster. It checks
what the CRD schema also checks (the relay reads files that no API server has validated) and
raises `SpecError` naming the field and what to write instead.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from vncgate.common.addresses import Address
from vncgate.common.durations import DurationError
from vncgate.common.durations import parse_duration as _parse_duration

API_GROUP = "vncgate.io"
API_VERSION = "v1alpha1"
KIND = "VncTarget"
PLURAL = "vnctargets"

# RFC 1123 label (namespaces, Service names) and subdomain (object names, DNS hosts).
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
LABEL_RE = re.compile(rf"^{_LABEL}$")
SUBDOMAIN_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
# DNS host names may carry upper case; IANA service names (port names) are 1-15 chars.
_HOST_LABEL = r"[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?"
HOSTNAME_RE = re.compile(rf"^{_HOST_LABEL}(\.{_HOST_LABEL})*\.?$")
PORT_NAME_RE = re.compile(r"^(?=.*[a-z])[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

MAX_DISPLAY_NAME = 256
_SPEC_FIELDS = {"endpoint", "displayName", "viewOnly", "access", "sessions", "recording",
                "credentials", "tls", "thumbnail"}
MAX_SESSION_SECONDS = 30 * 86400
# Kubernetes label syntax: a key `[prefix/]name`, a value of at most 63 characters.
_LABEL_PART = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)"
LABEL_NAME_RE = re.compile(rf"^{_LABEL_PART}$")
MAX_LABELS = 64
MAX_ACCESS_ENTRIES = 256


class SpecError(ValueError):
    """A VncTarget field holds something that cannot work; `field` is its dotted path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class ServiceRef:
    """`endpoint.service`: a Service in the target's own namespace, port by number or name."""

    name: str
    port: int | str


@dataclass(frozen=True, slots=True)
class KubeVirtRef:
    """`endpoint.kubevirt`: a KubeVirt VirtualMachine or VirtualMachineInstance in the target's
    own namespace. A VM's instance carries the VM's name, so one name serves both."""

    name: str

    def __str__(self) -> str:
        return f"kubevirt/{self.name}"


@dataclass(frozen=True, slots=True)
class Access:
    """`spec.access`: who may open the target when the relay authorizes from its manifests.

    In a cluster, Kubernetes RBAC decides instead (the `connect` verb on `vnctargets`).
    """

    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()

    def admits(self, user: str, groups: tuple[str, ...]) -> bool:
        return user in self.users or any(group in self.groups for group in groups)


class SessionMode(StrEnum):
    """`spec.sessions.mode`: several viewers at once, or one."""

    SHARED = "shared"
    EXCLUSIVE = "exclusive"


class Interactive(StrEnum):
    """`spec.sessions.interactive`: who may type in a shared session."""

    ALL = "all"
    FIRST = "first"


class Takeover(StrEnum):
    """`spec.sessions.takeover`: who may take an exclusive console that is in use."""

    DENY = "deny"
    ALLOW = "allow"
    OWNER_ONLY = "owner-only"


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """`spec.sessions`: how viewers share a console.

    shared: several viewers at once (at most `max_viewers`); with `interactive: first` only the
    first viewer may type, later ones join view-only. exclusive: one viewer; another is refused
    (4409) unless `takeover` lets them take the console: `allow` anyone who may open it,
    `owner-only` the same user (their own session elsewhere), `deny` nobody. `idle_timeout`
    frees a console after that long without input (4408), `max_duration` ends any session.
    """

    mode: SessionMode = SessionMode.SHARED
    max_viewers: int | None = None
    interactive: Interactive = Interactive.ALL
    takeover: Takeover = Takeover.DENY
    idle_timeout: int | None = None
    max_duration: int | None = None

    @property
    def exclusive(self) -> bool:
        return self.mode == SessionMode.EXCLUSIVE

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"mode": self.mode.value,
                                   "interactive": self.interactive.value,
                                   "takeover": self.takeover.value}
        if self.max_viewers is not None:
            body["maxViewers"] = self.max_viewers
        if self.idle_timeout is not None:
            body["idleTimeout"] = f"{self.idle_timeout}s"
        if self.max_duration is not None:
            body["maxDuration"] = f"{self.max_duration}s"
        return body


DEFAULT_SESSIONS = SessionPolicy()


@dataclass(frozen=True, slots=True)
class RecordingPolicy:
    """`spec.recording`: record sessions (relay/recording/); `input`: with keys and pointer.
    None on a route: the relay's default (--record-sessions) decides."""

    enabled: bool = False
    input: bool = False
    # The session ends (4507) when its recording cannot go on (a full disk, a failed write,
    # a disk that stalls); without it, the recording is cut and the session goes on.
    required: bool = False

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"enabled": self.enabled, "input": self.input}
        if self.required:
            body["required"] = True
        return body


def parse_recording(value: object, field: str = "spec.recording") -> RecordingPolicy | None:
    if value is None:
        return None
    policy = _mapping(value, field)
    _no_unknown(policy, {"enabled", "input", "required"}, field)
    enabled, record_input = policy.get("enabled", False), policy.get("input", False)
    required = policy.get("required", False)
    for key, flag in (("enabled", enabled), ("input", record_input), ("required", required)):
        if not isinstance(flag, bool):
            raise SpecError(f"{field}.{key}", f"must be true or false, not {flag!r}")
    if required and not enabled:
        raise SpecError(f"{field}.required", "needs enabled: true (a recording that is off "
                                             "cannot be required)")
    return RecordingPolicy(enabled=enabled, input=record_input, required=required)


@dataclass(frozen=True, slots=True)
class VncTargetSpec:
    endpoint: ServiceRef | Address | KubeVirtRef
    display_name: str = ""
    view_only: bool = False
    access: Access | None = None
    sessions: SessionPolicy = DEFAULT_SESSIONS
    recording: RecordingPolicy | None = None
    credentials: Credentials | None = None
    tls: TlsSpec | None = None
    thumbnail: bool = False


def parse_thumbnail(value: object, field: str = "spec.thumbnail") -> bool:
    """`spec.thumbnail: {enabled: true}`: the console list shows a small image of the screen."""
    if value is None:
        return False
    thumbnail = _mapping(value, field)
    _no_unknown(thumbnail, {"enabled"}, field)
    enabled = thumbnail.get("enabled", False)
    if not isinstance(enabled, bool):
        raise SpecError(f"{field}.enabled", f"must be true or false, not {enabled!r}")
    return enabled


def check_namespace(value: object, field: str = "metadata.namespace") -> str:
    if not isinstance(value, str) or len(value) > 63 or not LABEL_RE.match(value):
        raise SpecError(field, f"{value!r} is not a namespace name (lower-case letters, digits "
                               "and '-', at most 63 characters)")
    return value


def check_name(value: object, field: str = "metadata.name") -> str:
    if not isinstance(value, str) or len(value) > 253 or not SUBDOMAIN_RE.match(value):
        raise SpecError(field, f"{value!r} is not an object name (lower-case letters, digits, "
                               "'-' and '.', at most 253 characters)")
    return value


def check_key(namespace: object, name: object) -> tuple[str, str]:
    """A target's key as a path, a flag or a request names it: (namespace, name)."""
    return check_namespace(namespace, "namespace"), check_name(name, "name")


def check_host(value: object, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(field, "give a DNS name or an IP address, "
                               "e.g. 10.20.0.15 or bmc1.lab.example")
    host = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if len(host) > 253 or not HOSTNAME_RE.match(host):
        raise SpecError(field, f"{value!r} is neither an IP address nor a DNS name")
    return host.rstrip(".").lower()


def check_port(value: object, field: str) -> int:
    # bool is an int in Python; `port: true` is a mistake, not port 1.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise SpecError(field, f"{value!r} is not a TCP port number (1-65535)")
    return value


def _mapping(value: object, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SpecError(field, f"must be a mapping, not {type(value).__name__}")
    return value


def _no_unknown(obj: Mapping[str, Any], allowed: set[str], field: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise SpecError(f"{field}.{unknown[0]}",
                        f"unknown field; {field} takes {', '.join(sorted(allowed))}")


def parse_endpoint(value: object, field: str = "spec.endpoint"
                   ) -> ServiceRef | Address | KubeVirtRef:
    endpoint = _mapping(value, field)
    _no_unknown(endpoint, {"service", "address", "kubevirt"}, field)
    kinds = [k for k in ("service", "address", "kubevirt") if endpoint.get(k) is not None]
    if len(kinds) != 1:
        raise SpecError(field, "set exactly one of service (a Service in this namespace), "
                               "address (host and port of a VNC server) or kubevirt (a KubeVirt "
                               "virtual machine in this namespace)")
    sub = _mapping(endpoint[kinds[0]], f"{field}.{kinds[0]}")
    if kinds[0] == "kubevirt":
        _no_unknown(sub, {"name"}, f"{field}.kubevirt")
        return KubeVirtRef(name=check_name(sub.get("name"), f"{field}.kubevirt.name"))
    if kinds[0] == "address":
        _no_unknown(sub, {"host", "port"}, f"{field}.address")
        return Address(host=check_host(sub.get("host"), f"{field}.address.host"),
                       port=check_port(sub.get("port"), f"{field}.address.port"))
    _no_unknown(sub, {"name", "port"}, f"{field}.service")
    name = sub.get("name")
    if not isinstance(name, str) or len(name) > 63 or not LABEL_RE.match(name):
        raise SpecError(f"{field}.service.name", f"{name!r} is not a Service name")
    port = sub.get("port")
    if isinstance(port, str):
        if len(port) > 15 or not PORT_NAME_RE.match(port):
            raise SpecError(f"{field}.service.port", f"{port!r} is not a port name; give the "
                                                     "Service port's name or number")
        return ServiceRef(name=name, port=port)
    return ServiceRef(name=name, port=check_port(port, f"{field}.service.port"))


def parse_access(value: object, field: str = "spec.access") -> Access | None:
    if value is None:
        return None
    access = _mapping(value, field)
    _no_unknown(access, {"users", "groups"}, field)
    lists: dict[str, tuple[str, ...]] = {}
    for key in ("users", "groups"):
        items = access.get(key, [])
        if (not isinstance(items, list) or len(items) > MAX_ACCESS_ENTRIES
                or not all(isinstance(i, str) and 0 < len(i) <= 256 for i in items)):
            raise SpecError(f"{field}.{key}", f"must be a list of at most {MAX_ACCESS_ENTRIES} "
                                              "non-empty names")
        lists[key] = tuple(items)
    return Access(users=lists["users"], groups=lists["groups"])


def parse_labels(value: object, field: str = "metadata.labels") -> tuple[tuple[str, str], ...]:
    """Kubernetes labels as sorted (key, value) pairs; None or {}: none."""
    if value is None:
        return ()
    labels = _mapping(value, field)
    if len(labels) > MAX_LABELS:
        raise SpecError(field, f"at most {MAX_LABELS} labels")
    pairs = []
    for key, text in labels.items():
        prefix, slash, name = str(key).rpartition("/")
        if not isinstance(key, str) or len(name) > 63 or not LABEL_NAME_RE.match(name) or (
                slash and (len(prefix) > 253 or not SUBDOMAIN_RE.match(prefix))):
            raise SpecError(f"{field}.{key}", "not a label key: write [prefix/]name, the name "
                                              "1-63 letters, digits, '-', '_' or '.'")
        if not isinstance(text, str) or len(text) > 63 or (text and not LABEL_NAME_RE.match(text)):
            raise SpecError(f"{field}.{key}", "a label value is a string of at most 63 letters, "
                                              "digits, '-', '_' or '.'")
        pairs.append((key, text))
    return tuple(sorted(pairs))


def parse_duration(value: object, field: str) -> int:
    """Whole seconds from a duration (`90s`, `15m`, `1h30m`, `1d`; vncgate.common.durations)."""
    try:
        exact = _parse_duration(value)
    except DurationError as exc:
        raise SpecError(field, str(exc)) from None
    seconds = int(exact)
    if seconds != exact:
        raise SpecError(field, f"{value!r}: give whole seconds, e.g. 2s instead of 1.5s")
    if not 0 < seconds <= MAX_SESSION_SECONDS:
        raise SpecError(field, f"must be between 1s and {MAX_SESSION_SECONDS // 86400}d")
    return seconds


_Choice = TypeVar("_Choice", bound=StrEnum)


def _choice(value: object, field: str, choices: type[_Choice]) -> _Choice:
    for choice in choices:
        if value == choice.value:
            return choice
    raise SpecError(field, f"{value!r}; write one of {', '.join(c.value for c in choices)}")


KUBEVIRT_SESSIONS = SessionPolicy(mode=SessionMode.EXCLUSIVE)
KUBEVIRT_SHARED = ("shared is not offered for endpoint.kubevirt: KubeVirt keeps one VNC "
                   "connection per VM and a second one replaces the first; leave sessions.mode "
                   "unset (exclusive)")


def parse_sessions(value: object, field: str = "spec.sessions", *,
                   kubevirt: bool = False) -> SessionPolicy:
    """`kubevirt`: the target is a KubeVirt VM, whose console is exclusive (KUBEVIRT_SHARED)."""
    if value is None:
        return KUBEVIRT_SESSIONS if kubevirt else DEFAULT_SESSIONS
    policy = _mapping(value, field)
    _no_unknown(policy, {"mode", "maxViewers", "interactive", "takeover", "idleTimeout",
                         "maxDuration"}, field)
    max_viewers = policy.get("maxViewers")
    if max_viewers is not None and (isinstance(max_viewers, bool) or not isinstance(
            max_viewers, int) or not 1 <= max_viewers <= 1000):
        raise SpecError(f"{field}.maxViewers", f"{max_viewers!r} is not a number from 1 to 1000")
    idle, longest = policy.get("idleTimeout"), policy.get("maxDuration")
    mode = _choice(policy.get("mode", "exclusive" if kubevirt else "shared"), f"{field}.mode",
                   SessionMode)
    if kubevirt and mode == SessionMode.SHARED:
        raise SpecError(f"{field}.mode", KUBEVIRT_SHARED)
    return SessionPolicy(
        mode=mode,
        max_viewers=max_viewers,
        interactive=_choice(policy.get("interactive", "all"), f"{field}.interactive",
                            Interactive),
        takeover=_choice(policy.get("takeover", "deny"), f"{field}.takeover", Takeover),
        idle_timeout=None if idle is None else parse_duration(idle, f"{field}.idleTimeout"),
        max_duration=None if longest is None else parse_duration(longest,
                                                                 f"{field}.maxDuration"))


def parse_spec(value: object, field: str = "spec") -> VncTargetSpec:
    """Parse a VncTarget `spec`; unknown fields are errors, as with kubectl's strict validation."""
    spec = _mapping(value, field)
    _no_unknown(spec, _SPEC_FIELDS, field)
    display_name = spec.get("displayName", "")
    if not isinstance(display_name, str) or len(display_name) > MAX_DISPLAY_NAME:
        raise SpecError(f"{field}.displayName",
                        f"must be a string of at most {MAX_DISPLAY_NAME} characters")
    view_only = spec.get("viewOnly", False)
    if not isinstance(view_only, bool):
        raise SpecError(f"{field}.viewOnly", f"must be true or false, not {view_only!r}")
    endpoint = parse_endpoint(spec.get("endpoint"), f"{field}.endpoint")
    return VncTargetSpec(endpoint=endpoint,
                         display_name=display_name, view_only=view_only,
                         access=parse_access(spec.get("access"), f"{field}.access"),
                         sessions=parse_sessions(spec.get("sessions"), f"{field}.sessions",
                                                 kubevirt=isinstance(endpoint, KubeVirtRef)),
                         recording=parse_recording(spec.get("recording"), f"{field}.recording"),
                         credentials=parse_credentials(spec.get("credentials"),
                                                       f"{field}.credentials"),
                         tls=parse_tls(spec.get("tls"), f"{field}.tls"),
                         thumbnail=parse_thumbnail(spec.get("thumbnail"), f"{field}.thumbnail"))


# --- spec.credentials and spec.tls: what the relay answers the VNC server's security with ------
# (relay.rfbsecurity speaks it; relay.credentials loads the secret at each session's start.)

_CREDENTIAL_FIELDS = {"secretName", "passwordFile", "passwordEnv", "username"}
_TLS_FIELDS = {"caSecret", "caConfigMap", "caFile", "serverName", "insecureSkipVerify"}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class Credentials:
    """`spec.credentials`: where the password (and VeNCrypt Plain's username) come from.

    In a cluster: `secretName`, a Secret in the target's namespace (keys `password`, optionally
    `username`), read by the relay at each session's start. Standalone manifests, which the
    relay's own admin writes: `passwordFile` or `passwordEnv` (and `username`). Never inline.
    """

    secret_name: str | None = None
    password_file: str | None = None
    password_env: str | None = None
    username: str | None = None

    @property
    def standalone_only(self) -> bool:
        return self.secret_name is None

    def to_json(self) -> dict[str, str]:
        pairs = (("secretName", self.secret_name), ("passwordFile", self.password_file),
                 ("passwordEnv", self.password_env), ("username", self.username))
        return {key: value for key, value in pairs if value is not None}


@dataclass(frozen=True, slots=True)
class KeyRef:
    """A key of a Secret or ConfigMap in the target's namespace."""

    name: str
    key: str = "ca.crt"


@dataclass(frozen=True, slots=True)
class TlsSpec:
    """`spec.tls`: how the relay verifies a VeNCrypt server's certificate."""

    ca_secret: KeyRef | None = None
    ca_config_map: KeyRef | None = None
    ca_file: str | None = None
    server_name: str | None = None
    insecure_skip_verify: bool = False

    @property
    def standalone_only(self) -> bool:
        return self.ca_file is not None

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"insecureSkipVerify": self.insecure_skip_verify}
        if self.ca_secret is not None:
            body["caSecret"] = {"name": self.ca_secret.name, "key": self.ca_secret.key}
        if self.ca_config_map is not None:
            body["caConfigMap"] = {"name": self.ca_config_map.name, "key": self.ca_config_map.key}
        if self.ca_file is not None:
            body["caFile"] = self.ca_file
        if self.server_name is not None:
            body["serverName"] = self.server_name
        return body


def _text(value: object, field: str, what: str, limit: int = 4096) -> str:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise SpecError(field, f"give {what}")
    return value


def parse_credentials(value: object, field: str = "spec.credentials") -> Credentials | None:
    if value is None:
        return None
    body = _mapping(value, field)
    if "password" in body:
        raise SpecError(f"{field}.password", "a password is never written into a manifest; "
                        "name a Secret with secretName (or passwordFile / passwordEnv standalone)")
    _no_unknown(body, _CREDENTIAL_FIELDS, field)
    sources = [k for k in ("secretName", "passwordFile", "passwordEnv") if body.get(k) is not None]
    if len(sources) != 1:
        raise SpecError(field, "set exactly one of secretName (a Secret in this namespace with "
                               "the key password), passwordFile or passwordEnv (standalone)")
    secret = body.get("secretName")
    if secret is not None and (not isinstance(secret, str) or len(secret) > 253
                               or not SUBDOMAIN_RE.match(secret)):
        raise SpecError(f"{field}.secretName", f"{secret!r} is not a Secret name")
    env = body.get("passwordEnv")
    if env is not None and (not isinstance(env, str) or not _ENV_NAME.match(env)):
        raise SpecError(f"{field}.passwordEnv", f"{env!r} is not an environment variable name")
    path = body.get("passwordFile")
    username = body.get("username")
    if secret is not None and username is not None:
        raise SpecError(f"{field}.username", "with secretName the username comes from the "
                                             "Secret's key username")
    return Credentials(
        secret_name=secret, password_env=env,
        password_file=None if path is None else _text(path, f"{field}.passwordFile", "a path"),
        username=None if username is None else _text(username, f"{field}.username",
                                                     "a user name", 255))


def _key_ref(value: object, field: str) -> KeyRef:
    body = _mapping(value, field)
    _no_unknown(body, {"name", "key"}, field)
    name = body.get("name")
    if not isinstance(name, str) or len(name) > 253 or not SUBDOMAIN_RE.match(name):
        raise SpecError(f"{field}.name", f"{name!r} is not an object name")
    key = body.get("key", "ca.crt")
    if not isinstance(key, str) or not re.match(r"^[-._a-zA-Z0-9]{1,253}$", key):
        raise SpecError(f"{field}.key", f"{key!r} is not a key name")
    return KeyRef(name=name, key=key)


def parse_tls(value: object, field: str = "spec.tls") -> TlsSpec | None:
    if value is None:
        return None
    body = _mapping(value, field)
    _no_unknown(body, _TLS_FIELDS, field)
    cas = [k for k in ("caSecret", "caConfigMap", "caFile") if body.get(k) is not None]
    if len(cas) > 1:
        raise SpecError(field, "set at most one of caSecret, caConfigMap and caFile")
    skip = body.get("insecureSkipVerify", False)
    if not isinstance(skip, bool):
        raise SpecError(f"{field}.insecureSkipVerify", f"must be true or false, not {skip!r}")
    if skip and cas:
        raise SpecError(f"{field}.insecureSkipVerify", f"contradicts {field}.{cas[0]}: "
                                                       "verify with the CA or skip, not both")
    server_name = body.get("serverName")
    if server_name is not None:
        server_name = check_host(server_name, f"{field}.serverName")
    ca_file = body.get("caFile")
    return TlsSpec(
        ca_secret=None if body.get("caSecret") is None
        else _key_ref(body["caSecret"], f"{field}.caSecret"),
        ca_config_map=None if body.get("caConfigMap") is None
        else _key_ref(body["caConfigMap"], f"{field}.caConfigMap"),
        ca_file=None if ca_file is None else _text(ca_file, f"{field}.caFile", "a path"),
        server_name=server_name, insecure_skip_verify=skip)
