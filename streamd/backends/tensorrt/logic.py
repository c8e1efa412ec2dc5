"""Everything about TensorRT engines that can be decided without TensorRT.

The TensorRT backend, the engine build and ``streamd doctor`` are thin layers over the
functions here, so the decisions they make are tested on any machine:

* versions: parsing, and the rule for when a serialized plan may be loaded at all
  (a plan is only valid for the TensorRT major.minor that built it);
* the engine manifest check made *before* deserializing (a plan is native code):
  sha256, TensorRT version, GPU compute capability, and whether a mismatch may be
  answered by rebuilding from the recorded ONNX;
* optimization profiles (min/opt/max batch, and min/opt/max height and width for models
  that take any H x W), the batch to run for a number of frames and the input size to run
  a batch at;
* I/O buffer sizing from tensor shapes and TensorRT dtype names;
* how a precision is expressed for a TensorRT version (strongly typed network vs builder
  flags, which TensorRT 11 removed);
* which nodes of a YOLOv8 graph form the head's decode part, kept in float by the FP16
  conversion and the INT8 quantization.

This module never imports tensorrt, pycuda or onnx.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ManifestError
from ...manifest import ModelManifest

# The name-based tensor API (num_io_tensors, set_input_shape, set_tensor_address,
# execute_async_v3) appeared in 8.5; older versions are not supported.
MIN_TENSORRT = (8, 5)

# Keys of ModelManifest.build for engines. The export tool writes them, the backend reads them.
BUILD_TENSORRT = "tensorrt"
BUILD_GPU = "gpu"
BUILD_CC = "compute_capability"
BUILD_PROFILE = "profile"                # {"min": n, "opt": n, "max": n}
BUILD_HW_PROFILE = "hw_profile"          # any-H x W engines: {"min": [h, w], "opt": [h, w], "max": [h, w]}
BUILD_ONNX_FILE = "onnx_file"            # the ONNX the engine was built from (same folder)
BUILD_ONNX_SHA = "onnx_sha256"
BUILD_WORKSPACE_MB = "workspace_mb"
BUILD_STRONGLY_TYPED = "strongly_typed"
BUILD_FLAGS = "builder_flags"
BUILD_FP32_ONNX_SHA = "fp32_onnx_sha256"  # FP16/INT8 ONNX: the FP32 ONNX they were made from

FORMAT_TENSORRT = "tensorrt"


# ---------------------------------------------------------------------------------------
# versions
# ---------------------------------------------------------------------------------------
_VERSION_RE = re.compile(r"^\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:\.(\d+))?")


@dataclass(frozen=True, order=True)
class TrtVersion:
    major: int
    minor: int
    patch: int = 0
    build: int = 0

    @classmethod
    def parse(cls, text: str | Sequence[int]) -> "TrtVersion":
        """``"10.3.0.26"``, ``"8.6.1"``, ``"10.3.0.post1"`` or ``(10, 3, 0)``."""
        if not isinstance(text, str):
            parts = [int(p) for p in text][:4]
            if len(parts) < 2:
                raise ValueError(f"TensorRT version {tuple(text)!r} needs at least major.minor")
            return cls(*parts)
        m = _VERSION_RE.match(text)
        if m is None or m.group(2) is None:
            raise ValueError(f"{text!r} is not a TensorRT version (expected MAJOR.MINOR[.PATCH])")
        return cls(*(int(g) if g is not None else 0 for g in m.groups()))

    @property
    def line(self) -> tuple[int, int]:
        """(major, minor): what a serialized plan is tied to."""
        return (self.major, self.minor)

    def __str__(self) -> str:
        core = f"{self.major}.{self.minor}.{self.patch}"
        return f"{core}.{self.build}" if self.build else core


def check_supported(version: TrtVersion) -> None:
    if version.line < MIN_TENSORRT:
        raise ValueError(f"TensorRT {version} is too old: streamd needs "
                         f"{MIN_TENSORRT[0]}.{MIN_TENSORRT[1]} or newer (name-based tensor I/O)")


def plan_incompatibility(built: str, running: str) -> str | None:
    """Why a plan built by TensorRT ``built`` cannot be loaded by ``running`` (None: it can).

    TensorRT only guarantees that a plan loads in the exact version that built it; within
    one major.minor patch releases keep the format, across minor versions they do not
    (version-compatible plans are a build option streamd does not use).
    """
    b, r = TrtVersion.parse(built), TrtVersion.parse(running)
    if b.line != r.line:
        return (f"it was built by TensorRT {b} and this machine runs TensorRT {r} "
                f"(a plan only loads in the TensorRT {b.major}.{b.minor}.x that built it)")
    return None


# ---------------------------------------------------------------------------------------
# GPU compute capability
# ---------------------------------------------------------------------------------------
def format_cc(major: int, minor: int) -> str:
    return f"{int(major)}.{int(minor)}"


def parse_cc(text: str | Sequence[int]) -> tuple[int, int]:
    """``"8.6"`` or ``"sm_86"`` or ``(8, 6)`` -> (8, 6)."""
    if not isinstance(text, str):
        major, minor = (int(v) for v in text)
        return major, minor
    t = text.strip().lower()
    m = re.fullmatch(r"sm_?(\d)(\d+)", t) or re.fullmatch(r"(\d+)\.(\d+)", t)
    if m is None:
        raise ValueError(f"{text!r} is not a compute capability (expected e.g. 8.6)")
    return int(m.group(1)), int(m.group(2))


# ---------------------------------------------------------------------------------------
# engine manifest checks (made before the plan is deserialized)
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RuntimeFacts:
    """What the machine that wants to load a plan runs."""

    tensorrt: str
    compute_capability: str
    gpu_name: str = ""


class EngineRefused(ManifestError):
    """The plan must not be loaded here; ``reason`` says why in one sentence."""

    def __init__(self, message: str, *, kind: str, rebuildable: bool) -> None:
        super().__init__(message)
        self.kind = kind                # "format" | "sha256" | "facts" | "tensorrt" | "compute_capability"
        self.rebuildable = rebuildable


@dataclass(frozen=True)
class EngineVerdict:
    action: str                         # "load" | "rebuild"
    reason: str = ""                    # why a rebuild is needed
    onnx_file: str | None = None        # what to rebuild from


def check_engine_file(manifest: ModelManifest, actual_sha256: str, *, path: str | Path) -> None:
    """The part of the check that needs no TensorRT: is this the file the manifest describes?"""
    if manifest.model_format != FORMAT_TENSORRT:
        raise EngineRefused(f"{path}: its manifest describes a {manifest.model_format!r} model, "
                            f"not a TensorRT engine", kind="format", rebuildable=False)
    if actual_sha256 != manifest.model_sha256:
        raise EngineRefused(
            f"{path}: sha256 {actual_sha256[:12]}… does not match its manifest "
            f"({manifest.model_sha256[:12]}…): the engine file was changed after it was built, "
            f"or the manifest belongs to another engine. Refusing to load it (an engine is "
            f"native code); rebuild it with streamd-export --engine.",
            kind="sha256", rebuildable=False)


def check_engine(manifest: ModelManifest, actual_sha256: str, runtime: RuntimeFacts, *,
                 path: str | Path, allow_rebuild: bool = False) -> EngineVerdict:
    """Decide whether the plan at ``path`` may be deserialized on this machine.

    A changed file is refused whatever ``allow_rebuild`` says: the manifest's recorded
    ONNX no longer proves anything about bytes that were altered after the build. A plan
    from another TensorRT version or GPU generation is intact but unusable here; it is
    refused, or (``allow_rebuild``) answered with "rebuild from the recorded ONNX".
    """
    check_engine_file(manifest, actual_sha256, path=path)
    build = manifest.build or {}
    built_trt = build.get(BUILD_TENSORRT)
    built_cc = build.get(BUILD_CC)
    if not built_trt or not built_cc:
        missing = [k for k, v in ((BUILD_TENSORRT, built_trt), (BUILD_CC, built_cc)) if not v]
        raise EngineRefused(f"{path}: its manifest does not record {' and '.join(missing)} "
                            f"(build.{missing[0]}); re-export the engine with streamd-export --engine",
                            kind="facts", rebuildable=False)
    problems: list[tuple[str, str]] = []
    try:
        why = plan_incompatibility(str(built_trt), runtime.tensorrt)
    except ValueError as exc:
        raise EngineRefused(f"{path}: {exc}", kind="facts", rebuildable=False) from None
    if why:
        problems.append(("tensorrt", why))
    try:
        cc_built, cc_here = parse_cc(str(built_cc)), parse_cc(runtime.compute_capability)
    except ValueError as exc:
        raise EngineRefused(f"{path}: {exc}", kind="facts", rebuildable=False) from None
    if cc_built != cc_here:
        gpu_built = build.get(BUILD_GPU) or "a GPU"
        gpu_here = runtime.gpu_name or "this GPU"
        problems.append(("compute_capability",
                         f"it was built for {gpu_built} (compute capability {format_cc(*cc_built)}) "
                         f"and {gpu_here} has compute capability {format_cc(*cc_here)} "
                         f"(plans are specific to a GPU generation)"))
    if not problems:
        return EngineVerdict("load")
    reason = "; ".join(p[1] for p in problems)
    onnx_file = build.get(BUILD_ONNX_FILE)
    if allow_rebuild and onnx_file:
        return EngineVerdict("rebuild", reason=reason, onnx_file=str(onnx_file))
    if allow_rebuild:
        hint = "it records no ONNX to rebuild from; build it again with streamd-export --engine"
    elif onnx_file:
        hint = (f"rebuild it on this machine from {onnx_file} (streamd-export --engine, or set "
                f"model.rebuild_engine: true to let the daemon do it)")
    else:
        hint = "build it again on this machine with streamd-export --engine"
    raise EngineRefused(f"{path} cannot be loaded here: {reason}. {hint[0].upper()}{hint[1:]}.",
                        kind=problems[0][0], rebuildable=True)


def check_source_onnx(manifest: ModelManifest, onnx_path: Path, actual_sha256: str) -> None:
    """The ONNX a rebuild would start from must be the one the engine was built from."""
    want = (manifest.build or {}).get(BUILD_ONNX_SHA)
    if not want:
        raise EngineRefused(f"{onnx_path}: the engine manifest records no sha256 of its ONNX, so "
                            f"a rebuild cannot prove it uses the same model", kind="facts",
                            rebuildable=False)
    if actual_sha256 != want:
        raise EngineRefused(f"{onnx_path}: sha256 {actual_sha256[:12]}… is not the ONNX this engine "
                            f"was built from ({str(want)[:12]}…); refusing to rebuild from it",
                            kind="sha256", rebuildable=False)


# ---------------------------------------------------------------------------------------
# optimization profile and batch choice
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchProfile:
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"batch profile min {self.min} / opt {self.opt} / max {self.max}: "
                             f"need 1 <= min <= opt <= max")

    def contains(self, n: int) -> bool:
        return self.min <= n <= self.max

    def shapes(self, chw: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) input shapes for ``IOptimizationProfile.set_shape``."""
        rest = tuple(int(v) for v in chw)
        return (self.min, *rest), (self.opt, *rest), (self.max, *rest)

    def as_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BatchProfile":
        return cls(int(d["min"]), int(d["opt"]), int(d["max"]))


def choose_profile(batch_min: int, batch_max: int, opt: int | None = None) -> BatchProfile:
    """The profile for a model exported with batch ``batch_min..batch_max``.

    TensorRT tunes its kernels for ``opt``. Under load the scheduler fills batches up to
    the maximum, and that is when speed matters, so ``opt`` defaults to ``batch_max``;
    an explicit ``opt`` is clamped into the range.
    """
    if not 1 <= batch_min <= batch_max:
        raise ValueError(f"batch range {batch_min}-{batch_max}: need 1 <= min <= max")
    o = batch_max if opt is None else min(max(int(opt), batch_min), batch_max)
    return BatchProfile(batch_min, o, batch_max)


def profile_from_shapes(min_shape: Sequence[int], opt_shape: Sequence[int],
                        max_shape: Sequence[int]) -> BatchProfile:
    """The batch profile of an engine input (``get_tensor_profile_shape``'s three shapes)."""
    return BatchProfile(int(min_shape[0]), int(opt_shape[0]), int(max_shape[0]))


@dataclass(frozen=True)
class HwProfile:
    """Heights and widths an engine that takes any H x W is built for (multiples of
    ``stride``). The batch axis has its own :class:`BatchProfile`."""

    min: tuple[int, int]
    opt: tuple[int, int]
    max: tuple[int, int]
    stride: int = 32

    def __post_init__(self) -> None:
        for axis, name in ((0, "height"), (1, "width")):
            lo, mid, hi = self.min[axis], self.opt[axis], self.max[axis]
            if not 1 <= lo <= mid <= hi:
                raise ValueError(f"{name} profile min {lo} / opt {mid} / max {hi}: need "
                                 f"1 <= min <= opt <= max")
            bad = [v for v in (lo, mid, hi) if v % self.stride]
            if bad:
                raise ValueError(f"{name} profile min {lo} / opt {mid} / max {hi}: {bad[0]} is not a "
                                 f"multiple of the stride {self.stride}")

    def contains(self, h: int, w: int) -> bool:
        return (self.min[0] <= h <= self.max[0] and self.min[1] <= w <= self.max[1]
                and h % self.stride == 0 and w % self.stride == 0)

    def run_hw(self, h: int, w: int) -> tuple[int, int]:
        """The input size to run an (h, w) batch at: (h, w) itself, or raised to the
        profile's minimum on an axis where it is smaller. The caller pads the extra rows
        and columns at the bottom and right, so box coordinates, counted from the top-left
        corner, are unchanged."""
        if h > self.max[0] or w > self.max[1]:
            raise ValueError(f"input {h}x{w} is larger than the engine's largest, "
                             f"{self.max[0]}x{self.max[1]}")
        if h % self.stride or w % self.stride or h < 1 or w < 1:
            raise ValueError(f"input {h}x{w}: height and width must be positive multiples of the "
                             f"stride {self.stride}")
        return max(h, self.min[0]), max(w, self.min[1])

    def as_dict(self) -> dict[str, Any]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max),
                "stride": self.stride}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HwProfile":
        def hw(v: Any) -> tuple[int, int]:
            h, w = (int(x) for x in v)
            return h, w
        return cls(hw(d["min"]), hw(d["opt"]), hw(d["max"]), int(d.get("stride", 32)))


def _round_up(v: int, stride: int) -> int:
    return -(-v // stride) * stride


def choose_hw_profile(imgsz: tuple[int, int], stride: int = 32) -> HwProfile:
    """The H x W profile of an engine built from a model that takes any H x W up to ``imgsz``.

    max is ``imgsz``, the largest input the manifest promises. opt is ``imgsz`` too: TensorRT
    times its kernels at opt, the full size is where a batch costs most, and every input the
    daemon makes keeps one side at (or near) its full length.

    min is half of each side, rounded up to the stride. With a square ``imgsz``, a camera of
    any aspect from 2:1 to 1:2 (4:3, 3:2, 16:10, 16:9, square, and their portrait forms)
    letterboxes to an input no smaller than that, so it runs as it is. The range is kept no
    wider than the cameras need because TensorRT must choose kernels valid for every shape
    in it, not only for opt. A stranger aspect (a 32:9 panorama: 640x192 at 640) is padded
    up to the minimum by the backend (:meth:`HwProfile.run_hw`), which still gives correct
    boxes.
    """
    h, w = (int(v) for v in imgsz)
    if stride < 1 or h < stride or w < stride or h % stride or w % stride:
        raise ValueError(f"imgsz {h}x{w}: both sides must be positive multiples of the stride {stride}")
    mn = (max(stride, _round_up(h // 2, stride)), max(stride, _round_up(w // 2, stride)))
    return HwProfile(mn, (h, w), (h, w), stride)


def hw_profile_from_shapes(min_shape: Sequence[int], opt_shape: Sequence[int],
                           max_shape: Sequence[int], stride: int = 32) -> HwProfile:
    """The H x W profile of an engine input (``get_tensor_profile_shape``'s three shapes)."""
    def hw(shape: Sequence[int]) -> tuple[int, int]:
        return int(shape[2]), int(shape[3])
    return HwProfile(hw(min_shape), hw(opt_shape), hw(max_shape), stride)


def profile_shapes(batch: BatchProfile, hw: HwProfile | None,
                   imgsz: tuple[int, int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) NCHW input shapes for ``IOptimizationProfile.set_shape``: the batch
    profile, with H x W fixed at ``imgsz`` or from ``hw`` for an engine that takes any H x W."""
    if hw is None:
        return batch.shapes((3, *imgsz))
    return ((batch.min, 3, *hw.min), (batch.opt, 3, *hw.opt), (batch.max, 3, *hw.max))


def hw_profile_for_network(input_shape: Sequence[int], imgsz: tuple[int, int], stride: int = 32,
                           requested: HwProfile | None = None, *, name: str = "input") -> HwProfile | None:
    """The H x W profile to build a network with: None for a network of fixed H x W, the
    ``requested`` one or :func:`choose_hw_profile`'s for one whose H and W are dynamic."""
    dims = [int(d) for d in input_shape]
    if len(dims) != 4:
        raise ValueError(f"{name}: shape {tuple(dims)} is not (batch, 3, height, width)")
    dyn_h, dyn_w = dims[2] < 0, dims[3] < 0
    if dyn_h != dyn_w:
        raise ValueError(f"{name}: shape {tuple(dims)} has one of height and width dynamic, the "
                         f"other fixed; export the model with both dynamic or --fixed-size")
    if not dyn_h:
        if requested is not None:
            raise ValueError(f"{name}: shape {tuple(dims)} has a fixed height and width; an H x W "
                             f"profile ({requested.as_dict()}) does not apply")
        if (dims[2], dims[3]) != tuple(imgsz):
            raise ValueError(f"{name}: shape {tuple(dims)} is not of the manifest's size "
                             f"{imgsz[0]}x{imgsz[1]}")
        return None
    hw = requested if requested is not None else choose_hw_profile(imgsz, stride)
    if hw.max != tuple(imgsz):
        raise ValueError(f"{name}: H x W profile max {hw.max[0]}x{hw.max[1]} is not the manifest's "
                         f"imgsz {imgsz[0]}x{imgsz[1]}")
    return hw


@dataclass(frozen=True)
class RunBatch:
    run: int        # batch size to execute
    pad: int        # zero images appended to reach ``run`` (a profile with min > frames)
    take: int       # frames consumed from the queue


def choose_run_batch(queued: int, profile: BatchProfile) -> RunBatch:
    """How to run ``queued`` frames on an engine with ``profile``.

    More frames than ``max`` run as one full batch (the rest wait for the next one);
    fewer than ``min`` are padded up to ``min`` with blank images whose outputs are
    dropped. Any size in between runs as it is: the profile covers it.
    """
    if queued < 1:
        raise ValueError(f"cannot run a batch of {queued} frames")
    take = min(queued, profile.max)
    run = max(take, profile.min)
    return RunBatch(run=run, pad=run - take, take=take)


# ---------------------------------------------------------------------------------------
# tensors, dtypes and buffer sizes
# ---------------------------------------------------------------------------------------
# TensorRT DataType member names -> numpy. Types without a numpy counterpart map to None:
# an engine with such an I/O tensor needs a conversion streamd does not do.
_TRT_TO_NUMPY: dict[str, str | None] = {
    "FLOAT": "float32",
    "HALF": "float16",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "BF16": None,
    "FP8": None,
    "INT4": None,
    "FP4": None,
    "E8M0": None,
}


def trt_dtype_name(dtype: object) -> str:
    """``trt.DataType.HALF`` (or its str, ``"DataType.HALF"``) -> ``"HALF"``."""
    name = getattr(dtype, "name", None)
    text = name if isinstance(name, str) else str(dtype)
    return text.rsplit(".", 1)[-1].upper()


def numpy_dtype(dtype: object) -> np.dtype:
    name = trt_dtype_name(dtype)
    if name not in _TRT_TO_NUMPY:
        raise ValueError(f"unknown TensorRT data type {name!r}")
    np_name = _TRT_TO_NUMPY[name]
    if np_name is None:
        raise ValueError(f"TensorRT data type {name} has no numpy equivalent; export the model "
                         f"with float32 inputs and outputs")
    return np.dtype(np_name)


def resolve_shape(shape: Sequence[int], batch: int, *, name: str = "tensor") -> tuple[int, ...]:
    """Replace the dynamic batch axis (-1 at axis 0) with ``batch``; refuse other dynamic axes
    (those of an engine that takes any H x W are resolved by :func:`check_runtime_shape`)."""
    dims = [int(d) for d in shape]
    if not dims:
        raise ValueError(f"{name}: has no dimensions")
    if dims[0] < 0:
        dims[0] = int(batch)
    unresolved = [i for i, d in enumerate(dims) if d < 0]
    if unresolved:
        raise ValueError(f"{name}: shape {tuple(shape)} has dynamic axes {unresolved} besides the "
                         f"batch; give the shape TensorRT reports for the input size")
    return tuple(dims)


def check_runtime_shape(declared: Sequence[int], got: Sequence[int], batch: int, *,
                        name: str = "tensor") -> tuple[int, ...]:
    """The shape TensorRT reports for a tensor once the input shape is set (``got``), held to
    the engine's ``declared`` shape (-1 where dynamic): the batch axis must be ``batch``,
    every fixed axis as declared, every dynamic one positive."""
    want = [int(d) for d in declared]
    have = tuple(int(d) for d in got)
    if len(have) != len(want):
        raise ValueError(f"{name}: TensorRT reports shape {have}, the engine declares {tuple(want)}")
    if want and want[0] < 0:
        want[0] = int(batch)
    for i, (w, g) in enumerate(zip(want, have)):
        if (w >= 0 and g != w) or g < 1:
            expect = tuple("?" if d < 0 else d for d in want)
            raise ValueError(f"{name}: TensorRT reports shape {have} for a batch of {batch}, "
                             f"expected {expect} (axis {i})")
    return have


def nbytes(shape: Sequence[int], dtype: object) -> int:
    dt = dtype if isinstance(dtype, np.dtype) else numpy_dtype(dtype)
    return int(math.prod(int(d) for d in shape)) * dt.itemsize


@dataclass(frozen=True)
class TensorSpec:
    """One engine I/O tensor as TensorRT reports it (shape may hold -1)."""

    name: str
    is_input: bool
    shape: tuple[int, ...]
    dtype: str                         # TensorRT DataType name: FLOAT, HALF, ...


@dataclass(frozen=True)
class BufferSpec:
    name: str
    is_input: bool
    shape: tuple[int, ...]             # at the largest batch
    dtype: np.dtype
    nbytes: int


def plan_buffers(tensors: Iterable[TensorSpec], batch_max: int,
                 at_max: Mapping[str, Sequence[int]] | None = None) -> list[BufferSpec]:
    """Buffers big enough for every batch of the profile (allocated once, at load).

    For an engine that takes any H x W, ``at_max`` holds the shapes TensorRT reports with
    the input set to its largest batch and size; tensors with dynamic axes besides the
    batch are sized from it."""
    out: list[BufferSpec] = []
    for t in tensors:
        if at_max is not None and t.name in at_max:
            shape = check_runtime_shape(t.shape, at_max[t.name], batch_max, name=t.name)
        else:
            shape = resolve_shape(t.shape, batch_max, name=t.name)
        dt = numpy_dtype(t.dtype)
        out.append(BufferSpec(t.name, t.is_input, shape, dt, nbytes(shape, dt)))
    return out


def check_io(tensors: Sequence[TensorSpec], *, path: str | Path, input_name: str,
             output_names: Sequence[str], imgsz: tuple[int, int], dynamic_hw: bool = False) -> None:
    """The engine's I/O must be what its manifest promises: one NCHW image input, of H x W
    ``imgsz`` or (``dynamic_hw``) dynamic H and W, and the outputs by name. Messages say
    expected vs got."""
    inputs = [t for t in tensors if t.is_input]
    outputs = [t for t in tensors if not t.is_input]
    if [t.name for t in inputs] != [input_name]:
        raise ValueError(f"{path}: engine inputs are {[t.name for t in inputs]}, "
                         f"the manifest says [{input_name!r}]")
    inp = inputs[0]
    h, w = imgsz
    if dynamic_hw:
        if len(inp.shape) != 4 or inp.shape[1] != 3 or inp.shape[2] >= 0 or inp.shape[3] >= 0:
            raise ValueError(f"{path}: input {inp.name!r} has shape {inp.shape}, expected "
                             f"(batch, 3, -1, -1): the manifest says the model takes any H x W "
                             f"up to {h}x{w}")
    elif len(inp.shape) != 4 or tuple(inp.shape[1:]) != (3, h, w):
        raise ValueError(f"{path}: input {inp.name!r} has shape {inp.shape}, "
                         f"expected (batch, 3, {h}, {w})")
    got = sorted(t.name for t in outputs)
    if got != sorted(output_names):
        raise ValueError(f"{path}: engine outputs are {got}, the manifest says {sorted(output_names)}")


# ---------------------------------------------------------------------------------------
# precision per TensorRT version
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildMode:
    explicit_batch_flag: bool          # NetworkDefinitionCreationFlag.EXPLICIT_BATCH (< 10 only)
    strongly_typed: bool               # NetworkDefinitionCreationFlag.STRONGLY_TYPED
    builder_flags: tuple[str, ...]     # BuilderFlag member names to set
    pin_decode_fp32: bool              # weak typing: keep the head's decode layers in FP32


def build_mode(version: TrtVersion, precision: str) -> BuildMode:
    """How to build ``precision`` from an ONNX that already carries it (FP16 casts, Q/DQ).

    * 8.5-9.x: weak typing only. FP16/INT8 must be enabled by builder flags (Q/DQ networks
      need INT8); with FP16 the decode layers are pinned to FP32, since weak typing would
      otherwise be free to run them in half precision.
    * 10.x: a strongly typed network builds exactly the types in the ONNX, no flags.
    * 11+: strong typing is the only mode (the precision flags are gone).
    """
    check_supported(version)
    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"unknown precision {precision!r}")
    if version.major < 10:
        flags = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8",)}[precision]
        return BuildMode(explicit_batch_flag=True, strongly_typed=False, builder_flags=flags,
                         pin_decode_fp32=precision == "fp16")
    if version.major == 10:
        return BuildMode(explicit_batch_flag=False, strongly_typed=precision != "fp32",
                         builder_flags=(), pin_decode_fp32=False)
    return BuildMode(explicit_batch_flag=False, strongly_typed=True, builder_flags=(),
                     pin_decode_fp32=False)


# ---------------------------------------------------------------------------------------
# the YOLOv8 head's decode part
# ---------------------------------------------------------------------------------------
DEFAULT_HEAD_PREFIX = "/model.22/"
_BRANCH_RE = re.compile(r"^cv\d+\.\d+/")   # cv2.0/..., cv3.1/...: per-level conv branches


def head_prefix(node_names: Iterable[str]) -> str:
    """The name prefix of the Detect head's nodes (``/model.22/`` for YOLOv8 n/s/m/l/x).

    Found from the DFL nodes, which only the head has; falls back to YOLOv8's index.
    """
    for name in node_names:
        i = name.find("/dfl/")
        if i > 0:
            return name[:i + 1]
    return DEFAULT_HEAD_PREFIX


def is_decode_node(name: str, op_type: str, prefix: str) -> bool:
    """Part of the decode (DFL softmax and its conv, anchors, strides, box and score concat,
    the class sigmoid), as opposed to the head's per-level conv branches."""
    if not name.startswith(prefix):
        return False
    return _BRANCH_RE.match(name[len(prefix):]) is None


def keep_float_in_int8(name: str, op_type: str, prefix: str) -> bool:
    """Nodes the INT8 quantization leaves in float: everything of the head that is not one
    of its branch convolutions. The DFL's fixed 0..15 conv is part of the decode and stays
    float too: quantizing its softmax input shifts every box edge."""
    if not name.startswith(prefix):
        return False
    if op_type != "Conv":
        return True
    return is_decode_node(name, op_type, prefix)
