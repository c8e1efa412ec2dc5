"""``streamd detect``: submit pictures to a running daemon and print their detections."""

from __future__ import annotations

import argparse
from typing import Any


def _cmd_detect(args: argparse.Namespace) -> int:
    from ..client.detect import run_detect
    return run_detect(args.images, args.endpoint, args.priority, args.conf, args.out, args.timeout,
                      args.json, args.client_id)


def register(subparsers: "argparse._SubParsersAction[Any]") -> None:
    d = subparsers.add_parser("detect", help="submit images to a running daemon and print detections")
    d.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG or PNG files")
    d.add_argument("--endpoint", default="tcp://127.0.0.1:5556", help="the daemon's requests.endpoint")
    d.add_argument("--priority", type=int, default=0, help="-10..10, higher first")
    d.add_argument("--conf", type=float, help="confidence threshold for these images")
    d.add_argument("--client-id", help="names this client in metrics and the PUB topic")
    d.add_argument("--out", metavar="DIR", help="write annotated pictures here")
    d.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds")
    d.add_argument("--json", action="store_true", help="one JSON object per image")
    d.set_defaults(func=_cmd_detect)
