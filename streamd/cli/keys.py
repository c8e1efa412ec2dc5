"""``streamd keys``: make the CURVE key pairs that encrypt the PUB socket.

One pair for the daemon (its ``.key_secret`` goes in ``publisher.curve.server_secret_key``,
its ``.key`` to every subscriber), one pair per subscriber (its ``.key`` goes in the daemon's
``publisher.curve.allowed_clients_dir``, its ``.key_secret`` stays with the subscriber).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..security import generate_key_files
from .common import run_alone


def _cmd_generate(args: argparse.Namespace) -> int:
    public_path, secret_path, public = generate_key_files(args.dir, args.name, force=args.force)
    print(f"public key:  {public.decode('ascii')}")
    print(f"public file: {public_path}  (give it to the peers that must trust this key)")
    print(f"secret file: {secret_path}  (mode 0600; never share it)")
    return 0


def register(subparsers: "argparse._SubParsersAction[Any]") -> None:
    k = subparsers.add_parser("keys", help="make CURVE key pairs for an encrypted PUB socket")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    g = ksub.add_parser("generate", help="write NAME.key (public) and NAME.key_secret (secret)")
    g.add_argument("name", help="file name stem: 1-64 letters, digits, '_', '.', '-'")
    g.add_argument("--dir", type=Path, default=Path("."), help="folder for the two files (default: .)")
    g.add_argument("--force", action="store_true", help="replace an existing pair of that name")
    g.set_defaults(func=_cmd_generate)


def main(argv: list[str] | None = None) -> int:
    """Runs this command alone (``python -m streamd.cli.keys generate NAME``)."""
    return run_alone("keys", register, argv)


if __name__ == "__main__":
    sys.exit(main())
