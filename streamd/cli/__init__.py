"""The ``streamd`` command: one module per subcommand, wired together here."""

from __future__ import annotations

import argparse

from .common import new_parser, run_command, setup_logging

__all__ = ["build_parser", "main", "setup_logging"]


def build_parser() -> argparse.ArgumentParser:
    # Subcommand modules load only when the parser is built, so importing streamd.cli stays cheap.
    from . import alert, detect, doctor, keys, relay, run, status, sub
    p, subparsers = new_parser()
    for command in (run, sub, detect, status, keys, relay, alert, doctor):
        command.register(subparsers)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)
