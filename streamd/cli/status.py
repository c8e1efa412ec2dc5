"""``streamd status``: the daemon's per-camera stats as a table."""

from __future__ import annotations

import argparse
from typing import Any


def _cmd_status(args: argparse.Namespace) -> int:
    from ..client.status import run_status
    return run_status(args.endpoint, timeout_s=args.timeout)


def register(subparsers: "argparse._SubParsersAction[Any]") -> None:
    st = subparsers.add_parser("status", help="print the daemon's per-camera stats as a table")
    st.add_argument("endpoint", nargs="?", default="tcp://127.0.0.1:5555")
    st.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for a stats message")
    st.set_defaults(func=_cmd_status)
