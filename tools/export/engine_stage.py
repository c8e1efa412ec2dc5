"""Stage ``engine`` (``--engine``): a TensorRT plan built from the installed ONNX.

It runs after ``install``, so the ONNX model (FP32, FP16, or INT8 Q/DQ of the tensorrt
flavour) is already in the output folder when TensorRT is missing: a CPU machine gets
everything it can make and a message naming the one step that needs a GPU
(``EngineUnavailable``, exit status 3).

The build itself is ``streamd.backends.tensorrt.build.build_engine`` (shared with the daemon's
rebuild and ``streamd doctor``); this stage picks its inputs, shows progress, and writes
``NAME.engine`` as a plain plan file (readable by trtexec and Triton, no header) with its
manifest: TensorRT version, GPU and compute capability, precision, batch profile, input
size, classes, the sha256 of the plan and of the ONNX it was built from. An ONNX that takes
any H x W gets an H x W profile too (``streamd.backends.tensorrt.profiles.choose_hw_profile``: half of
``--imgsz`` up to ``--imgsz``), recorded in the manifest's build facts.

This module also holds the command-line options of the FP16/INT8/engine stages, so the
CLI only has to include them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from streamd.backends.tensorrt.build import (
    DEFAULT_WORKSPACE_MB,
    TIMING_CACHE_NAME,
    build_engine,
    engine_manifest,
)
from streamd.backends.tensorrt.logic import FORMAT_TENSORRT
from streamd.backends.tensorrt.probe import INSTALL_HINT, probe_gpu, tensorrt_version
from streamd.backends.tensorrt.profiles import choose_hw_profile, choose_profile
from streamd.errors import BackendError, ExportError
from streamd.fileio import write_atomic

from .int8_stage import progress
from .stages import ExportContext, ExportInputError, register


class EngineUnavailable(ExportError):
    """--engine was asked where TensorRT or a GPU is missing; the ONNX was still written."""


def add_precision_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("FP16 / INT8 / TensorRT")
    g.add_argument("--engine", action="store_true",
                   help="also build a TensorRT engine OUT_DIR/NAME.engine (needs TensorRT and an "
                        "NVIDIA GPU; build it on the machine that will run it)")
    g.add_argument("--calib", type=Path, metavar="DIR",
                   help="int8: folder of calibration images (frames like the cameras' own)")
    g.add_argument("--calib-from", type=Path, metavar="CONFIG",
                   help="int8: grab calibration frames from the cameras of this streamd config")
    g.add_argument("--calib-count", type=int, default=32, metavar="N",
                   help="int8: number of calibration images (default 32)")
    g.add_argument("--int8-flavour", choices=("tensorrt", "cpu"), default="tensorrt",
                   help="int8: 'tensorrt' = symmetric int8 Q/DQ for TensorRT, and for OpenVINO "
                        "where its check through OpenVINO passes (default); 'cpu' = uint8 "
                        "activations for ONNX Runtime's CPU (not for TensorRT); the manifest's "
                        "backends record which")
    g.add_argument("--verify-images", type=Path, metavar="DIR",
                   help="fp16/int8: images to compare against FP32 on (default: the calibration "
                        "images, else Ultralytics' samples)")
    g.add_argument("--min-agreement", type=float, default=None, metavar="X",
                   help="fp16/int8: fail (exit 1, nothing installed) when the AP50 agreement with "
                        "FP32 is below X (default 0.95 for fp16, 0.85 for int8)")
    g.add_argument("--workspace-mb", type=int, default=DEFAULT_WORKSPACE_MB, metavar="MB",
                   help=f"--engine: TensorRT builder workspace limit (default {DEFAULT_WORKSPACE_MB}; "
                        f"lower it on small Jetsons)")
    g.add_argument("--timing-cache", type=Path, metavar="FILE",
                   help=f"--engine: timing cache reused between builds (default OUT_DIR/{TIMING_CACHE_NAME})")


def precision_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"engine": args.engine, "calib": args.calib, "calib_from": args.calib_from,
            "calib_count": args.calib_count, "int8_flavour": args.int8_flavour,
            "verify_images": args.verify_images, "min_agreement": args.min_agreement,
            "workspace_mb": args.workspace_mb, "timing_cache": args.timing_cache}


def _unavailable(ctx: ExportContext, why: str) -> EngineUnavailable:
    onnx = ctx.installed_path
    wrote = f"wrote {onnx} and its manifest; " if onnx is not None else ""
    return EngineUnavailable(
        f"{wrote}the 'engine' step (TensorRT build) needs {why}. Run the same command with "
        f"--engine on the machine that will run the engine (an engine is specific to its GPU and "
        f"TensorRT version); 'streamd doctor' there says whether TensorRT and the GPU work.")


@register("engine", "build a TensorRT engine from the installed ONNX and write its manifest")
def engine_stage(ctx: ExportContext) -> None:
    req = ctx.request
    onnx_path, onnx_manifest = ctx.installed_path, ctx.manifest
    if onnx_path is None or onnx_manifest is None:
        raise RuntimeError("the engine stage needs the install stage first")
    if req.precision == "int8" and req.int8_flavour != "tensorrt":
        raise ExportInputError("--engine needs --int8-flavour tensorrt")
    version = tensorrt_version()
    if version is None:
        raise _unavailable(ctx, f"TensorRT, which is not installed here ({INSTALL_HINT})")
    gpu, why = probe_gpu(0)
    if gpu is None:
        raise _unavailable(ctx, f"an NVIDIA GPU, and none is usable here ({why})")
    profile = choose_profile(onnx_manifest.batch_min, onnx_manifest.batch_max)
    hw = (choose_hw_profile(onnx_manifest.imgsz, onnx_manifest.stride)
          if onnx_manifest.dynamic_hw else None)
    size = (f"H x W {hw.min[0]}x{hw.min[1]} to {hw.max[0]}x{hw.max[1]}" if hw is not None
            else f"{onnx_manifest.imgsz[0]}x{onnx_manifest.imgsz[1]}")
    cache = req.timing_cache if req.timing_cache is not None else req.out_dir / TIMING_CACHE_NAME
    progress(f"building a TensorRT {version} {ctx.precision} engine for {gpu.name} "
             f"(compute capability {gpu.compute_capability}), batch {profile.min}-{profile.max}, "
             f"{size}, workspace {req.workspace_mb} MB")
    try:
        outcome = build_engine(onnx_path, precision=ctx.precision, profile=profile,
                               input_name=onnx_manifest.input_name, imgsz=onnx_manifest.imgsz,
                               layout=onnx_manifest.input_layout,
                               workspace_mb=req.workspace_mb, timing_cache=cache,
                               progress=lambda msg: progress(f"tensorrt: {msg}"),
                               hw_profile=hw, stride=onnx_manifest.stride)
    except BackendError as exc:
        raise ExportError(f"{onnx_path.name}: engine build failed: {exc}") from None

    engine_path = onnx_path.with_suffix(".engine")
    manifest = engine_manifest(onnx_manifest, engine_path, outcome, gpu=gpu.name,
                               compute_capability=gpu.compute_capability, onnx_file=onnx_path.name,
                               onnx_sha256=onnx_manifest.model_sha256, cuda_driver=gpu.driver)
    if engine_path.exists():
        ctx.notes.append(f"replaced the previous {engine_path.name}")
    try:
        write_atomic(engine_path, outcome.plan)
    except OSError as exc:
        raise ExportInputError(f"{engine_path}: cannot write the engine ({exc.strerror})") from None
    ctx.notes.append(f"also wrote {onnx_path.name} (what the engine was built from)")
    ctx.manifest_path = manifest.write(engine_path)
    ctx.manifest = manifest
    ctx.installed_path = engine_path
    ctx.model_format = FORMAT_TENSORRT
