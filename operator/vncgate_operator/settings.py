"""The operator's settings: one typed object, read once from flags and `VNCGATE_*` variables.

Every flag has an environment variable: `--relay-url` is `VNCGATE_RELAY_URL`. A repeatable flag
takes a comma-separated list from its variable. Flags win over variables.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from vncgate.common import installed_version
from vncgate.common.addresses import split_host_port
from vncgate.common.durations import parse_duration as _parse_duration
from vncgate.common.envflags import FlagParser, split_list, truthy
from vncgate.common.networks import parse_cidr
from vncgate.common.reach import ReachPolicy, load_grants
from vncgate.common.spec import LABEL_RE, SUBDOMAIN_RE
from vncgate.operator.policy import AddressPolicy, parse_host_pattern

DEFAULT_RELAY_PORT = 8081

# parse_args's readers: a flag over its variable; a repeatable flag over its list variable.
_Pick = Callable[[object, str], "str | None"]
_Many = Callable[["list[str] | None", str], "list[str]"]


def parse_duration(value: str | float) -> float:
    """Seconds from `30`, `30s`, `1.5s`, `500ms`, `5m`, `1h30m`, `1d` (vncgate.common.durations;
    a flag may give bare seconds)."""
    return _parse_duration(value, bare_seconds=True)


def parse_relay_service(value: str) -> tuple[str, str]:
    namespace, slash, name = value.strip().partition("/")
    if not slash or not LABEL_RE.match(namespace) or not LABEL_RE.match(name):
        raise ValueError(f"{value!r} is not NAMESPACE/NAME of the relay's headless Service, "
                         "e.g. vncgate/vncgate-relay-headless")
    return namespace, name


def parse_listen(value: str, what: str = "--metrics-listen") -> tuple[str, int]:
    """`HOST:PORT` or `[v6]:PORT` to listen on."""
    parts = split_host_port(value)
    if parts is None or not parts[0] or not parts[1].isdigit() or not 1 <= int(parts[1]) <= 65535:
        raise ValueError(f"{what} {value!r} is not HOST:PORT, e.g. 0.0.0.0:8083")
    return parts[0], int(parts[1])


def parse_url(value: str, what: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{what} {value!r} is not an http(s) URL, e.g. http://127.0.0.1:8081")
    return value.strip().rstrip("/")


@dataclass(frozen=True)
class OperatorSettings:
    # Empty: every namespace (kopf's cluster-wide mode).
    namespaces: tuple[str, ...] = ()
    # The relay's headless Service (discovery), or a fixed list of internal URLs; exactly one.
    relay_service: tuple[str, str] | None = None
    relay_urls: tuple[str, ...] = ()
    api_token: str = ""
    public_url: str | None = None
    policy: AddressPolicy = field(default_factory=AddressPolicy)
    resync_interval: float = 60.0
    probe_interval: float = 30.0
    probe_timeout: float = 3.0
    probe_concurrency: int = 64
    cluster_domain: str = "cluster.local"
    relay_port: int = DEFAULT_RELAY_PORT
    relay_timeout: float = 5.0
    # Seconds for one status patch or Event post by the operator's own API client.
    api_timeout: float = 10.0
    # Seconds that a relay outage delays the retry of a registration (kopf.TemporaryError).
    retry_delay: float = 10.0
    liveness_endpoint: str | None = "http://127.0.0.1:8082/healthz"
    peering_name: str = "vncgate"
    standalone: bool = False
    # A VncTarget for every KubeVirt VirtualMachine labelled vncgate.io/console=true.
    kubevirt_discovery: bool = False
    priority: int = 0
    log_format: str = "text"
    verbose: bool = False
    # Where /metrics (Prometheus) is served, as (host, port); None: not served.
    metrics_listen: tuple[str, int] | None = None
    # The relay's ServiceAccount (NS, NAME): targets with spec.credentials / spec.tls are checked
    # with a SubjectAccessReview (may it read their Secret?); None: not checked.
    relay_service_account: tuple[str, str] | None = None
    relay_credentials_role: str = "vncgate-relay-credentials"
    # Which namespaces may name which networks in endpoint.address (--address-grants FILE);
    # not enforced without the file.
    reach: ReachPolicy = field(default_factory=ReachPolicy)
    # The validating admission webhook (the deputy rule, admission.py): where it listens, and
    # its certificate and key (PEM files, re-read when they change); None: not served.
    webhook_listen: tuple[str, int] | None = None
    webhook_cert_file: str | None = None
    webhook_key_file: str | None = None

    def target_url(self, namespace: str, name: str) -> str | None:
        """`status.url`: where a browser opens this target, if the public URL is known."""
        if not self.public_url:
            return None
        return f"{self.public_url}/t/{namespace}/{name}/"


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(
        prog="vncgate-operator",
        description="Turn VncTarget resources into routes on every vncgate relay replica.",
        epilog="Every flag is also an environment variable: --relay-url is VNCGATE_RELAY_URL "
               "(comma-separated for repeatable flags).")
    add = parser.add_argument
    add("--version", action="version", version=f"%(prog)s {installed_version()}")
    add("--namespace", action="append", metavar="NS",
        help="watch this namespace (repeatable); default: all namespaces")
    add("--relay-service", metavar="NS/NAME",
        help="the relay's headless Service: replicas are found through its EndpointSlices")
    add("--relay-service-account", metavar="NS/NAME",
        help="the relay's ServiceAccount: the operator asks the API server (SubjectAccessReview) "
             "whether it may read each target's credentials Secret, and says so in status")
    add("--relay-credentials-role", metavar="NAME",
        help="the ClusterRole that a namespace binds to let the relay read its Secrets "
             "(named in the condition's advice; default vncgate-relay-credentials)")
    add("--relay-url", action="append", metavar="URL",
        help="a relay replica's internal URL, e.g. http://127.0.0.1:8081 (repeatable; instead "
             "of --relay-service, for development and operators outside the cluster)")
    add("--relay-port", type=int, metavar="PORT",
        help=f"the relays' internal port when the Service names no port 'internal' "
             f"(default {DEFAULT_RELAY_PORT})")
    add("--api-token-file", metavar="PATH", help="the relays' registration token")
    add("--public-url", metavar="URL",
        help="the relay's public base URL, e.g. https://vnc.example.com (for status.url)")
    add("--allow-cidr", action="append", metavar="CIDR",
        help="allow endpoint.address in this network (repeatable; replaces the default policy)")
    add("--allow-host", action="append", metavar="PATTERN",
        help="allow endpoint.address host names matching this glob, e.g. *.bmc.lab.example "
             "(repeatable; replaces the default policy)")
    add("--address-grants", metavar="FILE",
        help="the network-reach policy: a YAML file of grants (namespaces -> cidrs, hosts, "
             "ports) that endpoint.address must fall within; default: not enforced")
    add("--webhook-listen", metavar="HOST:PORT",
        help="serve the validating admission webhook for VncTargets (HTTPS) on this address, "
             "e.g. 0.0.0.0:8443; default: not served")
    add("--webhook-cert-file", metavar="PATH",
        help="the webhook's TLS certificate (PEM); without it and --webhook-key-file kopf makes "
             "a self-signed one (development only; needs the certbuilder package)")
    add("--webhook-key-file", metavar="PATH", help="the webhook's TLS private key (PEM)")
    add("--resync-interval", metavar="DURATION",
        help="how often every replica's table is compared and repaired (default 60s)")
    add("--probe-interval", metavar="DURATION",
        help="how often each endpoint is probed for its RFB greeting (default 30s)")
    add("--probe-timeout", metavar="DURATION", help="connect + greeting timeout (default 3s)")
    add("--probe-concurrency", type=int, metavar="N", help="probes at once at most (default 64)")
    add("--cluster-domain", metavar="DOMAIN",
        help="the cluster's DNS domain (default cluster.local)")
    add("--liveness", metavar="URL",
        help="kopf's liveness endpoint (default http://127.0.0.1:8082/healthz; 'off' disables)")
    add("--peering", metavar="NAME",
        help="kopf peering name (default vncgate); used when a KopfPeering object of that name "
             "exists, so a debugging operator with a higher --priority pauses this one")
    add("--priority", type=int, metavar="N", help="kopf peering priority (default 0)")
    add("--standalone", action="store_true", default=None, help="ignore kopf peering")
    add("--kubevirt-discovery", action="store_true", default=None,
        help="create a VncTarget (owned by the VM, deleted with it) for every KubeVirt "
             "VirtualMachine labelled vncgate.io/console=true")
    add("--metrics-listen", metavar="HOST:PORT",
        help="serve Prometheus metrics (handler runs, errors, latency; process metrics) on "
             "this address, e.g. 0.0.0.0:8083; default: not served")
    add("--log-format", choices=("text", "json"), help="log line format (default text)")
    add("--verbose", action="store_true", default=None, help="debug logging")
    return parser


def parse_args(argv: Sequence[str] | None = None,
               environ: Mapping[str, str] | None = None) -> OperatorSettings:
    """Settings from flags over `VNCGATE_*` variables; exits with a usage error on bad values."""
    parser = build_parser()
    args = parser.parse_args(argv)
    env = os.environ if environ is None else environ

    def pick(flag: object, var: str) -> str | None:
        return str(flag) if flag is not None else env.get(f"VNCGATE_{var}")

    def many(flag: list[str] | None, var: str) -> list[str]:
        return list(flag) if flag else split_list(env.get(f"VNCGATE_{var}"))

    try:
        return _build(args, pick, many)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def _build(args: argparse.Namespace, pick: _Pick, many: _Many) -> OperatorSettings:
    namespaces = tuple(many(args.namespace, "NAMESPACE"))
    for ns in namespaces:
        if not LABEL_RE.match(ns):
            raise ValueError(f"--namespace {ns!r} is not a namespace name")
    relay_service_text = pick(args.relay_service, "RELAY_SERVICE")
    relay_service = parse_relay_service(relay_service_text) if relay_service_text else None
    relay_urls = tuple(parse_url(u, "--relay-url") for u in many(args.relay_url, "RELAY_URL"))
    if relay_service and relay_urls:
        raise ValueError("give either --relay-service (discovery in a cluster) or --relay-url "
                         "(a fixed list), not both")
    if not relay_service and not relay_urls:
        raise ValueError("tell the operator where the relays are: --relay-service NS/NAME of "
                         "their headless Service, or --relay-url http://HOST:8081 (repeatable)")
    token_file = pick(args.api_token_file, "API_TOKEN_FILE")
    if not token_file:
        raise ValueError("--api-token-file is required: the relays refuse registrations "
                         "without their token")
    token = Path(token_file).read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"--api-token-file {token_file}: the file is empty")
    public_url = pick(args.public_url, "PUBLIC_URL")
    domain = (pick(args.cluster_domain, "CLUSTER_DOMAIN") or "cluster.local").strip(".").lower()
    if not SUBDOMAIN_RE.match(domain):
        raise ValueError(f"--cluster-domain {domain!r} is not a DNS domain")
    liveness = pick(args.liveness, "LIVENESS")
    concurrency = int(pick(args.probe_concurrency, "PROBE_CONCURRENCY") or 64)
    if concurrency < 1:
        raise ValueError("--probe-concurrency must be at least 1")
    relay_port = int(pick(args.relay_port, "RELAY_PORT") or DEFAULT_RELAY_PORT)
    if not 1 <= relay_port <= 65535:
        raise ValueError(f"--relay-port {relay_port} is not a TCP port")
    grants = pick(args.address_grants, "ADDRESS_GRANTS")
    webhook = pick(args.webhook_listen, "WEBHOOK_LISTEN")
    cert_file = pick(args.webhook_cert_file, "WEBHOOK_CERT_FILE")
    key_file = pick(args.webhook_key_file, "WEBHOOK_KEY_FILE")
    if bool(cert_file) != bool(key_file):
        raise ValueError("give both --webhook-cert-file and --webhook-key-file, or neither")
    for path in (cert_file, key_file):
        if path and not Path(path).is_file():
            raise ValueError(f"webhook certificate or key {path}: no such file")
    return OperatorSettings(
        namespaces=namespaces,
        relay_service=relay_service,
        relay_urls=relay_urls,
        api_token=token,
        public_url=parse_url(public_url, "--public-url") if public_url else None,
        policy=AddressPolicy(
            allow_cidrs=tuple(parse_cidr(c, "--allow-cidr")
                              for c in many(args.allow_cidr, "ALLOW_CIDR")),
            allow_hosts=tuple(parse_host_pattern(h) for h in many(args.allow_host, "ALLOW_HOST")),
        ),
        resync_interval=parse_duration(pick(args.resync_interval, "RESYNC_INTERVAL") or "60s"),
        probe_interval=parse_duration(pick(args.probe_interval, "PROBE_INTERVAL") or "30s"),
        probe_timeout=parse_duration(pick(args.probe_timeout, "PROBE_TIMEOUT") or "3s"),
        probe_concurrency=concurrency,
        cluster_domain=domain,
        relay_port=relay_port,
        liveness_endpoint=None if liveness == "off" else (liveness or
                                                          OperatorSettings.liveness_endpoint),
        peering_name=pick(args.peering, "PEERING") or "vncgate",
        standalone=bool(args.standalone) or truthy(pick(None, "STANDALONE")),
        kubevirt_discovery=bool(args.kubevirt_discovery) or truthy(
            pick(None, "KUBEVIRT_DISCOVERY")),
        priority=int(pick(args.priority, "PRIORITY") or 0),
        log_format=pick(args.log_format, "LOG_FORMAT") or "text",
        verbose=bool(args.verbose) or truthy(pick(None, "VERBOSE")),
        metrics_listen=parse_listen(metrics) if (metrics := pick(args.metrics_listen,
                                                                 "METRICS_LISTEN")) else None,
        relay_service_account=parse_relay_service(account) if (account := pick(
            args.relay_service_account, "RELAY_SERVICE_ACCOUNT")) else None,
        relay_credentials_role=pick(args.relay_credentials_role,
                                    "RELAY_CREDENTIALS_ROLE") or "vncgate-relay-credentials",
        reach=load_grants(grants) if grants else ReachPolicy(),
        webhook_listen=parse_listen(webhook, "--webhook-listen") if webhook else None,
        webhook_cert_file=cert_file or None,
        webhook_key_file=key_file or None,
    )
