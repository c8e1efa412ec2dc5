"""``streamd relay``: forward several daemons' messages on one endpoint (see ``streamd.client.relay``)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from ..client.relay import Relay, Upstream
from .common import add_curve_server_args, add_logging_args, run_alone, setup_logging

log = logging.getLogger("streamd.relay")


def _cmd_relay(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, args.log_format)
    upstreams = [Upstream(e) for e in args.from_ or []]
    upstreams += [Upstream(e, Path(k)) for e, k in args.from_curve or []]
    relay = Relay(args.listen, upstreams, allow_non_loopback=args.allow_non_loopback,
                  server_secret_key=args.server_secret_key, allowed_clients_dir=args.allowed_clients_dir,
                  client_key=args.client_key)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        relay.start()
        while not stop.wait(0.5):
            if not relay.is_alive():
                break
    finally:
        relay.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if relay.error is not None:
        print(f"streamd: error: relay failed: {relay.error}", file=sys.stderr)
        return 1
    log.info("relay stopped cleanly")
    return 0


def register(subparsers: "argparse._SubParsersAction[Any]") -> None:
    r = subparsers.add_parser("relay", help="forward several daemons' messages on one endpoint")
    r.add_argument("--listen", required=True, metavar="ENDPOINT",
                   help="where subscribers connect, e.g. tcp://127.0.0.1:5600")
    r.add_argument("--from", dest="from_", action="append", metavar="ENDPOINT",
                   help="an upstream daemon's PUB endpoint (repeatable)")
    r.add_argument("--from-curve", action="append", nargs=2, metavar=("ENDPOINT", "SERVER_KEY"),
                   help="an upstream daemon using CURVE, with its public key file (repeatable; "
                        "needs --client-key)")
    r.add_argument("--client-key", type=Path, metavar="FILE",
                   help="the relay's own NAME.key_secret, listed in the CURVE daemons' allowed clients")
    add_curve_server_args(r, "the subscriber side")
    r.add_argument("--allow-non-loopback", action="store_true",
                   help="allow an unencrypted --listen address reachable from the network")
    add_logging_args(r)
    r.set_defaults(func=_cmd_relay)


def main(argv: list[str] | None = None) -> int:
    """Runs this command alone (``python -m streamd.cli.relay --listen ... --from ...``)."""
    return run_alone("relay", register, argv)


if __name__ == "__main__":
    sys.exit(main())
