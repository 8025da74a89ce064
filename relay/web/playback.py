"""Playback of session recordings in the browser: the list, the player page, the file.

- `GET /recordings/` lists the recordings the signed-in person may see: per target, the
  authorizer decides (`get` on `vnctargets/recordings` by SubjectAccessReview in a cluster,
  `spec.access` standalone; relay/access/authz.py). Others' recordings are not listed.
- `GET /recordings/<namespace>/<name>/<stamp>/` is the player page; its script
  (static/novnc/playback.js) fetches
- `GET /recordings/<namespace>/<name>/<stamp>/file`: the recording file as written (gzip, no
  Content-Encoding), which the browser decompresses and feeds to noVNC itself. No VNC server
  and no WebSocket take part: the relay only serves a file.

Who may not see a recording gets 403 whether or not it exists (the decision comes first), and
404 only when they may see the target's recordings and this one is not there. Every served file
is an audit line (`event=recording-view`).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from aiohttp import web

from vncgate.common.spec import SpecError, check_name, check_namespace
from vncgate.relay.access.authz import Decision
from vncgate.relay.access.identity import Identity
from vncgate.relay.recording.store import Summary, SummaryCache, iter_files, path_of
from vncgate.relay.state import STATE, RelayState
from vncgate.relay.web.audit import audit_event
from vncgate.relay.web.origin import check_host
from vncgate.relay.web.pages import render_page
from vncgate.relay.web.requester import identify

LIST_CONCURRENCY = 20


SUMMARIES = web.AppKey("recording summaries", SummaryCache)


def add_routes(app: web.Application) -> None:
    app[SUMMARIES] = SummaryCache()
    app.router.add_get("/recordings", _to_list)
    app.router.add_get("/recordings/", recordings_list)
    app.router.add_get("/recordings/{namespace}/{name}/{stamp}/", player)
    app.router.add_get("/recordings/{namespace}/{name}/{stamp}/file", recording_file)


def _directory(state: RelayState) -> Path:
    directory = state.settings.recording.directory
    if directory is None:
        raise web.HTTPNotFound(text="this relay keeps no recordings (no --recording-dir)\n")
    return directory


async def _who(request: web.Request) -> Identity:
    state = request.app[STATE]
    check_host(request)
    identity = await identify(request)
    if identity is None:
        if state.settings.auth.mode in ("token", "oidc"):
            raise web.HTTPFound(location=_login_path(request))
        raise web.HTTPUnauthorized(text="sign in through the proxy in front of this relay\n")
    return identity


def _login_path(request: web.Request) -> str:
    # Relative to the page, so it stays under whatever prefix the Ingress adds.
    depth = request.path.count("/") - 1
    return "../" * depth + "login?next=" + request.path.lstrip("/")


async def _decide(state: RelayState, identity: Identity, namespace: str, name: str) -> Decision:
    return await state.authorizer.decide_recordings(identity, namespace, name,
                                                    state.registry.get(namespace, name))


async def _to_list(request: web.Request) -> web.StreamResponse:
    check_host(request)
    raise web.HTTPFound(location="recordings/")


async def recordings_list(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    identity = await _who(request)
    directory = _directory(state)
    files = await asyncio.to_thread(lambda: list(iter_files(directory)))
    targets = sorted({(p.parent.parent.name, p.parent.name) for p in files})
    allowed: set[tuple[str, str]] = set()
    for start in range(0, len(targets), LIST_CONCURRENCY):
        batch = targets[start:start + LIST_CONCURRENCY]
        decisions = await asyncio.gather(*(_decide(state, identity, ns, n) for ns, n in batch))
        allowed.update(t for t, d in zip(batch, decisions, strict=True) if d.allowed)
    visible = [p for p in files if (p.parent.parent.name, p.parent.name) in allowed]
    cache = request.app[SUMMARIES]
    cache.keep_only(files)
    summaries = await asyncio.to_thread(_summaries, cache, directory, visible)
    rows = [_row(s) for s in sorted(summaries, key=lambda s: s.header.get("startedEpoch", 0),
                                    reverse=True)]
    return render_page(request, "recordings.html", {"rows": rows, "user": identity.label})


def _summaries(cache: SummaryCache, directory: Path, paths: list[Path]) -> list[Summary]:
    found = []
    for path in paths:
        try:
            found.append(cache.summary(directory, path))
        except (OSError, ValueError):  # deleted meanwhile, or not a recording
            continue
    return found


def _row(summary: Summary) -> dict[str, object]:
    end = summary.end or {}
    millis = end.get("durationMs")
    return {"id": summary.id, "target": f"{summary.namespace}/{summary.name}",
            "label": summary.header.get("displayName") or summary.name,
            "user": summary.header.get("user") or "(anonymous)",
            "started": summary.header.get("started", ""),
            "duration": _duration(millis) if isinstance(millis, int) else "",
            "state": summary.state, "input": bool(summary.header.get("input")),
            "size": summary.size}


def _duration(millis: int) -> str:
    seconds = millis // 1000
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


async def _recording(request: web.Request) -> tuple[str, Path, Identity]:
    """The id and file of the request, once the person may see it: 403 before 404."""
    state = request.app[STATE]
    identity = await _who(request)
    directory = _directory(state)
    namespace, name = request.match_info["namespace"], request.match_info["name"]
    recording_id = f"{namespace}/{name}/{request.match_info['stamp']}"
    try:
        check_namespace(namespace, "namespace")
        check_name(name, "name")
        path = path_of(directory, recording_id)
    except (SpecError, ValueError) as exc:
        raise web.HTTPNotFound(text=f"no such recording: {exc}\n") from None
    decision = await _decide(state, identity, namespace, name)
    if decision.unavailable:
        raise web.HTTPServiceUnavailable(text=decision.reason + "\n")
    if not decision.allowed:
        audit_event("denied", request, state, target=f"{namespace}/{name}",
                    recording=recording_id, user=identity.label, reason=decision.reason)
        raise web.HTTPForbidden(text=decision.reason + "\n")
    if not await asyncio.to_thread(path.is_file):
        raise web.HTTPNotFound(text=f"no recording {recording_id}; see the list at "
                                    "/recordings/\n")
    return recording_id, path, identity


async def player(request: web.Request) -> web.StreamResponse:
    recording_id, path, _identity = await _recording(request)
    state = request.app[STATE]
    try:
        summary = await asyncio.to_thread(request.app[SUMMARIES].summary, _directory(state), path)
    except (OSError, ValueError) as exc:
        raise web.HTTPNotFound(text=f"{recording_id} cannot be read: {exc}\n") from None
    config = {"id": recording_id, "file": "file", "user": summary.header.get("user") or "",
              "started": summary.header.get("started", ""),
              "startedEpoch": summary.header.get("startedEpoch"),
              "target": f"{summary.namespace}/{summary.name}", "state": summary.state}
    title = summary.header.get("displayName") or f"{summary.namespace}/{summary.name}"
    return render_page(request, "playback.html", {
        "title": title, "recording": recording_id, "user": config["user"] or "(anonymous)",
        "started": config["started"], "config": json.dumps(config)})


async def recording_file(request: web.Request) -> web.StreamResponse:
    recording_id, path, identity = await _recording(request)
    state = request.app[STATE]
    audit_event("recording-view", request, state, target=recording_id.rsplit("/", 1)[0],
                recording=recording_id, user=identity.label)
    # The gzip file as it is: the browser decompresses it (a Content-Encoding would make it
    # undo the gzip itself, and a file still being written ends without a gzip trailer).
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream",
                                           "Cache-Control": "no-store"})
