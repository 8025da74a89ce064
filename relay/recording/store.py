"""Where recordings live: the settings and flags, listing, reading a file's summary, retention.

Files are `<dir>/<namespace>/<name>/<UTC start>-<session id>.vncrec`; a recording's id is that
path below the directory without the suffix (`lab/desk-1/20250101T120000Z-0123abcd`), so the
target it belongs to, and so who may see it, is in its id.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vncgate.common.spec import SpecError, check_name, check_namespace, parse_duration
from vncgate.relay.recording.capture import (
    END,
    FORMAT_VERSION,
    HEADER,
    KEYFRAME,
    MAX_SUMMARY,
    SUFFIX,
    FormatError,
    read_records,
    summary_path,
)

_FILE_RE = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{1,64}$")
_SIZE_RE = re.compile(r"^([0-9]+)(|Ki|Mi|Gi|Ti)$")
_UNITS = {"": 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}


@dataclass(frozen=True, slots=True)
class RecordingSettings:
    directory: Path | None = None  # None: nothing is recorded
    record_all: bool = False  # targets without spec.recording are recorded too (screen only)
    keyframe_interval: float = 10.0
    queue_bytes: int = 8 << 20  # per session, waiting for the disk
    max_age: int | None = None  # seconds
    max_total: int | None = None  # bytes over every recording


def parse_size(value: str, flag: str) -> int:
    match = _SIZE_RE.match(value.strip())
    if match is None:
        raise SpecError(flag, f"{value!r}; write bytes with an optional Ki, Mi, Gi or Ti, e.g. 8Mi")
    return int(match.group(1)) * _UNITS[match.group(2)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    group = parser.add_argument_group("session recording (docs/RECORDING.md)")
    group.add_argument("--recording-dir", type=Path,
                       default=Path(p) if (p := env("VNCGATE_RECORDING_DIR")) else None,
                       help="write recordings here; without it, a target that asks for "
                            "recording is refused (4503)")
    group.add_argument("--record-sessions", action=argparse.BooleanOptionalAction,
                       default=env("VNCGATE_RECORD_SESSIONS", "").lower() in ("1", "true"),
                       help="record every session whose target does not say (screen only)")
    group.add_argument("--recording-keyframe-interval",
                       default=env("VNCGATE_RECORDING_KEYFRAME_INTERVAL") or "10s",
                       help="ask the server for a full screen this often, for seeking")
    group.add_argument("--recording-queue", default=env("VNCGATE_RECORDING_QUEUE") or "8Mi",
                       help="per session, bytes that may wait for the disk before the "
                            "recording is cut and marked incomplete")
    group.add_argument("--recording-max-age", default=env("VNCGATE_RECORDING_MAX_AGE"),
                       help="delete recordings older than this, e.g. 30d")
    group.add_argument("--recording-max-total", default=env("VNCGATE_RECORDING_MAX_TOTAL"),
                       help="delete the oldest recordings while all of them take more, e.g. 50Gi")


def settings_from_args(parser: argparse.ArgumentParser,
                       args: argparse.Namespace) -> RecordingSettings:
    try:
        return RecordingSettings(
            directory=args.recording_dir, record_all=args.record_sessions,
            keyframe_interval=parse_duration(args.recording_keyframe_interval,
                                             "--recording-keyframe-interval"),
            queue_bytes=parse_size(args.recording_queue, "--recording-queue"),
            max_age=(None if not args.recording_max_age
                     else parse_duration(args.recording_max_age, "--recording-max-age")),
            max_total=(None if not args.recording_max_total
                       else parse_size(args.recording_max_total, "--recording-max-total")))
    except SpecError as exc:
        parser.error(str(exc))


# --- the files ---------------------------------------------------------------------------------


def path_of(directory: Path, recording_id: str) -> Path:
    """The file of an id; ValueError for anything that is not one (no path tricks)."""
    parts = recording_id.split("/")
    if len(parts) != 3 or not _FILE_RE.match(parts[2]):
        raise ValueError(f"{recording_id!r} is not a recording id (namespace/name/stamp-id)")
    try:
        check_namespace(parts[0], "namespace")
        check_name(parts[1], "name")
    except SpecError as exc:
        raise ValueError(str(exc)) from None
    return directory / parts[0] / parts[1] / (parts[2] + SUFFIX)


def id_of(directory: Path, path: Path) -> str:
    return str(path.relative_to(directory).with_suffix("")).replace(os.sep, "/")


def iter_files(directory: Path) -> Iterator[Path]:
    if not directory.is_dir():
        return
    for namespace in sorted(directory.iterdir()):
        if not namespace.is_dir():
            continue
        for target in sorted(namespace.iterdir()):
            if target.is_dir():
                yield from sorted(target.glob(f"*{SUFFIX}"))


@dataclass(frozen=True, slots=True)
class Summary:
    id: str
    namespace: str
    name: str
    size: int
    header: dict[str, Any]
    end: dict[str, Any] | None  # None: still being written, or cut by a crash
    keyframes: int

    @property
    def state(self) -> str:
        if self.end is None:
            return "open or cut"
        return "complete" if self.end.get("complete") else "incomplete"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "namespace": self.namespace, "name": self.name,
                "size": self.size, "user": self.header.get("user", ""),
                "started": self.header.get("started", ""), "state": self.state,
                "input": bool(self.header.get("input")), "end": self.end,
                "keyframes": self.keyframes}


_SUMMARY_KINDS = frozenset({HEADER, END, KEYFRAME})


def _object(value: object) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def read_summary_file(path: Path, size: int) -> tuple[dict[str, Any], dict[str, Any] | None,
                                                      int] | None:
    """Header, end and keyframe count from the summary beside a finished file; None when there
    is none, it is not one, or it was written for another size of the file."""
    try:
        with summary_path(path).open("rb") as file:
            body = file.read(MAX_SUMMARY + 1)
        data = json.loads(body) if len(body) <= MAX_SUMMARY else None
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION or \
            data.get("size") != size:
        return None
    header, end, keyframes = _object(data.get("header")), data.get("end"), data.get("keyframes")
    if header is None or (end is not None and _object(end) is None) or \
            not isinstance(keyframes, int):
        return None
    return header, _object(end), keyframes


def summarize(directory: Path, path: Path, inflations: threading.Semaphore | None = None
              ) -> Summary:
    """A file's summary: from the summary written beside it when it was finished, else read
    from the file (an open recording, one cut by a crash): its header, keyframes and end only,
    inflated in bounded steps, one file at a time per slot of `inflations`."""
    recording_id = id_of(directory, path)
    namespace, name, _ = recording_id.split("/")
    size = path.stat().st_size
    beside = read_summary_file(path, size)
    if beside is not None:
        return Summary(recording_id, namespace, name, size, *beside)
    header: dict[str, Any] = {}
    end: dict[str, Any] | None = None
    keyframes = 0
    with inflations if inflations is not None else contextlib.nullcontext():
        for record in read_records(path, _SUMMARY_KINDS):
            if record.kind == HEADER:
                header = record.json()
            elif record.kind == END:
                end = record.json()
            elif record.kind == KEYFRAME:
                keyframes += 1
    return Summary(recording_id, namespace, name, size, header, end, keyframes)


def check_recording(path: Path) -> None:
    """Raise FormatError (or OSError) unless `path` starts as a recording of ours; reads only
    the file's beginning."""
    for _ in read_records(path, frozenset({HEADER})):
        return


def remove_recording(path: Path) -> None:
    """Delete a recording and its summary (FileNotFoundError when the recording is gone)."""
    path.unlink()
    with contextlib.suppress(FileNotFoundError):
        summary_path(path).unlink()


class SummaryCache:
    """Summaries by file, reused while a file's size and modification time stay the same.

    A summary reads every record of its file; the recordings page lists every file the viewer
    may see, so without this each request would read (and decompress) all of them again. A
    finished recording never changes; one being written changes size, and is read again.
    Thread-safe (the page summarizes in a worker thread); at most `max_entries` files."""

    def __init__(self, max_entries: int = 100_000, max_inflating: int = 2) -> None:
        self.max_entries = max_entries
        # Files without a summary beside them are read one step at a time, and only this many
        # at once over every request, so parallel listings cannot multiply the cost.
        self.inflations = threading.BoundedSemaphore(max_inflating)
        self._lock = threading.Lock()
        self._entries: dict[Path, tuple[tuple[int, int], Summary]] = {}
        self.reads = 0  # files summarized from disk (the tests read it)

    def summary(self, directory: Path, path: Path) -> Summary:
        """The file's summary (OSError, FormatError, ValueError as `summarize`)."""
        stat = path.stat()
        version = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            hit = self._entries.get(path)
            if hit is not None and hit[0] == version:
                return hit[1]
        found = summarize(directory, path, self.inflations)
        with self._lock:
            self.reads += 1
            self._entries.pop(path, None)
            self._entries[path] = (version, found)
            while len(self._entries) > self.max_entries:
                del self._entries[next(iter(self._entries))]  # the longest unrefreshed
        return found

    def keep_only(self, present: Iterable[Path]) -> None:
        """Forget the files that are gone (retention, `vncgate-relay recordings delete`)."""
        keep = set(present)
        with self._lock:
            for path in [p for p in self._entries if p not in keep]:
                del self._entries[path]


def list_recordings(directory: Path) -> list[Summary]:
    found = []
    for path in iter_files(directory):
        try:
            found.append(summarize(directory, path))
        except (OSError, FormatError, ValueError):
            continue  # a file being deleted, or not ours: not listed
    return found


def apply_retention(directory: Path, max_age: int | None, max_total: int | None,
                    now: float | None = None, keep: frozenset[Path] = frozenset()) -> list[Path]:
    """Delete recordings older than `max_age` seconds, then the oldest while all of them take
    more than `max_total` bytes; files in `keep` (being written) stay. Returns what went."""
    now = time.time() if now is None else now
    files = []
    for path in iter_files(directory):
        try:
            stat = path.stat()
        except OSError:
            continue
        files.append((stat.st_mtime, stat.st_size, path))
    files.sort()
    total = sum(size for _, size, _ in files)
    removed = []
    for mtime, size, path in files:
        if path in keep:
            continue
        too_old = max_age is not None and now - mtime > max_age
        too_big = max_total is not None and total > max_total
        if not (too_old or too_big):
            continue
        try:
            remove_recording(path)
        except FileNotFoundError:
            pass
        except OSError:
            continue
        total -= size
        removed.append(path)
    return removed


def header_json(**fields: Any) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode()
