"""Shapes of TensorRT engines, decided without TensorRT: optimization profiles, the batch and
input size to run, tensor dtypes and the buffers that hold them.

* optimization profiles: min/opt/max batch (:class:`BatchProfile`), and min/opt/max height
  and width for models that take any H x W (:class:`HwProfile`);
* the batch to run for a number of queued frames, the input size to run a batch at;
* shapes TensorRT reports, held to what the engine declares; I/O buffer sizes from tensor
  shapes and TensorRT dtype names; the engine's I/O against its manifest.

The build (``build``) and the runtime (``runtime``) apply these; tests call them as plain
functions. This module never imports tensorrt or pycuda.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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


def _hw_axes(layout: str) -> tuple[int, int]:
    """Where H and W sit in an image input: NCHW (the float export) or NHWC (``--input uint8``)."""
    return (1, 2) if layout == "nhwc" else (2, 3)


def _image_shape(n: int, hw: Sequence[int], layout: str) -> tuple[int, ...]:
    h, w = (int(v) for v in hw)
    return (n, h, w, 3) if layout == "nhwc" else (n, 3, h, w)


def hw_profile_from_shapes(min_shape: Sequence[int], opt_shape: Sequence[int],
                           max_shape: Sequence[int], stride: int = 32, layout: str = "nchw") -> HwProfile:
    """The H x W profile of an engine input (``get_tensor_profile_shape``'s three shapes)."""
    ah, aw = _hw_axes(layout)

    def hw(shape: Sequence[int]) -> tuple[int, int]:
        return int(shape[ah]), int(shape[aw])
    return HwProfile(hw(min_shape), hw(opt_shape), hw(max_shape), stride)


def profile_shapes(batch: BatchProfile, hw: HwProfile | None, imgsz: tuple[int, int],
                   layout: str = "nchw") -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) input shapes (NCHW, or NHWC for a uint8 input) for
    ``IOptimizationProfile.set_shape``: the batch profile, with H x W fixed at ``imgsz`` or
    from ``hw`` for an engine that takes any H x W."""
    sizes = (imgsz, imgsz, imgsz) if hw is None else (hw.min, hw.opt, hw.max)
    return (_image_shape(batch.min, sizes[0], layout), _image_shape(batch.opt, sizes[1], layout),
            _image_shape(batch.max, sizes[2], layout))


def hw_profile_for_network(input_shape: Sequence[int], imgsz: tuple[int, int], stride: int = 32,
                           requested: HwProfile | None = None, *, name: str = "input",
                           layout: str = "nchw") -> HwProfile | None:
    """The H x W profile to build a network with: None for a network of fixed H x W, the
    ``requested`` one or :func:`choose_hw_profile`'s for one whose H and W are dynamic."""
    dims = [int(d) for d in input_shape]
    if len(dims) != 4:
        raise ValueError(f"{name}: shape {tuple(dims)} is not {_shape_words(layout)}")
    ah, aw = _hw_axes(layout)
    dyn_h, dyn_w = dims[ah] < 0, dims[aw] < 0
    if dyn_h != dyn_w:
        raise ValueError(f"{name}: shape {tuple(dims)} has one of height and width dynamic, the "
                         f"other fixed; export the model with both dynamic or --fixed-size")
    if not dyn_h:
        if requested is not None:
            raise ValueError(f"{name}: shape {tuple(dims)} has a fixed height and width; an H x W "
                             f"profile ({requested.as_dict()}) does not apply")
        if (dims[ah], dims[aw]) != tuple(imgsz):
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


def _shape_words(layout: str) -> str:
    return "(batch, height, width, 3)" if layout == "nhwc" else "(batch, 3, height, width)"


def check_io(tensors: Sequence[TensorSpec], *, path: str | Path, input_name: str,
             output_names: Sequence[str], imgsz: tuple[int, int], dynamic_hw: bool = False,
             layout: str = "nchw") -> None:
    """The engine's I/O must be what its manifest promises: one image input (NCHW, or NHWC
    for a uint8 input), of H x W ``imgsz`` or (``dynamic_hw``) dynamic H and W, and the
    outputs by name. Messages say expected vs got."""
    inputs = [t for t in tensors if t.is_input]
    outputs = [t for t in tensors if not t.is_input]
    if [t.name for t in inputs] != [input_name]:
        raise ValueError(f"{path}: engine inputs are {[t.name for t in inputs]}, "
                         f"the manifest says [{input_name!r}]")
    inp = inputs[0]
    h, w = imgsz
    ah, aw = _hw_axes(layout)
    ac = 3 if layout == "nhwc" else 1
    if dynamic_hw:
        if len(inp.shape) != 4 or inp.shape[ac] != 3 or inp.shape[ah] >= 0 or inp.shape[aw] >= 0:
            raise ValueError(f"{path}: input {inp.name!r} has shape {inp.shape}, expected "
                             f"(batch, {', '.join(map(str, _image_shape(-1, (-1, -1), layout)[1:]))}): the "
                             f"manifest says the model takes any H x W up to {h}x{w}")
    elif len(inp.shape) != 4 or tuple(inp.shape[1:]) != _image_shape(0, (h, w), layout)[1:]:
        raise ValueError(f"{path}: input {inp.name!r} has shape {inp.shape}, "
                         f"expected (batch, {', '.join(map(str, _image_shape(0, (h, w), layout)[1:]))})")
    got = sorted(t.name for t in outputs)
    if got != sorted(output_names):
        raise ValueError(f"{path}: engine outputs are {got}, the manifest says {sorted(output_names)}")
