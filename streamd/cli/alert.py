"""``streamd alert -c RULES.yaml``: the arguments of ``streamd.alert``'s subscriber loop.

Standard output carries only event JSON lines, so logs go to standard error here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .common import add_curve_client_args, add_logging_args, run_alone, setup_logging


def register(subparsers: "argparse._SubParsersAction[Any]") -> None:
    """Add the ``alert`` subcommand to the ``streamd`` command's subparsers."""
    p = subparsers.add_parser("alert", help="raise alerts from a daemon's detections by rules",
                              description="Subscribe to a streamd daemon and raise alerts by the rules "
                                          "in RULES.yaml (see configs/alerts.example.yaml).")
    p.add_argument("-c", "--config", required=True, metavar="RULES.yaml", help="alert rules file")
    p.add_argument("--endpoint", help="daemon's publisher endpoint (default: endpoint: in the rules file)")
    p.add_argument("--snapshots", metavar="DIR",
                   help="save an annotated JPEG per alert to DIR/<camera>/<time>-<rule>.jpg "
                        "(default: snapshots_dir: in the rules file)")
    add_curve_client_args(p, "daemon")
    add_logging_args(p)
    p.set_defaults(func=_cmd_alert)


def _cmd_alert(args: argparse.Namespace) -> int:
    from ..alert.runner import run_alert
    setup_logging(args.log_level, args.log_format, stream=sys.stderr)   # stdout carries the events
    return run_alert(args.config, endpoint=args.endpoint,
                     snapshots_dir=Path(args.snapshots) if args.snapshots else None,
                     server_key=args.server_key, client_key=args.client_key)


def main(argv: list[str] | None = None) -> int:
    """Runs this command alone (``python -m streamd.cli.alert -c RULES.yaml``)."""
    return run_alone("alert", register, argv)


if __name__ == "__main__":
    sys.exit(main())
