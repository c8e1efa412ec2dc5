"""``streamd doctor``: what this machine can run (see ``streamd.service.doctor``)."""

from __future__ import annotations

import argparse
from typing import Any


def _cmd_doctor(args: argparse.Namespace) -> int:
    from ..service.doctor import run_doctor
    return run_doctor(args)


def register(subparsers: "argparse._SubParsersAction[Any]") -> None:
    """Add ``streamd doctor`` to the ``streamd`` command's subparsers."""
    d = subparsers.add_parser("doctor", help="check what this machine can run (ONNX Runtime, "
                                             "OpenCV, TensorRT, GPU)")
    d.add_argument("--model", metavar="ONNX", help="also load this exported model; with TensorRT and "
                                                   "a GPU, build and compare an engine from it")
    d.add_argument("--require-tensorrt", action="store_true",
                   help="count a missing TensorRT, CUDA binding or GPU as a failure")
    d.set_defaults(func=_cmd_doctor)
