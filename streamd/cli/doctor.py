"""``streamd doctor``: what this machine can run (see ``streamd.service.doctor``)."""

from __future__ import annotations

import argparse
from typing import Any


def _cmd_doctor(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..service.backend_table import print_backend_table
    from ..service.doctor import run_doctor
    rc = run_doctor(args)
    print_backend_table(Path(args.model) if args.model else None)
    return rc


def register(subparsers: "argparse._SubParsersAction[Any]") -> None:
    """Add ``streamd doctor`` to the ``streamd`` command's subparsers."""
    d = subparsers.add_parser("doctor", help="check what this machine can run (ONNX Runtime, "
                                             "OpenVINO, OpenCV, TensorRT, GPU) and how fast")
    d.add_argument("--model", metavar="MODEL", help="also load this exported model and measure it on "
                                                    "every backend and device; with TensorRT and a GPU, "
                                                    "build and compare an engine from it. A .engine: "
                                                    "its inputs and outputs as TensorRT reads them (what "
                                                    "model.trust_engine infers for one without a manifest)")
    d.add_argument("--require-tensorrt", action="store_true",
                   help="count a missing TensorRT, CUDA binding or GPU as a failure")
    d.set_defaults(func=_cmd_doctor)
