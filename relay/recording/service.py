"""The relay's recording service: which sessions are recorded, their metrics and audit lines.

One `Recorder` per relay (in `RelayState`) owns the writer thread; one `SessionRecorder` per
recorded session sits between the bridge and the file (the bridge calls `start`,
`server_data`, `client_data` and `close`; relay/recording/capture.py has the format and the tap).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from vncgate.common.model import Route
from vncgate.common.spec import RecordingPolicy
from vncgate.common.tasks import cancel_and_wait
from vncgate.relay import closecodes
from vncgate.relay.recording.capture import (
    FORMAT_VERSION,
    HEADER,
    Recording,
    RecordingWriter,
    RfbTap,
    recording_path,
    replay_handshake,
)
from vncgate.relay.recording.store import RecordingSettings, apply_retention, header_json
from vncgate.relay.rfb.security import RELAY_GREETING

audit = logging.getLogger("vncgate.audit")
RETENTION_INTERVAL = 600.0
log = logging.getLogger("vncgate.recording")


class RelayIdentity(Protocol):
    @property
    def identity(self) -> str: ...


class RecordedSession(Protocol):
    """What a recording reads of the session it records: the bridge's `Session` is one. The
    recording room needs no more of the session room than this (an import contract holds it)."""

    route: Route
    user: str
    client: str
    session_id: str
    started_at: float
    view_only: bool

    @property
    def settings(self) -> RelayIdentity: ...

    def stop(self, code: int, reason: str, *, abort_viewer: bool = False) -> None:
        """End the session (a recording that must go on cannot)."""


class RecordingUnavailable(Exception):
    """The target must be recorded but this relay cannot record (no --recording-dir)."""


class Recorder:
    def __init__(self, settings: RecordingSettings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.writer = RecordingWriter(on_failure=self._write_failed)
        self.started = Counter("vncgate_recordings", "Recordings started.", registry=registry)
        self.incomplete = Counter(
            "vncgate_recordings_incomplete",
            "Recordings cut short; reason: queue (the disk did not keep up) or error (a write "
            "failed, e.g. a full disk).", ["reason"], registry=registry)
        self.open_recordings: set[Recording] = set()
        self.active = Gauge("vncgate_recordings_active", "Recordings being written.",
                            registry=registry)

    def policy(self, route: Route) -> RecordingPolicy | None:
        """What to record of a route's sessions; None: nothing."""
        policy = route.recording
        if policy is None and self.settings.record_all:
            policy = RecordingPolicy(enabled=True)
        return policy if policy is not None and policy.enabled else None

    def for_session(self, session: RecordedSession) -> SessionRecorder | None:
        policy = self.policy(session.route)
        if policy is None:
            return None
        if self.settings.directory is None:
            raise RecordingUnavailable(
                f"{session.route.key} must be recorded, and this relay has no recording "
                "directory (--recording-dir); ask the administrator")
        path = recording_path(self.settings.directory, session.route.namespace,
                              session.route.name, session.started_at, session.session_id)
        return SessionRecorder(self, session, path, policy)

    async def retention(self, app: object) -> AsyncIterator[None]:
        """Apply --recording-max-age / --recording-max-total at start and every 10 minutes,
        off the event loop; files being written stay."""
        directory, settings = self.settings.directory, self.settings
        task = None
        if directory is not None and (settings.max_age or settings.max_total):
            task = asyncio.create_task(self._retention_loop(directory))
        yield
        await cancel_and_wait(task)

    async def _retention_loop(self, directory: Path) -> None:
        while True:
            keep = frozenset(r.path for r in self.open_recordings)
            try:
                removed = await asyncio.to_thread(apply_retention, directory,
                                                  self.settings.max_age, self.settings.max_total,
                                                  None, keep)
            except OSError as exc:
                log.warning("recording retention failed: %s", exc)
                removed = []
            for path in removed:
                audit.info("recording-deleted", extra={"fields": {
                    "event": "recording-deleted", "file": str(path), "by": "retention"}})
            await asyncio.sleep(RETENTION_INTERVAL)

    def _write_failed(self, recording: Recording, why: str) -> None:
        # The writer thread: Counter is thread-safe; the audit line comes from the session's
        # next record or its close (on the event loop).
        log.warning("writing %s failed: %s", recording.path, why)


class SessionRecorder:
    def __init__(self, recorder: Recorder, session: RecordedSession, path: Path,
                 policy: RecordingPolicy) -> None:
        self.recorder = recorder
        self.session = session
        self.policy = policy
        self.recording = Recording(recorder.writer, path, recorder.settings.queue_bytes,
                                   on_incomplete=self._incomplete)
        self.tap = RfbTap(self.recording.add, record_input=policy.input,
                          keyframe_interval=recorder.settings.keyframe_interval)
        self.opened = False

    def start(self, greeting: bytes, server_version: str) -> None:
        """The server greeted: write the header (raises FilterError for a server the tap
        cannot follow)."""
        self.tap.server_greeting(greeting)
        session = self.session
        self.recording.add(HEADER, header_json(
            format=FORMAT_VERSION, namespace=session.route.namespace, name=session.route.name,
            displayName=session.route.display_name, user=session.user, client=session.client,
            sessionId=session.session_id, relay=session.settings.identity,
            started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(session.started_at)),
            startedEpoch=session.started_at, serverVersion=server_version,
            input=self.policy.input, viewOnly=session.view_only))
        self.opened = True
        self.recorder.started.inc()
        self.recorder.active.inc()
        self.recorder.open_recordings.add(self.recording)

    def start_logged_in(self, viewer: bytes, server_init: bytes, server_version: str) -> None:
        """A session the relay logged in for (spec.credentials, spec.tls): the header, then the
        None handshake the relay played toward the viewer (`viewer`: the viewer's side of it)
        and the server's ServerInit. The server's own handshake is never shown to the tap."""
        self.start(RELAY_GREETING, server_version)
        replay_handshake(self.tap, viewer, server_init)

    def server_data(self, data: bytes | memoryview) -> None:
        if not self.recording.stopped:
            self.tap.server_data(data)

    @property
    def over_budget(self) -> bool:
        """More bytes wait for the disk than the budget: the session holds its sides back."""
        return self.recording.over_budget

    async def caught_up(self, stall: float) -> bool:
        """Wait until the writer has caught up; False, with the recording cut, when the disk
        stalled `stall` seconds or a write failed (a required recording ends its session)."""
        try:
            async with asyncio.timeout(stall):
                await self.recording.drained()
        except TimeoutError:
            self.recording.cut(f"the disk did not keep up for {stall:g}s "
                               f"({self.recording.pending} bytes waiting)")
            return False
        self.recording.check()
        return not self.recording.stopped

    def client_data(self, data: bytes) -> bytes:
        return self.tap.client_data(data)

    def close(self, code: int | None, reason: str) -> None:
        if not self.opened:
            return
        self.opened = False
        self.recording.close(code, reason)
        self.recorder.active.dec()
        self.recorder.open_recordings.discard(self.recording)

    def _incomplete(self, why: str) -> None:
        session = self.session
        reason = "error" if why.startswith("writing failed") else "queue"
        if self.policy.required:
            # Fail closed: a console that must be recorded is not used unrecorded.
            session.stop(closecodes.RECORDING_FAILED,
                         "this console must be recorded and its recording stopped; "
                         "ask the administrator")
        self.recorder.incomplete.labels(reason).inc()
        audit.warning("recording-incomplete", extra={"fields": {
            "event": "recording-incomplete", "target": session.route.key, "user": session.user,
            "client": session.client, "session": session.session_id,
            "file": str(self.recording.path), "reason": why}})

