"""The ``streamd`` command: run, check, sub."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .errors import StreamdError
from .redact import ScrubbingFormatter, scrub


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stdout)
    # key=value fields after the message keep logs greppable by camera under journald.
    handler.setFormatter(ScrubbingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _cmd_check(args: argparse.Namespace) -> int:
    from .config import load_config
    cfg = load_config(args.config)
    if args.load_model:
        from .backends import open_backend
        with open_backend(cfg.model.path, cfg.model.backend, device=cfg.model.device, warmup=False) as b:
            print(f"model: {b.info.describe()}")
    print(f"{args.config}: OK ({len(cfg.cameras)} cameras, model {cfg.model.path.name}, "
          f"publisher {cfg.publisher.endpoint})")
    for cam in cfg.cameras:
        print(f"  {cam.id}: {cam.kind} {cam.safe_url}" + ("" if cam.enabled else " (disabled)"))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .daemon import Daemon
    from .service import Notifier
    cfg = load_config(args.config)
    setup_logging(args.log_level or cfg.log.level)
    notifier = Notifier()
    notifier.status("loading model")
    daemon = Daemon(cfg, args.config)
    return daemon.run(notifier=notifier)


def _cmd_sub(args: argparse.Namespace) -> int:
    from .subscriber import run_sub
    try:
        return run_sub(args.endpoint, args.camera, args.json, args.count, args.timeout,
                       snapshot_dir=Path(args.save_snapshots) if args.save_snapshots else None,
                       server_key=args.server_key, client_key=args.client_key)
    except KeyboardInterrupt:
        return 0


def _cmd_detect(args: argparse.Namespace) -> int:
    from .detect_client import run_detect
    return run_detect(args.images, args.endpoint, args.priority, args.conf, args.out, args.timeout,
                      args.json, args.client_id)


def _cmd_status(args: argparse.Namespace) -> int:
    from .status import run_status
    return run_status(args.endpoint, timeout_s=args.timeout)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamd", description="Multi-camera YOLOv8 detections on ZeroMQ")
    p.add_argument("--version", action="version", version=f"streamd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the daemon")
    r.add_argument("-c", "--config", required=True, help="YAML config file")
    r.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    r.set_defaults(func=_cmd_run)

    c = sub.add_parser("check", help="validate a config file and exit")
    c.add_argument("-c", "--config", required=True)
    c.add_argument("--load-model", action="store_true", help="also load the model once")
    c.set_defaults(func=_cmd_check)

    s = sub.add_parser("sub", help="print what a daemon publishes")
    s.add_argument("endpoint", nargs="?", default="tcp://127.0.0.1:5555")
    s.add_argument("--camera", action="append", help="only this camera (repeatable)")
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    s.add_argument("--count", type=int, help="exit after this many detection messages")
    s.add_argument("--timeout", type=float, help="exit after this many seconds without a message")
    s.add_argument("--save-snapshots", metavar="DIR",
                   help="write each camera's latest snapshot, boxes drawn, to DIR/<camera>.jpg")
    s.add_argument("--server-key", type=Path, metavar="FILE",
                   help="CURVE: the publisher's public key file (NAME.key); needs --client-key")
    s.add_argument("--client-key", type=Path, metavar="FILE",
                   help="CURVE: this subscriber's secret key file (NAME.key_secret)")
    s.set_defaults(func=_cmd_sub)
    d = sub.add_parser("detect", help="submit images to a running daemon and print detections")
    d.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG or PNG files")
    d.add_argument("--endpoint", default="tcp://127.0.0.1:5556", help="the daemon's requests.endpoint")
    d.add_argument("--priority", type=int, default=0, help="-10..10, higher first")
    d.add_argument("--conf", type=float, help="confidence threshold for these images")
    d.add_argument("--client-id", help="names this client in metrics and the PUB topic")
    d.add_argument("--out", metavar="DIR", help="write annotated pictures here")
    d.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds")
    d.add_argument("--json", action="store_true", help="one JSON object per image")
    d.set_defaults(func=_cmd_detect)

    st = sub.add_parser("status", help="print the daemon's per-camera stats as a table")
    st.add_argument("endpoint", nargs="?", default="tcp://127.0.0.1:5555")
    st.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for a stats message")
    st.set_defaults(func=_cmd_status)

    from .keys_cli import register as register_keys
    from .relay import register as register_relay
    register_keys(sub)
    register_relay(sub)
    from .alert.cli import register as register_alert
    from .doctor import register as register_doctor
    register_alert(sub)
    register_doctor(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except StreamdError as exc:
        print(f"streamd: error: {scrub(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
