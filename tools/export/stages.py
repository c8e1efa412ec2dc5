"""The export pipeline: a request, a shared context, and named stages run in order.

Each precision is a plan, i.e. a list of stage names. fp32 is ``preflight -> load -> onnx ->
manifest -> verify -> install``. Later precisions slot their own stages between ``onnx`` and
``manifest`` (an fp16 conversion, an int8 Q/DQ pass, an engine build) and reuse the rest, so
the CLI and the manifest/verify/install steps never change shape.

Stages communicate only through :class:`ExportContext`; each one reads what earlier stages
put there and adds its own results. The pipeline times every stage.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamd.errors import ExportError
from streamd.manifest import FLOAT_INPUT, InputContract, ModelManifest
from streamd.thresholds import DEFAULT_CONF, DEFAULT_IOU, DEFAULT_MAX_DET

PRECISIONS = ("fp32", "fp16", "int8")
# What the model's input takes: "float", (N, 3, H, W) RGB in [0, 1] made on the host, or
# "uint8", the letterbox's (N, H, W, 3) BGR bytes, scaled and reordered in the graph.
INPUTS = ("float", "uint8")
DEFAULT_IMGSZ = 640


class ExportInputError(ExportError):
    """The user's input (weights file, options) cannot be exported as asked.

    Distinguished from a failure half-way through an export so the CLI can answer with the
    usage exit status (2), like argparse does for a bad option.
    """


class ExportNotImplemented(ExportInputError):
    """A valid request this version of the tool cannot fulfil yet."""


@dataclass(frozen=True)
class ExportRequest:
    """Everything the user asked for; validated on construction."""

    weights: Path
    imgsz: tuple[int, int] = (DEFAULT_IMGSZ, DEFAULT_IMGSZ)    # (height, width)
    batch_min: int = 1
    batch_max: int = 1
    dynamic_batch: bool = False
    # Any H x W that are multiples of the stride up to imgsz (``--fixed-size`` turns it off):
    # each camera is then inferred at its own aspect, as Ultralytics' default predict does.
    dynamic_hw: bool = True
    opset: int | None = None
    simplify: bool = True
    nms: bool = False
    conf: float = DEFAULT_CONF
    iou: float = DEFAULT_IOU
    max_det: int = DEFAULT_MAX_DET
    out_dir: Path = Path("engines")
    name: str | None = None
    precision: str = "fp32"
    input: str = "float"          # one of INPUTS (--input)
    verbose: bool = False         # show Ultralytics' own log and warnings
    # FP16/INT8 and TensorRT (fp16_stage, int8_stage, verify_stage, engine_stage).
    engine: bool = False                       # also build a TensorRT engine
    calib: Path | None = None                  # folder of calibration images
    calib_from: Path | None = None             # daemon config whose cameras give calibration frames
    calib_count: int = 32
    int8_flavour: str = "tensorrt"             # "tensorrt" (symmetric int8) | "cpu" (uint8 activations)
    verify_images: Path | None = None
    min_agreement: float | None = None         # None: the precision's default
    workspace_mb: int = 1024
    timing_cache: Path | None = None           # None: OUT_DIR/timing.cache
    # An ONNX input (onnx_input.py) takes its size and batch from the graph unless these were given.
    imgsz_given: bool = False
    batch_given: bool = False

    @property
    def from_onnx(self) -> bool:
        """The input is an ONNX model, adopted as it is (no torch, no Ultralytics)."""
        return self.weights.suffix.lower() == ".onnx"

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", Path(self.weights))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        h, w = (int(v) for v in self.imgsz)
        object.__setattr__(self, "imgsz", (h, w))
        if h <= 0 or w <= 0:
            raise ExportInputError(f"--imgsz {h} {w}: sizes must be positive")
        if not 1 <= self.batch_min <= self.batch_max:
            raise ExportInputError(f"--batch {self.batch_min}-{self.batch_max}: need 1 <= MIN <= MAX")
        if not self.dynamic_batch and self.batch_min != self.batch_max:
            raise ExportInputError("a static batch has one size (batch_min == batch_max)")
        if self.precision not in PRECISIONS:
            raise ExportInputError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.input not in INPUTS:
            raise ExportInputError(f"--input {self.input!r}: choose one of {', '.join(INPUTS)}")
        if not 0.0 <= self.conf < 1.0:
            raise ExportInputError(f"--conf {self.conf}: must be in [0, 1)")
        if not 0.0 < self.iou <= 1.0:
            raise ExportInputError(f"--iou {self.iou}: must be in (0, 1]")
        if self.max_det < 1:
            raise ExportInputError(f"--max-det {self.max_det}: must be at least 1")
        if self.name is not None:
            check_name(self.name)
        check_precision_options(self)

    @property
    def model_name(self) -> str:
        """Base name of the outputs: ``--name`` (a trailing .onnx dropped) or the weights' stem
        (with the precision appended for fp16/int8, so they do not replace the fp32 model)."""
        if self.name is None:
            return self.weights.stem + precision_suffix(self)
        return self.name[:-5] if self.name.lower().endswith(".onnx") and len(self.name) > 5 else self.name

    def describe_batch(self) -> str:
        return f"{self.batch_min}-{self.batch_max}" if self.dynamic_batch else str(self.batch_max)

    @property
    def exporter_dynamic(self) -> bool:
        """Whether Ultralytics' exporter is asked for ``dynamic=True``. It makes batch, H
        and W dynamic together; the onnx stage then pins the axes that should be fixed."""
        return self.dynamic_batch or self.dynamic_hw


INT8_FLAVOURS = ("tensorrt", "cpu")
# ONNX Runtime's calibrator stacks each tensor over the calibration batches, and the NMS tensors
# change size with every picture: it stops with "inhomogeneous shape". FP16 runs through NMS.
INT8_NMS = ("INT8 calibration cannot run through NMS in the graph; export without --nms (the daemon runs "
            "NMS after the model), or use --precision fp16")


def precision_suffix(req: ExportRequest) -> str:
    """``-fp16``, ``-int8``, ``-int8-cpu`` or nothing; ``-uint8`` appended for ``--input uint8``."""
    suffix = "" if req.precision == "fp32" else f"-{req.precision}"
    if req.precision == "int8" and req.int8_flavour == "cpu":
        suffix = "-int8-cpu"
    return suffix + ("-uint8" if req.input == "uint8" else "")


def check_precision_options(req: ExportRequest) -> None:
    """Option combinations of the fp16/int8/engine flags that can never work."""
    for key in ("calib", "calib_from", "verify_images", "timing_cache"):
        value = getattr(req, key)
        if value is not None:
            object.__setattr__(req, key, Path(value))
    if req.int8_flavour not in INT8_FLAVOURS:
        raise ExportInputError(f"--int8-flavour {req.int8_flavour!r}: choose one of {', '.join(INT8_FLAVOURS)}")
    if req.precision != "int8":
        given = [f for f, v in (("--calib", req.calib), ("--calib-from", req.calib_from)) if v is not None]
        if req.int8_flavour != "tensorrt":
            given.append("--int8-flavour")
        if given:
            raise ExportInputError(f"{', '.join(given)} only apply with --precision int8")
    else:
        if req.calib is not None and req.calib_from is not None:
            raise ExportInputError("--calib and --calib-from: give one source of calibration images")
        if req.calib is None and req.calib_from is None:
            raise ExportInputError("--precision int8 needs calibration images from the cameras it will "
                                   "watch: --calib DIR (a folder of images) or --calib-from CONFIG "
                                   "(frames from the cameras of a streamd config)")
        if req.nms:
            raise ExportInputError(f"--nms --precision int8: {INT8_NMS}")
        if req.engine and req.int8_flavour == "cpu":
            raise ExportInputError("--int8-flavour cpu makes uint8 activations, which TensorRT does not "
                                   "take; use --int8-flavour tensorrt with --engine")
    if not 1 <= req.calib_count <= 10000:
        raise ExportInputError(f"--calib-count {req.calib_count}: must be between 1 and 10000")
    if req.min_agreement is not None and not 0.0 <= req.min_agreement <= 1.0:
        raise ExportInputError(f"--min-agreement {req.min_agreement}: must be in [0, 1]")
    if req.workspace_mb < 16:
        raise ExportInputError(f"--workspace-mb {req.workspace_mb}: must be at least 16")
    if req.timing_cache is not None and not req.engine:
        raise ExportInputError("--timing-cache only applies with --engine")


def check_name(name: str) -> None:
    """Refuse names that would write outside ``--out-dir`` or hide the file."""
    if not name or name in {".", ".."} or "/" in name or "\\" in name or name.startswith("."):
        raise ExportInputError(f"--name {name!r}: must be a plain file name (no folders, "
                               f"not starting with '.')")


@dataclass
class ExportContext:
    """What the stages share. Paths under ``workdir`` vanish when the pipeline ends."""

    # For an ONNX input, the onnx-source stage replaces it with one holding the ONNX's own size,
    # batch and NMS (what the load and onnx stages would have made from these options).
    request: ExportRequest
    workdir: Path
    # Filled by the "load" stage.
    yolo: Any = None                              # ultralytics.YOLO, loaded from a private copy
    work_weights: Path | None = None              # that private copy (exports land beside it)
    class_names: dict[int, str] = field(default_factory=dict)
    strides: tuple[int, ...] = ()
    source: dict[str, Any] = field(default_factory=dict)
    # The current model file; each model-producing stage replaces it.
    model_path: Path | None = None
    model_format: str = "onnx"
    precision: str = "fp32"
    opset: int | None = None
    input_name: str = "images"
    output_names: list[str] = field(default_factory=list)
    input_contract: InputContract = FLOAT_INPUT      # "uint8" makes it RAW_UINT8
    # Filled by "manifest" and "install".
    manifest: ModelManifest | None = None
    installed_path: Path | None = None
    manifest_path: Path | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)   # facts worth a line in the summary
    # FP16/INT8/engine stages.
    reference_onnx: Path | None = None            # the FP32 ONNX a converted model is compared with
    calib_samples: Any = None                     # uint8 (N, 3, H, W) letterboxed RGB network inputs
    calib_source: str = ""                        # where they came from, for the manifest
    build_info: dict[str, Any] = field(default_factory=dict)   # merged into the manifest's build
    backends: list[str] = field(default_factory=list)          # the manifest's backends ([]: any)

    @property
    def stride(self) -> int:
        return max(self.strides) if self.strides else 32


StageFn = Callable[[ExportContext], None]


@dataclass(frozen=True)
class Stage:
    name: str
    run: StageFn
    description: str


_STAGES: dict[str, Stage] = {}

# Plans per precision. A precision listed in PRECISIONS but missing here is recognised by
# the CLI and answered with ExportNotImplemented instead of a usage error.
PLANS: dict[str, tuple[str, ...]] = {
    "fp32": ("preflight", "load", "onnx", "manifest", "verify", "install"),
    "fp16": ("preflight", "inputs", "load", "onnx", "fp16", "agreement", "manifest", "verify", "install"),
    "int8": ("preflight", "inputs", "load", "onnx", "calibrate", "int8", "agreement", "manifest",
             "verify", "install"),
}
# An FP32 ONNX input is adopted, not exported: its own plan (torch-free), --engine appended as for
# the others.
ONNX_PLAN: tuple[str, ...] = ("preflight", "adopt")
# FP16/INT8 of an ONNX input: the precision's plan, with the stages that need torch and Ultralytics
# (TORCH_STAGES) replaced by one that fills the context from the ONNX (onnx_input.py).
TORCH_STAGES = ("load", "onnx")
ONNX_SOURCE_STAGE = "onnx-source"
# --input uint8: the stage that puts the input's scaling into the graph, after every stage
# that changes the float model (and, for an adopted ONNX, the install of the new file).
UINT8_STAGE = "uint8"
# --engine appends this stage: the ONNX is installed first, so a machine without TensorRT
# still gets the ONNX models and a precise message about the step it cannot do.
ENGINE_STAGE = "engine"


def register(name: str, description: str) -> Callable[[StageFn], StageFn]:
    """Decorator: make ``fn`` available to plans as stage ``name``."""
    def deco(fn: StageFn) -> StageFn:
        if name in _STAGES:
            raise RuntimeError(f"export stage {name!r} registered twice")
        _STAGES[name] = Stage(name, fn, description)
        return fn
    return deco


def _ensure_registered() -> None:
    # The stage modules register themselves on import; importing them here keeps the
    # registry complete however this module was reached.
    from . import (  # noqa: F401
        checkpoint,
        engine_stage,
        fp16_stage,
        int8_stage,
        onnx_input,
        onnx_stage,
        output,
        preflight,
        uint8_input,
        verify_stage,
    )


def plan_for(request: ExportRequest) -> list[Stage]:
    """The stages that fulfil ``request``, or ExportNotImplemented before any work starts."""
    _ensure_registered()
    names = PLANS.get(request.precision)
    if names is None:
        done = ", ".join(sorted(PLANS))
        raise ExportNotImplemented(
            f"--precision {request.precision} is not implemented yet in this version "
            f"(available: {done})")
    adopted = request.from_onnx and request.precision == "fp32"
    if adopted:
        names = ONNX_PLAN
    elif request.from_onnx:
        # The checkpoint's plan with its torch stages replaced by the one that reads the ONNX.
        at = names.index(TORCH_STAGES[0])
        names = (*names[:at], ONNX_SOURCE_STAGE, *(n for n in names[at:] if n not in TORCH_STAGES))
    if request.input == "uint8":
        if adopted:
            names = (*names, UINT8_STAGE, "install")
        else:
            at = names.index("manifest")
            names = (*names[:at], UINT8_STAGE, *names[at:])
    if request.engine:
        names = (*names, ENGINE_STAGE)
    missing = [n for n in names if n not in _STAGES]
    if missing:  # a plan naming an unknown stage is a bug in this package, not user error
        raise RuntimeError(f"export plan {request.precision} names unknown stage(s) {missing}")
    return [_STAGES[n] for n in names]


@dataclass(frozen=True)
class ExportResult:
    model_path: Path
    manifest_path: Path
    manifest: ModelManifest
    size_bytes: int
    seconds: float
    stage_seconds: dict[str, float]
    notes: tuple[str, ...]


def run_export(request: ExportRequest,
               progress: Callable[[Stage], None] | None = None) -> ExportResult:
    """Run the plan for ``request`` in a private scratch folder; return what was written.

    Nothing is written to ``request.out_dir`` unless every stage before ``install``
    succeeded, so a failed export never replaces a working model.
    """
    stages = plan_for(request)
    t0 = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="streamd-export-"))
    ctx = ExportContext(request=request, workdir=workdir, precision=request.precision)
    try:
        for stage in stages:
            if progress is not None:
                progress(stage)
            ts = time.perf_counter()
            stage.run(ctx)
            ctx.stage_seconds[stage.name] = time.perf_counter() - ts
    finally:
        ctx.yolo = None
        shutil.rmtree(workdir, ignore_errors=True)
    if ctx.installed_path is None or ctx.manifest is None or ctx.manifest_path is None:
        raise RuntimeError("export plan finished without installing a model")
    return ExportResult(model_path=ctx.installed_path, manifest_path=ctx.manifest_path,
                        manifest=ctx.manifest, size_bytes=ctx.installed_path.stat().st_size,
                        seconds=time.perf_counter() - t0, stage_seconds=dict(ctx.stage_seconds),
                        notes=tuple(ctx.notes))

