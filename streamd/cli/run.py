"""``streamd run`` (the daemon) and ``streamd check`` (validate a config, optionally load its model)."""

from __future__ import annotations

import argparse
from typing import Any

from .common import add_logging_args, setup_logging


def _cmd_check(args: argparse.Namespace) -> int:
    from ..backends import backend_name_for
    from ..config import load_config
    from ..errors import ConfigError, ModelError
    cfg = load_config(args.config)
    # The daemon picks the backend before anything else; a model file no backend opens
    # (a PyTorch .pt) fails here as it would there.
    trusted: list[str] | None = None
    try:
        if backend_name_for(cfg.model.path, cfg.model.backend) == "tensorrt":
            # An engine without a manifest is refused unless the config trusts it: no TensorRT needed.
            from ..backends.tensorrt.trusted import trust_checks
            trusted = trust_checks(cfg.model.path, cfg.model.trust_engine, cfg.model.names)
    except ModelError as exc:
        raise ConfigError(str(exc), source=str(args.config), field="model.path") from None
    if args.load_model:
        from ..backends.choice import open_model_pool
        from ..pipeline.postprocess import conf_below_graph
        m = cfg.model
        # One worker, nothing measured: loading is the check (auto takes its first candidate).
        pool = open_model_pool(m.path, m.backend, device=m.device, threads=m.threads, workers=1,
                               autotune_s=0, verify_sha256=m.verify_sha256, cache_dir=m.cache_dir,
                               bf16=m.openvino_bf16, trust_engine=m.trust_engine, names=m.names)
        try:
            print(f"model: {pool.info.describe()} on {pool.name}")
            trusted = pool.describe().get("trusted")
            if trusted:
                print(f"model: trusted engine (model.trust_engine), read from the engine: {trusted}")
            below = conf_below_graph(pool.info, m.conf)
            if below is not None:
                print(f"warning: {below}")
        finally:
            pool.close()
    if trusted is not None and not args.load_model:
        print(f"model: {cfg.model.path.name} is trusted without a manifest (model.trust_engine), "
              f"{len(trusted)} class names from the config; its input and output are read "
              f"from the engine when TensorRT loads it (--load-model shows them)")
    print(f"{args.config}: OK ({len(cfg.cameras)} cameras, model {cfg.model.path.name}, "
          f"publisher {cfg.publisher.endpoint})")
    for cam in cfg.cameras:
        print(f"  {cam.id}: {cam.kind} {cam.safe_url}" + ("" if cam.enabled else " (disabled)"))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..service.daemon import Daemon
    from ..service.systemd import Notifier
    cfg = load_config(args.config)
    setup_logging(args.log_level or cfg.log.level, args.log_format or cfg.log.format)
    notifier = Notifier()
    notifier.status("loading model")
    daemon = Daemon(cfg, args.config)
    return daemon.run(notifier=notifier)


def register(subparsers: "argparse._SubParsersAction[Any]") -> None:
    r = subparsers.add_parser("run", help="run the daemon")
    r.add_argument("-c", "--config", required=True, help="YAML config file")
    add_logging_args(r, level=None, fmt=None)
    r.set_defaults(func=_cmd_run)

    c = subparsers.add_parser("check", help="validate a config file and exit")
    c.add_argument("-c", "--config", required=True)
    c.add_argument("--load-model", action="store_true", help="also load the model once")
    c.set_defaults(func=_cmd_check)
