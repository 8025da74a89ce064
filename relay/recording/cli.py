"""`vncgate-relay recordings list|export|delete|prune`: recordings from the command line."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from vncgate.common.envflags import FlagParser
from vncgate.common.spec import SpecError, parse_duration
from vncgate.relay.recording.capture import FormatError
from vncgate.relay.recording.store import (
    apply_retention,
    check_recording,
    list_recordings,
    parse_size,
    path_of,
    remove_recording,
)


def _parser() -> argparse.ArgumentParser:
    parser = FlagParser(prog="vncgate-relay recordings",
                                     description="List, export and delete session recordings.")
    default = os.environ.get("VNCGATE_RECORDING_DIR")
    parser.add_argument("--recording-dir", type=Path, default=Path(default) if default else None,
                        help="the relay's --recording-dir (default: $VNCGATE_RECORDING_DIR)")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="one line per recording, oldest first")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    export = commands.add_parser("export", help="copy one recording's file (format: "
                                                "docs/RECORDING.md)")
    export.add_argument("id", help="namespace/name/stamp-session, as `list` shows")
    export.add_argument("-o", "--output", default="-", help="file to write (default: stdout)")
    delete = commands.add_parser("delete", help="delete recordings by id")
    delete.add_argument("ids", nargs="+", metavar="id")
    prune = commands.add_parser("prune", help="apply retention once")
    prune.add_argument("--max-age", help="delete recordings older than this, e.g. 30d")
    prune.add_argument("--max-total", help="then the oldest while all take more, e.g. 50Gi")
    return parser


def recordings_main(argv: Sequence[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    directory: Path | None = args.recording_dir
    if directory is None:
        parser.error("give --recording-dir (or set VNCGATE_RECORDING_DIR)")
    if not directory.is_dir():
        parser.error(f"--recording-dir {directory}: no such directory")
    if args.command == "list":
        for summary in list_recordings(directory):
            if args.json:
                print(json.dumps(summary.to_json()))
            else:
                end = summary.end or {}
                print(f"{summary.id}  {summary.header.get('started', '?')}  "
                      f"user={summary.header.get('user') or '-'}  {summary.state}  "
                      f"{summary.size} bytes  code={end.get('code', '-')}")
        return 0
    try:
        paths = [path_of(directory, i) for i in ([args.id] if args.command == "export"
                                                 else getattr(args, "ids", []))]
    except ValueError as exc:
        parser.error(str(exc))
    if args.command == "export":
        path = paths[0]
        try:
            check_recording(path)  # its start only: never the whole file in memory
        except FileNotFoundError:
            print(f"vncgate-relay recordings: no recording {args.id}", file=sys.stderr)
            return 1
        except FormatError as exc:
            print(f"vncgate-relay recordings: {exc}", file=sys.stderr)
            return 1
        with path.open("rb") as source:
            if args.output == "-":
                shutil.copyfileobj(source, sys.stdout.buffer)
            else:
                with open(args.output, "xb") as target:
                    shutil.copyfileobj(source, target)
        return 0
    if args.command == "delete":
        missing = 0
        for path in paths:
            try:
                remove_recording(path)
                print(f"deleted {path}")
            except FileNotFoundError:
                print(f"vncgate-relay recordings: no recording at {path}", file=sys.stderr)
                missing += 1
        return 1 if missing else 0
    try:
        max_age = parse_duration(args.max_age, "--max-age") if args.max_age else None
        max_total = parse_size(args.max_total, "--max-total") if args.max_total else None
    except SpecError as exc:
        parser.error(str(exc))
    if max_age is None and max_total is None:
        parser.error("prune needs --max-age or --max-total")
    for path in apply_retention(directory, max_age, max_total):
        print(f"deleted {path}")
    return 0
