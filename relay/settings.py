"""The relay's settings: one typed object, read once from flags and `VNCGATE_*` variables."""

from __future__ import annotations

import argparse
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from vncgate.common import installed_version
from vncgate.common.addresses import Address, split_host_port
from vncgate.common.envflags import FlagParser, env_flag, env_list
from vncgate.common.envflags import env as _env
from vncgate.common.kube import DEFAULT_MAX_CONNECTIONS
from vncgate.common.model import Route
from vncgate.common.networks import Network
from vncgate.common.reach import ReachError, ReachPolicy, load_grants
from vncgate.common.spec import (
    SUBDOMAIN_RE,
    SpecError,
    check_host,
    check_name,
    check_namespace,
    check_port,
    parse_duration,
)
from vncgate.relay.access.identity import AUTH_MODES, AuthConfigError, AuthMode
from vncgate.relay.access.links import load_keys
from vncgate.relay.access.oidc import OidcError, OidcSettings, check_issuer
from vncgate.relay.access.proxies import parse_networks
from vncgate.relay.access.roles import ROLE_FLAGS, RoleNames
from vncgate.relay.access.users import User, load_users
from vncgate.relay.recording.store import RecordingSettings
from vncgate.relay.recording.store import add_arguments as add_recording_arguments
from vncgate.relay.recording.store import settings_from_args as recording_settings_from_args


@dataclass(frozen=True)
class AuthSettings:
    mode: AuthMode = AuthMode.NONE
    trusted_proxies: tuple[Network, ...] = ()
    user_header: str = "X-Forwarded-User"
    groups_header: str = "X-Forwarded-Groups"
    # Put before names and groups from the proxy's headers (like the API server's
    # --oidc-username-prefix / --oidc-groups-prefix), so a header cannot name a cluster user.
    proxy_user_prefix: str = ""
    proxy_groups_prefix: str = ""
    # `system:` groups from a header are dropped unless this is set.
    proxy_system_groups: bool = False
    users: dict[str, User] = field(default_factory=dict)
    # Where `users` came from: re-read when it changes (relay/access/users.py UsersFile).
    users_file: Path | None = None
    # Signs login cookies; None: a random key per process (logins end at restart).
    session_secret: bytes | None = None
    session_ttl: int = 8 * 3600
    link_keys: tuple[bytes, ...] = ()
    public_url: str = ""
    # "kubernetes": SubjectAccessReviews; "manifest": spec.access lists of the targets.
    authorization: str = "manifest"
    # `Authorization: Bearer <Kubernetes token>` checked with TokenReviews
    # (relay/access/tokenreview.py), beside the mode's own sign-in; the audiences a token must be
    # for (none: the API server's).
    kubernetes_tokens: bool = False
    token_audiences: tuple[str, ...] = ()
    # `--auth oidc`: the OpenID provider (relay/access/oidc.py).
    oidc: OidcSettings | None = None


@dataclass(frozen=True)
class RelaySettings:
    listen: Address = Address("127.0.0.1", 8080)  # noqa: RUF009 - frozen, immutable
    internal_listen: Address = Address("127.0.0.1", 8081)  # noqa: RUF009 - frozen
    # /metrics on a port of its own (so a scraper admitted there cannot reach the registration
    # API); None: /metrics is on the internal port.
    metrics_listen: Address | None = None
    # The bearer token of the registration API. None: the API refuses every request (401).
    api_token: str | None = None
    allowed_origins: tuple[str, ...] = ()
    targets_paths: tuple[Path, ...] = ()
    targets: tuple[Route, ...] = ()
    log_format: str = "text"
    log_level: str = "INFO"
    connect_timeout: float = 5.0
    # Bytes of one WebSocket message from a browser; noVNC's messages are small.
    max_message_size: int = 4 * 1024 * 1024
    max_sessions: int = 10_000
    max_sessions_per_target: int = 100
    # In a cluster, /readyz waits for the operator's first full table.
    wait_for_sync: bool = False
    # Addresses the relay never dials, checked after DNS resolution (see bridge.allowed_address).
    deny_networks: tuple[Network, ...] = ()
    # Which namespaces may reach which networks (--address-grants; vncgate.common.reach): the
    # resolved address of an endpoint.address is checked against it at dial time.
    reach: ReachPolicy = field(default_factory=ReachPolicy)
    # On SIGTERM: sessions are closed with 1001 at once; handlers get this long to finish.
    shutdown_grace: float = 5.0
    # Host names the public port answers to, beside localhost, IP addresses, --public-url's
    # and --listen's (see host_names); against DNS rebinding.
    allowed_hosts: tuple[str, ...] = ()
    # Seconds a client may take to send a request's headers or body, and to stay idle between
    # requests on a kept-alive connection.
    http_read_timeout: float = 15.0
    # A side that accepts no bytes for this long (its buffer stays over the high-water mark)
    # ends the session: a hung VNC server or a browser that stopped reading holds nothing.
    stall_timeout: float = 60.0
    # Seconds between WebSocket pings to a quiet browser; no pong within half of it ends the
    # session (1006).
    heartbeat: float = 30.0
    # Who the viewer is (vncgate.relay.web.requester) and what they may open
    # (vncgate.relay.access.authz).
    auth: AuthSettings = field(default_factory=lambda: AuthSettings())
    # The Kubernetes API (SubjectAccessReviews, Leases): a kubeconfig, or in-cluster if None.
    kubeconfig: Path | None = None
    # Requests to it under way at once, over kept-alive connections every part of the relay
    # shares (vncgate.common.kube.KubePool); its watches have connections of their own.
    kube_api_connections: int = DEFAULT_MAX_CONNECTIONS
    # Exclusive consoles across replicas: Leases in this namespace; None: this process only.
    lease_namespace: str | None = None
    identity: str = field(default_factory=socket.gethostname)
    # The other replicas (relay/session/peers.py): internal URLs, and/or the headless Service whose
    # EndpointSlices list them (namespace, name).
    peer_urls: tuple[str, ...] = ()
    peer_service: tuple[str, str] | None = None
    recording: RecordingSettings = field(default_factory=RecordingSettings)
    # TLS on the public port (PEM chain and key), reloaded when they change (relay/web/tls.py).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_reload_interval: float = 10.0
    # Seconds between looks at --users-file for changes.
    users_reload_interval: float = 5.0
    # The ClusterRoles that messages name (relay/access/roles.py): the chart passes its own.
    roles: RoleNames = field(default_factory=RoleNames)


WILDCARD_HOSTS = ("0.0.0.0", "::", "")  # noqa: S104 - names of "every interface", compared


def host_names(settings: RelaySettings) -> frozenset[str] | None:
    """The Host names the public port accepts (IP addresses are always accepted: a rebound
    name is never an IP address); None: any, when the relay listens on every interface and
    no name is configured (it cannot know its names; the CLI warns)."""
    names = {name.lower().rstrip(".") for name in settings.allowed_hosts}
    public = urlsplit(settings.auth.public_url).hostname if settings.auth.public_url else None
    if public:
        names.add(public.lower().rstrip("."))
    if not names and settings.listen.host in WILDCARD_HOSTS:
        return None
    if settings.listen.host not in WILDCARD_HOSTS:
        names.add(settings.listen.host.lower().rstrip("."))
    names.add("localhost")
    return frozenset(names)


def parse_host_port(value: str, what: str = "--listen") -> Address:
    """`HOST:PORT`, `[v6]:PORT` or `:PORT` (all interfaces)."""
    parts = split_host_port(value)
    if parts is None or not parts[1].isdigit():
        raise argparse.ArgumentTypeError(f"{what}: {value!r} is not HOST:PORT, e.g. 127.0.0.1:8080")
    host, port = parts
    number = int(port)
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{what}: port {number} is out of range (0-65535)")
    return Address(host or "0.0.0.0", number)  # noqa: S104 - ":PORT" means every interface


def parse_target_flag(value: str) -> Route:
    """`--target NAMESPACE/NAME=HOST:PORT` (or `NAME=HOST:PORT` in namespace `default`)."""
    key, sep, address = value.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(
            f"--target {value!r}: write NAMESPACE/NAME=HOST:PORT, e.g. lab/desk-1=127.0.0.1:5901")
    namespace, slash, name = key.rpartition("/")
    host, colon, port = address.rpartition(":")
    try:
        if not colon or not port.isdigit():
            raise SpecError("port", f"{address!r} is not HOST:PORT")
        return Route(namespace=check_namespace(namespace if slash else "default", "namespace"),
                     name=check_name(name, "name"),
                     host=check_host(host, "host"), port=check_port(int(port), "port"))
    except SpecError as exc:
        raise argparse.ArgumentTypeError(f"--target {value!r}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(
        prog="vncgate-relay",
        description="Serve noVNC and bridge WebSocket to VNC servers: the vncgate relay. "
                    "Every flag is also an environment variable VNCGATE_<FLAG> "
                    "(repeatable flags: comma-separated).",
        epilog="Subcommands (each has --help): `vncgate-relay link NS/NAME` prints a share "
               "link; `vncgate-relay hash-password` prints a hash for a users file; "
               "`vncgate-relay recordings list|export|delete|prune` manages recordings.")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {installed_version()}")
    parser.add_argument("--listen", type=parse_host_port,
                        default=parse_host_port(_env("LISTEN") or "127.0.0.1:8080"),
                        help="public address: viewer, list, WebSocket (default 127.0.0.1:8080)")
    parser.add_argument("--internal-listen", type=lambda v: parse_host_port(v, "--internal-listen"),
                        default=parse_host_port(_env("INTERNAL_LISTEN") or "127.0.0.1:8081",
                                                "--internal-listen"),
                        help="internal address: API, /metrics (default 127.0.0.1:8081)")
    parser.add_argument("--metrics-listen", type=lambda v: parse_host_port(v, "--metrics-listen"),
                        default=parse_host_port(m, "--metrics-listen")
                        if (m := _env("METRICS_LISTEN")) else None,
                        help="serve /metrics on this address instead of the internal port, so "
                             "that a scraper need not reach the registration API")
    parser.add_argument("--api-token-file", type=Path,
                        default=Path(p) if (p := _env("API_TOKEN_FILE")) else None,
                        help="file holding the bearer token of the registration API")
    parser.add_argument("--allowed-origin", action="append", default=None,
                        help="an extra Origin allowed to open WebSockets (repeatable); "
                             "the page's own origin is always allowed")
    parser.add_argument("--targets", action="append", type=Path, default=None,
                        help="a VncTarget manifest file or a folder of them (repeatable)")
    parser.add_argument("--target", action="append", type=parse_target_flag, default=None,
                        help="NAMESPACE/NAME=HOST:PORT, one target (repeatable)")
    parser.add_argument("--log-format", choices=("text", "json"),
                        default=_env("LOG_FORMAT") or "text")
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        default=(_env("LOG_LEVEL") or "INFO").upper())
    parser.add_argument("--connect-timeout", type=float,
                        default=float(_env("CONNECT_TIMEOUT") or 5.0),
                        help="seconds to connect to a VNC server and read its greeting (default 5)")
    parser.add_argument("--max-sessions", type=int, default=int(_env("MAX_SESSIONS") or 10_000),
                        help="sessions this process serves at once (default 10000)")
    parser.add_argument("--max-sessions-per-target", type=int,
                        default=int(_env("MAX_SESSIONS_PER_TARGET") or 100),
                        help="sessions one target may have at once (default 100)")
    parser.add_argument("--stall-timeout", default=_env("STALL_TIMEOUT") or "60s",
                        help="end a session when the VNC server or the browser accepts no data "
                             "for this long, e.g. 60s or 2m (default 60s)")
    parser.add_argument("--shutdown-grace", default=_env("SHUTDOWN_GRACE") or "5s",
                        help="on SIGTERM, how long closing sessions (1001) may take before the "
                             "process exits (default 5s; keep it under the pod's "
                             "terminationGracePeriodSeconds)")
    parser.add_argument("--deny-cidr", action="append", default=None, metavar="CIDR",
                        help="never dial addresses in this range, checked after DNS resolution "
                             "(repeatable; the chart denies loopback, link-local and metadata)")
    parser.add_argument("--address-grants", default=_env("ADDRESS_GRANTS"), metavar="FILE",
                        help="the network-reach grants (the operator's file): a route's "
                             "resolved address must lie in its namespace's grant at dial time; "
                             "default: not enforced")
    parser.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                        help="a host name browsers use to reach the public port (repeatable); "
                             "other names are refused (DNS rebinding). localhost, IP addresses "
                             "and the names of --public-url and --listen are always accepted")
    parser.add_argument("--http-read-timeout", type=float,
                        default=float(_env("HTTP_READ_TIMEOUT") or 15.0),
                        help="seconds a client may take to send a request, or stay idle on a "
                             "kept-alive connection (default 15)")
    parser.add_argument("--wait-for-sync", action=argparse.BooleanOptionalAction,
                        default=env_flag("WAIT_FOR_SYNC"),
                        help="ready only after the operator's first full table (in a cluster)")
    tls = parser.add_argument_group("TLS on the public port (without an Ingress in front)")
    tls.add_argument("--tls-cert", type=Path,
                     default=Path(p) if (p := _env("TLS_CERT")) else None,
                     help="PEM certificate chain (leaf first); the public port speaks https and "
                          "wss, sends HSTS and Secure cookies; reloaded when the file changes")
    tls.add_argument("--tls-key", type=Path, default=Path(p) if (p := _env("TLS_KEY")) else None,
                     help="PEM private key of --tls-cert; reloaded when the file changes")
    auth = parser.add_argument_group("authentication and authorization")
    auth.add_argument("--auth", choices=AUTH_MODES, default=_env("AUTH"),
                      help="none: no sign-in (default only on a loopback --listen); proxy: trust "
                           "identity headers from --trusted-proxy; token: --users-file; oidc: "
                           "an OpenID Connect provider (--oidc-*)")
    oidc = parser.add_argument_group(
        "OpenID Connect (--auth oidc)", "the --oidc-* names and meanings are the API server's, "
        "so that the relay names people as kubectl does")
    oidc.add_argument("--oidc-issuer-url", default=_env("OIDC_ISSUER_URL"), metavar="URL",
                      help="the provider's issuer (https), e.g. "
                           "https://keycloak.example.com/realms/lab; discovery is read from it")
    oidc.add_argument("--oidc-client-id", default=_env("OIDC_CLIENT_ID"), metavar="ID",
                      help="the relay's client at the provider; ID tokens must be for it (aud)")
    oidc.add_argument("--oidc-client-secret-file", type=Path, metavar="PATH",
                      default=Path(p) if (p := _env("OIDC_CLIENT_SECRET_FILE")) else None,
                      help="file holding the client's secret (the chart mounts a Secret)")
    oidc.add_argument("--oidc-ca-file", type=Path, metavar="PATH",
                      default=Path(p) if (p := _env("OIDC_CA_FILE")) else None,
                      help="CA bundle that signs the provider's certificate (default: system)")
    oidc.add_argument("--oidc-username-claim", default=_env("OIDC_USERNAME_CLAIM") or "sub",
                      metavar="CLAIM", help="the ID token claim that names the user (default "
                                            "sub), as the API server's flag of that name")
    oidc.add_argument("--oidc-username-prefix", default=_env("OIDC_USERNAME_PREFIX"),
                      metavar="PREFIX",
                      help="put before every user name; default as the API server's: the "
                           "issuer URL and '#' unless the claim is email; '-' for none")
    oidc.add_argument("--oidc-groups-claim", default=_env("OIDC_GROUPS_CLAIM") or "",
                      metavar="CLAIM", help="the ID token claim that lists the user's groups")
    oidc.add_argument("--oidc-groups-prefix", default=_env("OIDC_GROUPS_PREFIX") or "",
                      metavar="PREFIX", help="put before every group, e.g. 'oidc:'")
    oidc.add_argument("--oidc-scope", action="append", default=None, metavar="SCOPE",
                      help="a scope to ask for beside openid, email and profile (repeatable), "
                           "e.g. groups for Dex")
    oidc.add_argument("--oidc-bearer-audience", action="append", default=None, metavar="CLIENT",
                      help="also accept bearer ID tokens issued to this client (repeatable): "
                           "the client id kubectl's exec plugin (kubelogin) signs in with")
    oidc.add_argument("--oidc-provider-name", default=_env("OIDC_PROVIDER_NAME") or "",
                      metavar="NAME", help="the sign-in button's words: Sign in with NAME")
    oidc.add_argument("--oidc-shared-renewals", action=argparse.BooleanOptionalAction,
                      default=(_env("OIDC_SHARED_RENEWALS") is None
                               or env_flag("OIDC_SHARED_RENEWALS")),
                      help="with --lease-namespace, renew each sign-in on one replica at a time "
                           "and share the result (a Lease per sign-in: three API requests per "
                           "renewal), so a provider with single-use refresh tokens does not end "
                           "it (default on)")
    auth.add_argument("--trusted-proxy", action="append", default=None, metavar="CIDR",
                      help="addresses of the auth proxy whose identity headers are believed")
    auth.add_argument("--user-header", default=_env("USER_HEADER") or "X-Forwarded-User")
    auth.add_argument("--groups-header", default=_env("GROUPS_HEADER") or "X-Forwarded-Groups",
                      help="comma-separated groups (default X-Forwarded-Groups)")
    auth.add_argument("--proxy-user-prefix", default=_env("PROXY_USER_PREFIX") or "",
                      help="proxy mode: put before every user name from the header, e.g. "
                           "'proxy:' (as the API server's --oidc-username-prefix)")
    auth.add_argument("--proxy-groups-prefix", default=_env("PROXY_GROUPS_PREFIX") or "",
                      help="proxy mode: put before every group from the header")
    auth.add_argument("--proxy-system-groups", action=argparse.BooleanOptionalAction,
                      default=env_flag("PROXY_SYSTEM_GROUPS"),
                      help="proxy mode: keep system: groups from the header (default: dropped)")
    auth.add_argument("--users-file", type=Path,
                      default=Path(p) if (p := _env("USERS_FILE")) else None,
                      help="token mode: YAML `user: secret` or `user: {secret, groups}`; secrets "
                           "hashed with `vncgate-relay hash-password`")
    auth.add_argument("--session-secret-file", type=Path,
                      default=Path(p) if (p := _env("SESSION_SECRET_FILE")) else None,
                      help="key that signs login cookies (same on every replica)")
    auth.add_argument("--session-ttl", default=_env("SESSION_TTL") or "8h",
                      help="how long a login lasts (default 8h)")
    auth.add_argument("--link-key-file", action="append", type=Path, default=None,
                      help="key for share links (repeatable, newest first: rotation)")
    auth.add_argument("--public-url", default=_env("PUBLIC_URL") or "",
                      help="the relay's address as browsers see it, e.g. https://vnc.example.com")
    auth.add_argument("--authorization", choices=("auto", "kubernetes", "manifest"),
                      default=_env("AUTHORIZATION") or "auto",
                      help="kubernetes: SubjectAccessReview on connect vnctargets; manifest: "
                           "spec.access of the targets; auto: kubernetes in a cluster or with "
                           "--kubeconfig")
    auth.add_argument("--kubernetes-tokens", action=argparse.BooleanOptionalAction,
                      default=env_flag("KUBERNETES_TOKENS"),
                      help="also accept `Authorization: Bearer <token>` with a token the "
                           "Kubernetes API server trusts (ServiceAccount, OIDC), checked by "
                           "TokenReview; for kubectl vnc and scripts (with --auth proxy or token)")
    auth.add_argument("--token-audience", action="append", default=None, metavar="AUDIENCE",
                      help="--kubernetes-tokens: accept only tokens for this audience "
                           "(repeatable), e.g. tokens made with kubectl create token --audience")
    auth.add_argument("--kubeconfig", type=Path,
                      default=Path(p) if (p := _env("KUBECONFIG_FILE")) else None,
                      help="kubeconfig for the Kubernetes API (default: in-cluster credentials)")
    auth.add_argument("--kube-api-connections", type=int, metavar="N",
                      default=int(_env("KUBE_API_CONNECTIONS") or DEFAULT_MAX_CONNECTIONS),
                      help="connections to the Kubernetes API for requests (reviews, Leases, "
                           "Secrets), kept alive and shared; a burst waits for a free one "
                           f"within the request's timeout (default {DEFAULT_MAX_CONNECTIONS}; "
                           "watches have their own)")
    roles = parser.add_argument_group(
        "role names", "the ClusterRoles that refusals tell people to ask for (the chart passes "
        "the names it created)")
    defaults = RoleNames()
    for attribute, flag, what in ROLE_FLAGS:
        roles.add_argument(flag, metavar="NAME",
                           default=_env(flag[2:].upper().replace("-", "_"))
                           or getattr(defaults, attribute),
                           help=f"the ClusterRole for {what} "
                                f"(default {getattr(defaults, attribute)})")
    sessions = parser.add_argument_group("sessions across replicas")
    sessions.add_argument("--lease-namespace", default=_env("LEASE_NAMESPACE"),
                          help="hold exclusive consoles, used single-use links and sign-outs "
                               "as Leases in this namespace (in a cluster: the relay's own); "
                               "without it, within this process")
    sessions.add_argument("--identity", default=_env("IDENTITY") or os.environ.get(
                              "POD_NAME") or socket.gethostname(),
                          help="this replica's name in Leases (default: the pod or host name)")
    sessions.add_argument("--peer-service", default=_env("PEER_SERVICE"), metavar="NS/NAME",
                          help="the relay's headless Service: its EndpointSlices list the other "
                               "replicas, asked for their sessions (kubectl vnc sessions, kill), "
                               "viewer counts and failed sign-ins, and told of sign-outs")
    sessions.add_argument("--peer-url", action="append", default=None, metavar="URL",
                          help="the internal URL of another replica (repeatable), instead of "
                               "--peer-service")
    add_recording_arguments(parser)
    return parser


def _peers(parser: argparse.ArgumentParser, args: argparse.Namespace
           ) -> tuple[tuple[str, ...], tuple[str, str] | None]:
    urls = args.peer_url if args.peer_url is not None else env_list("PEER_URL")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            parser.error(f"--peer-url {url!r}: the internal address of a replica, e.g. "
                         "http://10.0.0.5:8081")
    service = None
    if args.peer_service:
        namespace, slash, name = args.peer_service.partition("/")
        try:
            if not slash:
                raise SpecError("--peer-service", "write NAMESPACE/NAME")
            service = (check_namespace(namespace, "--peer-service"),
                       check_name(name, "--peer-service"))
        except SpecError as exc:
            parser.error(str(exc))
    return tuple(u.rstrip("/") for u in urls), service


def _read_secret(parser: argparse.ArgumentParser, flag: str, path: Path, minimum: int) -> bytes:
    try:
        value = path.read_bytes().strip()
    except OSError as exc:
        parser.error(f"{flag} {path}: {exc.strerror}")
    if len(value) < minimum:
        parser.error(f"{flag} {path}: needs at least {minimum} characters "
                     "(generate one with: openssl rand -hex 32)")
    return value


def _deny_networks(parser: argparse.ArgumentParser, args: argparse.Namespace
                   ) -> tuple[Network, ...]:
    values = args.deny_cidr if args.deny_cidr is not None else env_list("DENY_CIDR")
    try:
        return parse_networks(values, "--deny-cidr")
    except AuthConfigError as exc:
        parser.error(str(exc))


def _reach(parser: argparse.ArgumentParser, path: str | None) -> ReachPolicy:
    if not path:
        return ReachPolicy()
    try:
        return load_grants(path)
    except ReachError as exc:
        parser.error(str(exc))


def _check_identity(parser: argparse.ArgumentParser, identity: str) -> str:
    if not identity or len(identity) > 200 or not SUBDOMAIN_RE.match(identity):
        parser.error(f"--identity {identity!r}: lower-case letters, digits, '-' and '.'")
    return identity


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and Path(
        "/var/run/secrets/kubernetes.io/serviceaccount/token").exists()


def _auth_settings(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   listen: Address) -> AuthSettings:
    loopback = listen.host in ("127.0.0.1", "::1", "localhost")
    mode = AuthMode.NONE if args.auth is None else AuthMode(args.auth)
    if args.auth is None and not loopback:
        parser.error(f"--listen {listen} reaches beyond this machine: choose --auth proxy, "
                     "--auth token or --auth oidc, or --auth none to let anyone who reaches "
                     "the port open every console")
    proxies_raw = args.trusted_proxy if args.trusted_proxy is not None else \
        env_list("TRUSTED_PROXY")
    try:
        proxies = parse_networks(proxies_raw, "--trusted-proxy")
        users = load_users(args.users_file) if args.users_file is not None else {}
        ttl = parse_duration(args.session_ttl, "--session-ttl")
        key_paths = args.link_key_file if args.link_key_file is not None else [
            Path(p) for p in env_list("LINK_KEY_FILE")]
        link_keys = load_keys(key_paths)
    except (AuthConfigError, ValueError) as exc:
        parser.error(str(exc))
    if mode is AuthMode.PROXY and not proxies:
        parser.error("--auth proxy needs --trusted-proxy CIDR: the address of the auth proxy "
                     "whose headers are believed")
    if mode is AuthMode.TOKEN and not users:
        parser.error("--auth token needs --users-file")
    oidc = _oidc_settings(parser, args, mode)
    secret = (_read_secret(parser, "--session-secret-file", args.session_secret_file, 32)
              if args.session_secret_file is not None else None)
    authorization = args.authorization
    if authorization == "auto":
        authorization = "kubernetes" if (args.kubeconfig or _in_cluster()) else "manifest"
    audiences = tuple(args.token_audience if args.token_audience is not None
                      else env_list("TOKEN_AUDIENCE"))
    if args.kubernetes_tokens:
        if mode is AuthMode.NONE:
            parser.error("--kubernetes-tokens needs a sign-in mode: --auth token or --auth "
                         "proxy (with --auth none everyone may open every console anyway)")
        if authorization != "kubernetes":
            parser.error("--kubernetes-tokens needs the Kubernetes API: give --kubeconfig or "
                         "run in a cluster, with --authorization kubernetes (a token's user "
                         "is authorized by RBAC)")
    elif audiences:
        parser.error("--token-audience goes with --kubernetes-tokens")
    return AuthSettings(
        mode=mode, trusted_proxies=proxies, user_header=args.user_header,
        groups_header=args.groups_header, proxy_user_prefix=args.proxy_user_prefix,
        proxy_groups_prefix=args.proxy_groups_prefix,
        proxy_system_groups=args.proxy_system_groups, users=users,
        users_file=args.users_file, session_secret=secret,
        session_ttl=ttl,
        link_keys=link_keys, public_url=args.public_url.rstrip("/"),
        authorization=authorization, kubernetes_tokens=args.kubernetes_tokens,
        token_audiences=audiences, oidc=oidc)


def _oidc_settings(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   mode: AuthMode) -> OidcSettings | None:
    scopes = args.oidc_scope if args.oidc_scope is not None else env_list("OIDC_SCOPE")
    if mode is not AuthMode.OIDC:
        given = [name for name in ("oidc_issuer_url", "oidc_client_id", "oidc_client_secret_file")
                 if getattr(args, name)]
        if given:
            parser.error(f"--{given[0].replace('_', '-')} goes with --auth oidc")
        return None
    for name in ("oidc_issuer_url", "oidc_client_id", "oidc_client_secret_file"):
        if not getattr(args, name):
            parser.error(f"--auth oidc needs --{name.replace('_', '-')}")
    if not args.public_url:
        parser.error("--auth oidc needs --public-url: the provider sends browsers back to "
                     "<public-url>/login/oidc/callback, the redirect URI to register there")
    try:
        issuer = check_issuer(args.oidc_issuer_url)
    except OidcError as exc:
        parser.error(str(exc))
    secret = _read_secret(parser, "--oidc-client-secret-file", args.oidc_client_secret_file, 1)
    if args.oidc_ca_file is not None and not args.oidc_ca_file.is_file():
        parser.error(f"--oidc-ca-file {args.oidc_ca_file}: no such file")
    for flag, claim in (("--oidc-username-claim", args.oidc_username_claim),
                        ("--oidc-groups-claim", args.oidc_groups_claim)):
        if claim != claim.strip() or (flag == "--oidc-username-claim" and not claim):
            parser.error(f"{flag} {claim!r}: the name of a claim in the ID token, e.g. sub, "
                         "email or groups")
    return OidcSettings(
        issuer=issuer, client_id=args.oidc_client_id, client_secret=secret.decode(),
        ca_file=args.oidc_ca_file, username_claim=args.oidc_username_claim,
        username_prefix=args.oidc_username_prefix, groups_claim=args.oidc_groups_claim,
        groups_prefix=args.oidc_groups_prefix, extra_scopes=tuple(scopes),
        provider_name=args.oidc_provider_name, shared_renewals=args.oidc_shared_renewals,
        bearer_audiences=tuple(args.oidc_bearer_audience if args.oidc_bearer_audience is not None
                               else env_list("OIDC_BEARER_AUDIENCE")))


def settings_from_args(argv: Sequence[str] | None = None) -> RelaySettings:
    parser = build_parser()
    args = parser.parse_args(argv)
    token: str | None = None
    if args.api_token_file is not None:
        try:
            token = args.api_token_file.read_text().strip()
        except OSError as exc:
            parser.error(f"--api-token-file {args.api_token_file}: {exc.strerror}")
        if len(token) < 16:
            parser.error(f"--api-token-file {args.api_token_file}: the token must have at least "
                         "16 characters (generate one with: openssl rand -hex 32)")
    targets = args.target if args.target is not None else [
        parse_target_flag(v) for v in env_list("TARGET")]
    paths = args.targets if args.targets is not None else [Path(p) for p in env_list("TARGETS")]
    origins = (args.allowed_origin if args.allowed_origin is not None
               else env_list("ALLOWED_ORIGIN"))
    for name in ("max_sessions", "max_sessions_per_target", "kube_api_connections"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.connect_timeout <= 0:
        parser.error("--connect-timeout must be a positive number of seconds")
    if args.http_read_timeout <= 0:
        parser.error("--http-read-timeout must be a positive number of seconds")
    hosts = args.allowed_host if args.allowed_host is not None else env_list("ALLOWED_HOST")
    for host in hosts:
        if not SUBDOMAIN_RE.match(host.lower().rstrip(".")):
            parser.error(f"--allowed-host {host!r}: a DNS name like vnc.example.com, without "
                         "scheme or port")
    try:
        stall_timeout = parse_duration(args.stall_timeout, "--stall-timeout")
        shutdown_grace = parse_duration(args.shutdown_grace, "--shutdown-grace")
    except SpecError as exc:
        parser.error(str(exc))
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together: give both (or neither)")
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path is not None and not path.is_file():
            parser.error(f"{flag} {path}: no such file")
    if args.metrics_listen is not None and args.metrics_listen.port and args.metrics_listen in (
            args.listen, args.internal_listen):
        parser.error(f"--metrics-listen {args.metrics_listen}: give /metrics a port of its own "
                     "(not the --listen or --internal-listen one), e.g. 0.0.0.0:9090")
    peer_urls, peer_service = _peers(parser, args)
    return RelaySettings(
        peer_urls=peer_urls, peer_service=peer_service,
        tls_cert=args.tls_cert, tls_key=args.tls_key,
        auth=_auth_settings(parser, args, args.listen),
        kubeconfig=args.kubeconfig, kube_api_connections=args.kube_api_connections,
        lease_namespace=args.lease_namespace,
        identity=_check_identity(parser, args.identity),
        listen=args.listen, internal_listen=args.internal_listen, api_token=token,
        metrics_listen=args.metrics_listen,
        allowed_origins=tuple(o.rstrip("/") for o in origins), targets_paths=tuple(paths),
        targets=tuple(targets), log_format=args.log_format, log_level=args.log_level,
        deny_networks=_deny_networks(parser, args),
        reach=_reach(parser, args.address_grants),
        connect_timeout=args.connect_timeout, max_sessions=args.max_sessions,
        max_sessions_per_target=args.max_sessions_per_target, wait_for_sync=args.wait_for_sync,
        allowed_hosts=tuple(h.lower().rstrip(".") for h in hosts),
        http_read_timeout=args.http_read_timeout,
        stall_timeout=stall_timeout, shutdown_grace=shutdown_grace,
        recording=recording_settings_from_args(parser, args), roles=_roles(parser, args))


_ROLE_NAME = re.compile(r"[^\s/%]{1,253}")


def _roles(parser: argparse.ArgumentParser, args: argparse.Namespace) -> RoleNames:
    names = {}
    for attribute, flag, _ in ROLE_FLAGS:
        name = getattr(args, flag[2:].replace("-", "_"))
        if not _ROLE_NAME.fullmatch(name):  # Kubernetes' path segment names
            parser.error(f"{flag} {name!r}: the name of a ClusterRole, e.g. "
                         f"{getattr(RoleNames(), attribute)}")
        names[attribute] = name
    return RoleNames(**names)
