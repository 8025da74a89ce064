"""What the public and internal apps of one relay share."""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field

from aiohttp import web

from vncgate.common.kube import KubeClient, KubeConnection, KubePool, kube_connection
from vncgate.common.model import Route
from vncgate.relay import closecodes
from vncgate.relay.access.authz import (
    REVIEW_SENT_TIMEOUT,
    Authorizer,
    KubernetesAuthorizer,
    ManifestAuthorizer,
    OpenAuthorizer,
)
from vncgate.relay.access.cookies import Revoked, revocation_key
from vncgate.relay.access.identity import AuthMode
from vncgate.relay.access.oidc import OidcClient
from vncgate.relay.access.passwords import KeyDerivations
from vncgate.relay.access.ratelimit import FailureLimiter
from vncgate.relay.access.renewals import Renewals
from vncgate.relay.access.tokenreview import TokenReviewer
from vncgate.relay.access.users import UsersFile
from vncgate.relay.metrics import RelayMetrics
from vncgate.relay.recording.service import Recorder
from vncgate.relay.replicas import (
    KubeLinkClaims,
    KubeMarks,
    KubeRenewalLedger,
    LinkClaims,
    LocalLinkClaims,
    Revocations,
    SignInLimits,
    ViewerCounts,
)
from vncgate.relay.session.admission import Admission, counted_across_replicas
from vncgate.relay.session.bridge import Sessions
from vncgate.relay.session.consoles import Consoles, Holder, KubeConsoles, LocalConsoles
from vncgate.relay.session.health import TargetHealth
from vncgate.relay.session.peers import Peers
from vncgate.relay.session.registry import Registry
from vncgate.relay.session.seats import KubeSeats
from vncgate.relay.session.serversecrets import CredentialStore
from vncgate.relay.session.thumbnails import Thumbnails
from vncgate.relay.session.vmconsole import KubeVirtDialer
from vncgate.relay.settings import RelaySettings, host_names

log = logging.getLogger("vncgate.relay")

class RelayKube:
    """The relay's way to the Kubernetes API: its credentials, loaded once on first use, and its
    bounded pools of kept-alive connections, one per kind of work so that no kind can starve
    another:

    - `reviews`: the access reviews a viewer's set-up waits for (SubjectAccessReviews,
      TokenReviews), --kube-api-connections of them: a burst of viewers (a reconnect storm)
      queues here;
    - `pool`: the relay's own requests (Leases of consoles and seats, link claims, sign-outs,
      Secrets, peer discovery), --kube-api-connections more;
    - `liveness`: one connection for this replica's liveness Lease alone: if its renewal waited
      behind a storm's reviews, the replica would think itself cut off and end every seated
      session (seen in bench.scale at 10 relays, before the pools were split)."""

    def __init__(self, settings: RelaySettings) -> None:
        self._kubeconfig = settings.kubeconfig
        self._connection: KubeConnection | None = None
        self.reviews = KubePool(settings.kube_api_connections)
        self.pool = KubePool(settings.kube_api_connections)
        self.liveness = KubePool(1)

    def connection(self) -> KubeConnection:
        """KubeConfigError without credentials (tried again at the next call)."""
        if self._connection is None:
            self._connection = kube_connection(self._kubeconfig)
        return self._connection

    def client(self, pool: KubePool | None = None, sent_timeout: float | None = None
               ) -> KubeClient:
        """A client of `pool` (the relay's own requests' by default); `sent_timeout`: see
        KubeClient."""
        return KubeClient(self.connection(), pool=pool or self.pool, sent_timeout=sent_timeout)

    async def close(self) -> None:
        """After every user of the pools has stopped (their own close() leaves them open)."""
        for pool in (self.reviews, self.pool, self.liveness):
            await pool.close()


def make_authorizer(settings: RelaySettings, kube: RelayKube) -> Authorizer:
    if settings.auth.mode == AuthMode.NONE:
        return OpenAuthorizer()
    if settings.auth.authorization == "kubernetes":
        return KubernetesAuthorizer(kube.client(kube.reviews, sent_timeout=REVIEW_SENT_TIMEOUT),
                                    roles=settings.roles)
    return ManifestAuthorizer()


def make_token_reviewer(settings: RelaySettings, kube: RelayKube) -> TokenReviewer | None:
    if not settings.auth.kubernetes_tokens or settings.auth.mode == AuthMode.NONE:
        return None
    return TokenReviewer(kube.client(kube.reviews, sent_timeout=REVIEW_SENT_TIMEOUT),
                         settings.auth.token_audiences)


def make_peers(settings: RelaySettings, kube: RelayKube) -> Peers:
    client = kube.client() if settings.peer_service is not None else None
    return Peers(settings.api_token, settings.identity, settings.peer_urls,
                 settings.peer_service, client)


def make_marks(settings: RelaySettings, kube: RelayKube) -> KubeMarks | None:
    """The Leases that keep used links and sign-outs across replicas (with --lease-namespace)."""
    if not settings.lease_namespace:
        return None
    return KubeMarks(kube.client(), settings.lease_namespace, settings.identity)


def make_consoles(settings: RelaySettings, kube: RelayKube) -> Consoles:
    if settings.lease_namespace:
        return KubeConsoles(kube.client(), settings.lease_namespace, settings.identity,
                            liveness=kube.client(kube.liveness))
    return LocalConsoles()


@dataclass
class RelayState:
    settings: RelaySettings
    registry: Registry = field(default_factory=Registry)
    sessions: Sessions = field(default_factory=Sessions)
    metrics: RelayMetrics = field(default_factory=RelayMetrics.create)
    shutting_down: bool = False
    # The Kubernetes API: credentials and the connections every client below shares.
    kube: RelayKube = field(init=False)
    authorizer: Authorizer = field(init=False)
    session_key: bytes = field(init=False)
    # Failed sign-ins, bearer tokens and share links per client address; sign-ins per account;
    # bearer tokens and share links overall; sign-ins per device cookie (a browser that signed
    # in as that user before, counted apart so guesses from elsewhere never keep it out).
    login_failures: FailureLimiter = field(default_factory=FailureLimiter)
    account_failures: FailureLimiter = field(
        default_factory=lambda: FailureLimiter(limit=10, window=300.0))
    bearer_failures: FailureLimiter = field(
        default_factory=lambda: FailureLimiter(limit=100, window=60.0))
    device_failures: FailureLimiter = field(
        default_factory=lambda: FailureLimiter(limit=5, window=300.0))
    # scrypt runs here, off the event loop.
    derivations: KeyDerivations = field(default_factory=KeyDerivations)
    # Sign-in cookies signed out of before their expiry.
    revoked: Revoked = field(default_factory=Revoked)
    # Single-use links already exchanged, on any replica (relay/replicas.py).
    link_claims: LinkClaims = field(init=False)
    # Sign-outs told to the peers and kept in the API server (relay/replicas.py).
    revocations: Revocations = field(init=False)
    # The failed sign-ins above, counted with every replica's (relay/replicas.py).
    sign_in_limits: SignInLimits = field(init=False)
    # Viewers of a target on the other replicas (maxViewers, interactive: first, the list).
    viewer_counts: ViewerCounts = field(init=False)
    # The Leases behind both (None standalone: they live in this process).
    marks: KubeMarks | None = field(init=False)
    consoles: Consoles = field(init=False)
    # maxViewers slots and interactive: first control as Leases (None standalone).
    seats: KubeSeats | None = field(init=False)
    # Host names the public port answers to (None: any); see relay.settings.host_names.
    host_names: frozenset[str] | None = field(init=False)
    # Session recordings (relay/recording/service.py): the writer thread and its metrics.
    recorder: Recorder = field(init=False)
    # What the relay answers VNC servers' security with (spec.credentials / spec.tls).
    logins: CredentialStore = field(init=False)
    # Kubernetes bearer tokens (--kubernetes-tokens): TokenReviews; None when off.
    token_reviewer: TokenReviewer | None = field(init=False)
    # The users file (--users-file), re-read when it changes.
    users: UsersFile = field(init=False)
    # The OpenID provider (--auth oidc): discovery, keys, ID token checks; None otherwise.
    oidc: OidcClient | None = field(init=False)
    # Renewals of OpenID sign-ins with refresh tokens (relay/access/renewals.py).
    renewals: Renewals | None = field(init=False)
    # The other replicas, asked for their sessions (kubectl vnc sessions / kill).
    peers: Peers = field(init=False)
    # Opens endpoint.kubevirt consoles through the API server (credentials loaded on first use).
    kubevirt: KubeVirtDialer = field(init=False)
    # What this replica's sessions found when they connected: the console list's status.
    health: TargetHealth = field(default_factory=TargetHealth)
    # The console list's thumbnails (spec.thumbnail), made on request and kept 30 s.
    thumbnails: Thumbnails = field(init=False)
    # Who may start a session, and each session's life around the bridge.
    admission: Admission = field(init=False)

    def __post_init__(self) -> None:
        self.registry.add_listener(self._route_changed)
        self.kube = RelayKube(self.settings)
        self.authorizer = make_authorizer(self.settings, self.kube)
        # Without --session-secret-file a fresh key per process: logins end at a restart and
        # do not carry across replicas (the CLI warns).
        self.session_key = self.settings.auth.session_secret or secrets.token_bytes(32)
        self.consoles = make_consoles(self.settings, self.kube)
        self.seats = None
        if isinstance(self.consoles, KubeConsoles):
            self.seats = KubeSeats(self.consoles)
            self.consoles.on_lost = self.end_held_sessions
        self.host_names = host_names(self.settings)
        self.recorder = Recorder(self.settings.recording, self.metrics.registry)
        self.logins = CredentialStore(self.settings, self.kube.client)
        self.thumbnails = Thumbnails(self.settings, self.logins, self.health)
        self.token_reviewer = make_token_reviewer(self.settings, self.kube)
        self.users = UsersFile(self.settings.auth.users_file, self.settings.auth.users)
        self.oidc = (OidcClient(self.settings.auth.oidc)
                     if self.settings.auth.mode == AuthMode.OIDC and self.settings.auth.oidc
                     else None)
        self.peers = make_peers(self.settings, self.kube)
        self.marks = make_marks(self.settings, self.kube)
        self.renewals = None
        if self.oidc is not None:
            shared = self.marks is not None and self.oidc.settings.shared_renewals
            self.renewals = Renewals(self.oidc, ledger=KubeRenewalLedger(
                self.marks, self.session_key) if shared and self.marks is not None else None)
        self.link_claims = (KubeLinkClaims(self.marks) if self.marks is not None
                            else LocalLinkClaims())
        self.revocations = Revocations(
            self.revoked, self.peers, self.marks,
            lambda key: self.end_sessions_of_key(key, closecodes.UNAUTHENTICATED,
                                                 "you signed out"))
        self.viewer_counts = ViewerCounts(self.peers)
        self.sign_in_limits = SignInLimits(self.peers, {
            "login": self.login_failures, "account": self.account_failures,
            "device": self.device_failures, "bearer": self.bearer_failures})
        self.kubevirt = KubeVirtDialer(self.kube.connection)
        self.admission = Admission(
            sessions=self.sessions, consoles=self.consoles, metrics=self.metrics,
            settings=self.settings, closing=lambda: self.shutting_down,
            replica=self.settings.identity, recorder=self.recorder, logins=self.logins,
            kubevirt=self.kubevirt, health=self.health, seats=self.seats,
            elsewhere=lambda route: self.viewer_counts.of_target(route.namespace, route.name))

    def console_taken(self, target: str, session_id: str, taker: Holder) -> None:
        """Another viewer took over an exclusive console: end this replica's session on it."""
        self.admission.console_taken(target, session_id, taker)

    def end_held_sessions(self) -> None:
        """This replica's liveness Lease may have expired: end its sessions on exclusive
        consoles and on seats (maxViewers, interactive: first), which others may take now."""
        for session in list(self.sessions):
            route = session.route
            if route.sessions.exclusive or counted_across_replicas(route):
                session.stop(closecodes.OVER_CAPACITY, "this relay lost its hold on the console "
                                                       "(the Kubernetes API); reconnect")

    def end_sessions_of(self, credential_id: str, code: int, reason: str) -> None:
        """Close the sessions opened with one credential (a signed-out cookie)."""
        self.end_sessions_of_key(revocation_key(credential_id), code, reason)

    async def end_sign_in(self, credential_id: str, ends: float, reason: str) -> None:
        """End one sign-in everywhere (a sign-out, or a renewal the provider refused): its
        cookie is refused even if replayed and its consoles close (4401 with `reason`) here at
        once, on the peers when they are told, and on every replica (restarted ones too) from
        the Lease that keeps the revocation until the cookie (valid until `ends`) expires."""
        if self.renewals is not None:
            self.renewals.forget(credential_id)
        self.end_sessions_of(credential_id, closecodes.UNAUTHENTICATED, reason)
        missing = await self.revocations.revoke(credential_id, max(ends, time.time() + 1))
        if missing:
            log.warning("an ended sign-in could not be told to every replica; they learn it "
                        "from the API server", extra={"fields": {"peers": missing}})

    def end_sessions_of_key(self, key: str, code: int, reason: str) -> None:
        """Close the sessions whose credential has this revocation key (from any replica)."""
        for session in self.sessions:
            if session.credential_id and revocation_key(session.credential_id) == key:
                session.stop(code, reason)

    async def start_shared(self) -> None:
        """Read what the replicas share (before serving: a failure stops the start)."""
        await self.revocations.start()
        if self.seats is not None:
            await self.seats.start()

    async def close_shared(self) -> None:
        await self.revocations.close()
        if self.seats is not None:
            await self.seats.close()
        if self.marks is not None:
            await self.marks.client.close()

    def reload_users(self) -> None:
        """Re-read the users file if it changed; the sessions of users removed from it (or
        given another secret) end. Their cookies and tokens stop working with the new file."""
        for name in self.users.reload():
            for session in list(self.sessions):
                if session.account == name:
                    session.stop(closecodes.UNAUTHENTICATED,
                                 "your account was removed or its secret changed; sign in again")

    def _route_changed(self, old: Route, new: Route | None) -> None:
        """Sessions follow their route: removed -> closed; endpoint changed -> reconnect."""
        if new is None or (old.host, old.port, old.kubevirt, old.credentials, old.tls) != (
                new.host, new.port, new.kubevirt, new.credentials, new.tls):
            self.logins.forget(old.key)  # said of another server or credential
            self.health.forget(old.key)
        if new is None or new != old:
            self.thumbnails.forget(old.key)
        if new is None:
            for session in self.sessions.for_target(old.key):
                session.stop(closecodes.UNKNOWN_TARGET, f"{old.key} was removed")
            with contextlib.suppress(KeyError):  # a route nobody opened has no series
                self.metrics.sessions_active.remove(old.namespace, old.name)
        elif (old.host, old.port, old.kubevirt, old.view_only, old.sessions) != (
                new.host, new.port, new.kubevirt, new.view_only, new.sessions):
            for session in self.sessions.for_target(old.key):
                session.stop(closecodes.SERVICE_RESTART,
                             f"{old.key} changed its endpoint or access; reconnect")


STATE = web.AppKey("vncgate_state", RelayState)
