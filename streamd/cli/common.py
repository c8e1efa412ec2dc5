"""What every ``streamd`` subcommand shares: logging set-up and the error boundary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..errors import StreamdError
from ..logs import FORMATS, LEVELS, setup_logging
from ..redact import scrub

__all__ = ["add_curve_client_args", "add_logging_args", "new_parser", "run_alone", "run_command",
           "setup_logging"]


def add_logging_args(p: argparse.ArgumentParser, level: str | None = "info", fmt: str | None = "text") -> None:
    """--log-level / --log-format, the same for every long-running command (None: from its config)."""
    p.add_argument("--log-level", choices=LEVELS, default=level,
                   help="default: " + (level or "log.level in the config, else info"))
    p.add_argument("--log-format", choices=FORMATS, default=fmt,
                   help="key=value text lines or one JSON object per line; default: "
                        + (fmt or "log.format in the config, else text"))


def add_curve_client_args(p: argparse.ArgumentParser, server: str = "daemon") -> None:
    """--server-key / --client-key, the same for every command that subscribes."""
    p.add_argument("--server-key", type=Path, metavar="FILE",
                   help=f"CURVE: the {server}'s public key file (NAME.key); needs --client-key")
    p.add_argument("--client-key", type=Path, metavar="FILE",
                   help="CURVE: this subscriber's secret key file (NAME.key_secret)")


def add_curve_server_args(p: argparse.ArgumentParser, side: str = "the socket",
                          clients: str = "subscribers") -> None:
    """--server-secret-key / --allowed-clients-dir: the server side of CURVE, as a daemon's
    ``publisher.curve`` has it (``side`` says what they encrypt, ``clients`` who connects)."""
    p.add_argument("--server-secret-key", type=Path, metavar="FILE",
                   help=f"CURVE: encrypt {side} with this NAME.key_secret (needs --allowed-clients-dir)")
    p.add_argument("--allowed-clients-dir", type=Path, metavar="DIR",
                   help=f"CURVE: public keys (*.key) of the {clients} allowed to connect")


def new_parser() -> tuple[argparse.ArgumentParser, "argparse._SubParsersAction[Any]"]:
    """The ``streamd`` parser with an empty set of subcommands."""
    p = argparse.ArgumentParser(prog="streamd", description="Multi-camera YOLOv8 detections on ZeroMQ")
    p.add_argument("--version", action="version", version=f"streamd {__version__}")
    return p, p.add_subparsers(dest="command", required=True)


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse ``argv`` and run the chosen subcommand; a StreamdError is one line and status 2."""
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except StreamdError as exc:
        print(f"streamd: error: {scrub(str(exc))}", file=sys.stderr)
        return 2


def run_alone(command: str, register: Callable[["argparse._SubParsersAction[Any]"], None],
              argv: list[str] | None) -> int:
    """Runs one subcommand as ``streamd COMMAND ...`` would, without loading the others
    (``python -m streamd.cli.relay ...``)."""
    parser, sub = new_parser()
    register(sub)
    return run_command(parser, [command, *(sys.argv[1:] if argv is None else argv)])
