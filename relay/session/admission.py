"""Session admission: whether a viewer may start a session on a console, and the session's
life around the bridge. The relay's public port (relay/web/public.py) and the embedded bridge
(relay/embed.py) both admit through `Admission.serve`; they differ only in what they pass it:
who is asking and the authorization decision (`decide`), the consoles, the settings.

In order, the checks leak least: an earlier refusal of the caller's (bad headers, too many
failed tokens), shutting down, nobody signed in, no such console, the authorization decision,
then the limits (sessions of this relay, `maxViewers`, sessions per target). An admitted viewer
watches only when the route, the decision or `interactive: first` says so; a recorded route
needs the recorder; an exclusive console is claimed (or taken over, `?takeover=1`, as the
route's `takeover` allows). Every ending, refusals included, counts in `vncgate_sessions_total`
and writes one `session end` log line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from vncgate.common.model import Route
from vncgate.relay import closecodes
from vncgate.relay.metrics import RelayMetrics
from vncgate.relay.recording.service import Recorder, RecordingUnavailable
from vncgate.relay.session.bridge import Renew, Session, Sessions
from vncgate.relay.session.consoles import Consoles, Holder
from vncgate.relay.session.health import TargetHealth
from vncgate.relay.session.seats import KIND_CONTROL, KubeSeats, Seat
from vncgate.relay.session.serversecrets import CredentialStore
from vncgate.relay.session.vmconsole import KubeVirtDialer
from vncgate.relay.settings import RelaySettings

log = logging.getLogger("vncgate.session")

# A refusal: the close code and the reason the viewer sees.
Refusal = tuple[int, str]


@dataclass(frozen=True, slots=True)
class Applicant:
    """A viewer the caller's authorization allowed, and what its credential says."""

    label: str  # who, as logged and as other viewers see them
    user: str = ""  # who holds an exclusive console; `owner-only` takeovers compare it
    view_only: bool = False
    # The credential's expiry (epoch seconds; the session ends then, with this code and reason)
    # and its id (signing out ends the sessions opened with it).
    expires_at: float | None = None
    credential_id: str = ""
    # The users-file entry behind the credential, if any (its removal ends the session).
    account: str = ""
    expiry_code: int = closecodes.UNAUTHENTICATED
    expiry_reason: str = ""
    # Renews the credential at its expiry (an OpenID sign-in with a refresh token).
    renew: Renew | None = None


# The caller's authorization decision for a route: the applicant, or a refusal.
Decide = Callable[[Route], Awaitable[Applicant | Refusal]]
# The sessions of a route on the other replicas (relay/replicas.py); 0 for those not known.
Elsewhere = Callable[[Route], Awaitable[int]]


def counted_across_replicas(route: Route) -> bool:
    """Whether admitting to `route` depends on the viewers of every replica: `maxViewers`
    and `interactive: first` (an exclusive console has its Lease instead)."""
    policy = route.sessions
    return not policy.exclusive and (policy.max_viewers is not None
                                     or policy.interactive == "first")


class Admission:
    """Admits sessions to one set of `sessions` and `consoles` under one set of limits.

    `server` names this server in the reasons viewers read ("relay", or "server" for an
    application that embeds the bridge); `replica` is written into console holders.
    """

    def __init__(self, *, sessions: Sessions, consoles: Consoles, metrics: RelayMetrics,
                 settings: RelaySettings, closing: Callable[[], bool], server: str = "relay",
                 replica: str = "", recorder: Recorder | None = None,
                 logins: CredentialStore | None = None,
                 kubevirt: KubeVirtDialer | None = None,
                 elsewhere: Elsewhere | None = None,
                 health: TargetHealth | None = None,
                 seats: KubeSeats | None = None) -> None:
        self.sessions = sessions
        self.elsewhere = elsewhere
        # With Leases (relay/session/seats.py) maxViewers and interactive: first are seats
        # held across replicas; without, this process's sessions (plus `elsewhere`) decide.
        self.seats = seats
        self.consoles = consoles
        self.metrics = metrics
        self.settings = settings
        self.closing = closing
        self.server = server
        self.replica = replica
        self.recorder = recorder
        self.logins = logins
        self.kubevirt = kubevirt
        self.health = health

    def going_away(self) -> str:
        return f"the {self.server} is shutting down; reconnect in a moment"

    def console_taken(self, target: str, session_id: str, taker: Holder) -> None:
        """Another viewer took over an exclusive console: end this side's session on it."""
        session = self.sessions.find(target, session_id)
        if session is not None:
            session.stop(closecodes.CONFLICT,
                         f"taken over by {taker.user or taker.client or 'another viewer'}")

    async def serve(self, request: web.BaseRequest, ws: web.WebSocketResponse, *,
                    target: str, client: str, route: Route | None, decide: Decide,
                    refused: Refusal | None = None, signed_out: Refusal | None = None,
                    unknown: str = "", user: str = "",
                    on_refusal: Callable[[int, str], None] | None = None,
                    on_takeover: Callable[[Holder], None] | None = None) -> None:
        """Admit the viewer of the prepared WebSocket `ws` to `route`'s console and run the
        session to its end; or close `ws` with the refusal.

        `refused`: the caller has refused already; `signed_out`: the refusal when nobody is
        signed in (checked before the route, which it must not reveal); `unknown`: the reason
        when `route` is None; `user`: who asks, for the log line of a refusal; `on_refusal` and
        `on_takeover`: for the caller's audit log.
        """
        started = time.monotonic()
        labels = (route.namespace, route.name) if route is not None else ("", "")
        outcome, elsewhere = (refused, 0) if refused else await self._decision(
            route, decide, signed_out, unknown)
        if not isinstance(outcome, Applicant):
            code, reason = outcome
            if on_refusal is not None:
                on_refusal(code, reason)
            await self._refuse(ws, code, reason, target, client, user, labels, started)
            return
        assert route is not None
        await self._run(request, ws, route, outcome, client, on_takeover, elsewhere)

    async def _decision(self, route: Route | None, decide: Decide, signed_out: Refusal | None,
                        unknown: str) -> tuple[Applicant | Refusal, int]:
        """The applicant or the refusal, and the route's sessions on the other replicas."""
        outcome = await self._applicant(route, decide, signed_out, unknown)
        if not isinstance(outcome, Applicant):
            return outcome, 0
        assert route is not None
        elsewhere = 0
        if self.elsewhere is not None and self.seats is None and \
                counted_across_replicas(route):
            # Asked before this replica's own count is read, and nothing awaits between that
            # read and the session's start: concurrent viewers on this replica count each other.
            elsewhere = await self.elsewhere(route)
        return self.over_limit(route, elsewhere) or outcome, elsewhere

    async def _applicant(self, route: Route | None, decide: Decide, signed_out: Refusal | None,
                         unknown: str) -> Applicant | Refusal:
        if self.closing():
            return closecodes.GOING_AWAY, self.going_away()
        if signed_out is not None:
            return signed_out
        if route is None:
            return closecodes.UNKNOWN_TARGET, unknown or "no such console here"
        try:
            outcome = await decide(route)
        except Exception:  # the decision failed: refuse, and say where to look
            log.exception("deciding whether to admit a viewer to %s failed", route.key)
            return closecodes.INTERNAL_ERROR, f"internal error in the {self.server}; see its log"
        return outcome

    def over_limit(self, route: Route, elsewhere: int = 0) -> Refusal | None:
        """Whether one more session on `route` would break a limit, and which; `elsewhere`:
        its sessions on the other replicas (`maxViewers` is the relay's, not a replica's)."""
        settings, key = self.settings, route.key
        if self.sessions.count >= settings.max_sessions:
            return (closecodes.OVER_CAPACITY, f"the {self.server} is at its limit of "
                    f"{settings.max_sessions} sessions; try again later")
        count = self.sessions.count_for(key)
        viewers = route.sessions.max_viewers
        if viewers is not None and not route.sessions.exclusive and \
                count + elsewhere >= viewers:
            return closecodes.CONFLICT, f"{key} already has {viewers} viewers, its most"
        if count >= settings.max_sessions_per_target:
            return (closecodes.OVER_CAPACITY,
                    f"{key} has its limit of {settings.max_sessions_per_target} viewers; try later")
        return None

    async def _run(self, request: web.BaseRequest, ws: web.WebSocketResponse, route: Route,
                   applicant: Applicant, client: str,
                   on_takeover: Callable[[Holder], None] | None, elsewhere: int = 0) -> None:
        policy, labels = route.sessions, (route.namespace, route.name)
        seated = self.seats is not None and counted_across_replicas(route)
        view_only = route.view_only or applicant.view_only or (
            not seated and policy.interactive == "first"
            and self.sessions.count_for(route.key) + elsewhere > 0)
        session = Session(route=route, ws=ws, client=client, settings=self.settings,
                          metrics=self.metrics, request=request, user=applicant.label,
                          view_only=view_only,
                          idle_timeout=None if view_only else policy.idle_timeout,
                          max_duration=policy.max_duration, expires_at=applicant.expires_at,
                          expiry_code=applicant.expiry_code,
                          expiry_reason=applicant.expiry_reason,
                          credential_id=applicant.credential_id, account=applicant.account,
                          renew=applicant.renew,
                          logins=self.logins, kubevirt=self.kubevirt, health=self.health)
        if self.recorder is not None:
            try:
                session.recorder = self.recorder.for_session(session)
            except RecordingUnavailable as exc:
                await self._refuse(ws, closecodes.OVER_CAPACITY, str(exc), route.key, client,
                                   applicant.label, labels, session.started)
                return
        claimant = Holder(session_id=session.session_id, user=applicant.user, client=client,
                          since=session.started_at, replica=self.replica)
        if policy.exclusive:
            conflict = await self._claim(request, route, claimant, on_takeover)
            if conflict is not None:
                await self._refuse(ws, *conflict, route.key, client, applicant.label, labels,
                                   session.started)
                return
        seats: list[Seat] = []
        if seated:
            taken = await self._take_seats(route, claimant, may_type=not view_only)
            if not isinstance(taken, list):
                await self._refuse(ws, *taken, route.key, client, applicant.label, labels,
                                   session.started)
                return
            seats = taken
            if policy.interactive == "first" and not any(
                    seat.kind == KIND_CONTROL for seat in seats):
                session.view_only, session.idle_timeout = True, None  # another one types
        self.sessions.add(session)
        active = self.metrics.sessions_active.labels(*labels)
        active.inc()
        try:
            await session.run()
        finally:
            self.sessions.remove(session)
            active.dec()
            if policy.exclusive:
                await self._release(route, claimant)
            for seat in seats:
                await self._free_seat(seat)
            self._log_end(route.key, client, session.user,
                          session.code or closecodes.INTERNAL_ERROR, session.reason,
                          session.started, labels, session)

    async def _take_seats(self, route: Route, claimant: Holder, may_type: bool
                          ) -> list[Seat] | Refusal:
        """The seats a session of `route` holds across replicas: one of its `maxViewers`
        slots, and its control (`interactive: first`) when the session may type and nobody
        else has it; or the refusal: full (4409), or the API server cannot be asked (4503,
        fail closed: a limit that cannot be checked is not passed)."""
        assert self.seats is not None
        seats, policy = self.seats, route.sessions
        taken: list[Seat] = []
        try:
            # The slot first: a session refused for a full console must never have held the
            # control meanwhile (a viewer admitted then would watch with nobody typing).
            if policy.max_viewers is not None:
                slot = await seats.take_slot(route, claimant)
                if slot is None:
                    return (closecodes.CONFLICT,
                            f"{route.key} already has {policy.max_viewers} viewers, its most")
                taken.append(slot)
            if policy.interactive == "first" and may_type:
                control = await seats.take_control(route, claimant)
                if control is not None:
                    taken.append(control)
        except Exception as exc:  # the API is down: refuse rather than pass a limit unchecked
            log.error("could not take a seat on %s: %s", route.key, exc)
            for seat in taken:
                await self._free_seat(seat)
            return (closecodes.OVER_CAPACITY, f"could not check the viewers of {route.key}; "
                                              "try again in a moment")
        return taken

    async def _free_seat(self, seat: Seat) -> None:
        assert self.seats is not None
        try:
            await self.seats.release(seat)
        except Exception:  # retried by the seats' own loop; a dead replica's expire
            log.exception("could not release the seat %s", seat.name)

    async def _claim(self, request: web.BaseRequest, route: Route, claimant: Holder,
                     on_takeover: Callable[[Holder], None] | None) -> Refusal | None:
        """Make the claimant the holder of an exclusive console; else the refusal: held by
        another (4409), or the API server cannot be asked (4503: fail closed, and the viewer
        asks again; 4409 is final)."""
        policy = route.sessions
        wants_takeover = request.query.get("takeover") == "1"

        def may_take(holder: Holder) -> bool:
            return wants_takeover and may_take_over(policy.takeover, claimant, holder)

        try:
            holder = await self.consoles.acquire(route, claimant, may_take)
        except Exception:  # the API is down: refuse rather than allow two holders
            log.exception("could not claim %s", route.key)
            return (closecodes.UNAVAILABLE,
                    "could not check who holds this console; try again in a moment")
        if holder is None:
            if wants_takeover and on_takeover is not None:
                on_takeover(claimant)
            return None
        offer = "; you may take it over" if may_take_over(policy.takeover, claimant, holder) \
            else ""
        return closecodes.CONFLICT, f"in use by {holder.describe()}{offer}"

    async def _release(self, route: Route, claimant: Holder) -> None:
        try:
            await self.consoles.release(route, claimant)
        except Exception:  # the Lease expires with this replica's liveness if this failed
            log.exception("could not release %s", route.key)

    async def _refuse(self, ws: web.WebSocketResponse, code: int, reason: str, target: str,
                      client: str, user: str, labels: tuple[str, str], started: float) -> None:
        await ws.close(code=code, message=closecodes.clip_reason(reason).encode())
        self._log_end(target, client, user, code, reason, started, labels)

    def _log_end(self, target: str, client: str, user: str, code: int, reason: str,
                 started: float, labels: tuple[str, str], session: Session | None = None
                 ) -> None:
        self.metrics.sessions_total.labels(*labels, str(code)).inc()
        log.info("session end", extra={"fields": {
            "target": target, "client": client, "user": user, "code": code, "reason": reason,
            "bytes_to_server": session.to_server if session else 0,
            "bytes_to_client": session.to_client if session else 0,
            "duration_s": round(time.monotonic() - started, 3),
            "server_version": session.server_version if session else ""}})


def may_take_over(takeover: str, claimant: Holder, holder: Holder) -> bool:
    """Whether the route's `takeover` lets `claimant` take the console from `holder`."""
    return takeover == "allow" or (takeover == "owner-only" and bool(claimant.user)
                                   and holder.user == claimant.user)
