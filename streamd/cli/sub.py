"""``streamd sub``: print what a daemon publishes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import add_curve_client_args


def _cmd_sub(args: argparse.Namespace) -> int:
    from ..client.subscriber import run_sub
    try:
        return run_sub(args.endpoint, args.camera, args.json, args.count, args.timeout,
                       snapshot_dir=Path(args.save_snapshots) if args.save_snapshots else None,
                       server_key=args.server_key, client_key=args.client_key)
    except KeyboardInterrupt:
        return 0


def register(subparsers: "argparse._SubParsersAction[Any]") -> None:
    s = subparsers.add_parser("sub", help="print what a daemon publishes")
    s.add_argument("endpoint", nargs="?", default="tcp://127.0.0.1:5555")
    s.add_argument("--camera", action="append", help="only this camera (repeatable)")
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    s.add_argument("--count", type=int, help="exit after this many detection messages")
    s.add_argument("--timeout", type=float, help="exit after this many seconds without a message")
    s.add_argument("--save-snapshots", metavar="DIR",
                   help="write each camera's latest snapshot, boxes drawn, to DIR/<camera>.jpg")
    add_curve_client_args(s, "publisher")
    s.set_defaults(func=_cmd_sub)
