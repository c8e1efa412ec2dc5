"""Engines without a manifest, loaded because the config says so (``model.trust_engine: true``).

An engine built elsewhere (``trtexec --onnx=model.onnx --saveEngine=model.engine``) carries no
manifest: nothing records its classes, what built it, or the sha256 of its bytes. With
``trust_engine`` the daemon loads it anyway and learns what it needs from the engine itself:

* the one input: its name, dtype, (batch, 3, H, W) shape (float), or (batch, H, W, 3) for a
  uint8 input (an engine built from a ``streamd-export --input uint8`` ONNX, which takes the
  letterbox's BGR bytes: its contract is read with ``manifest.contract_from_graph``, as for an
  ONNX without a manifest) and, where batch or H x W are dynamic, the range of its optimisation
  profile 0 (the profile the runtime runs), giving the batch range, ``imgsz`` and whether the
  engine takes any H x W;
* the one output: the raw YOLOv8 head (batch, 4 + classes, anchors) or the end-to-end layout
  with NMS in the graph (batch, max_det, 6), named as the manifest's ``output_layout`` names
  them;
* the class names from the config (``model.names`` or ``model.names_file``), whose count must
  be the raw head's number of classes.

From these an in-memory manifest is made (never written: an adopted engine's manifest is
``streamd-export --adopt-engine``'s to write), so the runtime then loads the engine exactly as
one of its own. Everything here is plain Python over the documented TensorRT engine calls
(``num_io_tensors``, ``get_tensor_name``, ``get_tensor_mode``, ``get_tensor_shape``,
``get_tensor_dtype``, ``get_tensor_format``, ``num_optimization_profiles``,
``get_tensor_profile_shape``), so it is tested against a stand-in engine object on a machine
without TensorRT. This module never imports tensorrt.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import ManifestError
from ...manifest import (
    LAYOUT_END2END,
    LAYOUT_RAW,
    RAW_UINT8,
    InputContract,
    ModelManifest,
    contract_from_graph,
    sidecar_path,
)
from .logic import BUILD_CC, BUILD_GPU, BUILD_TENSORRT, FORMAT_TENSORRT, RuntimeFacts
from .profiles import BatchProfile, HwProfile, hw_profile_from_shapes, numpy_dtype, trt_dtype_name

log = logging.getLogger("streamd.backend.tensorrt")

TRUSTED_PLAN_HINT = ("; a trusted engine must be a plain plan (as trtexec --saveEngine writes it) built by "
                     "this TensorRT version for this GPU")

BUILD_TRUSTED = "trusted"          # build facts of an in-memory manifest: loaded on trust_engine
TRUSTED_PRECISION = "unknown"      # an engine's layer precisions are not visible from its I/O
END2END_COLUMNS = 6                # x1, y1, x2, y2, score, class
BOX_ROWS = 4                       # cx, cy, w, h ahead of the class scores in the raw head
TRUST_HINT = ("set model.trust_engine: true with the class names in model.names (or model.names_file) "
              "to load it as it is, or write its manifest with streamd-export --adopt-engine ENGINE "
              "--onnx MODEL.onnx (from the ONNX it was built from)")


@dataclass(frozen=True)
class EngineTensor:
    """One I/O tensor as the engine reports it (-1 where an axis is dynamic)."""

    name: str
    is_input: bool
    shape: tuple[int, ...]
    dtype: str                     # TensorRT DataType member name: FLOAT, HALF, ...
    format: str                    # TensorFormat member name: LINEAR, CHW32, ...

    def text(self) -> str:
        dims = ", ".join("?" if d < 0 else str(d) for d in self.shape)
        return f"{self.name} ({dims}) {self.dtype}"


@dataclass(frozen=True)
class EngineIO:
    """What a manifest-less engine's I/O says about the model in it."""

    input: EngineTensor
    output: EngineTensor
    batch: BatchProfile
    hw: HwProfile | None           # set where the engine takes any H x W
    imgsz: tuple[int, int]         # (height, width): the fixed size, or the profile's largest
    layout: str                    # LAYOUT_RAW | LAYOUT_END2END
    classes: int | None            # the raw head's class count; None for end-to-end outputs
    profiles: int                  # optimisation profiles in the engine (profile 0 is used)
    contract: InputContract        # float NCHW RGB, or the uint8 NHWC BGR letterbox bytes

    def describe(self) -> str:
        """One line for logs, ``streamd check`` and ``streamd doctor``."""
        h, w = self.imgsz
        if self.hw is not None:
            size = f"any HxW from {self.hw.min[1]}x{self.hw.min[0]} to {w}x{h} (stride {self.hw.stride})"
        else:
            size = f"{w}x{h}"
        if self.batch.min == self.batch.max:
            batch = f"batch {self.batch.max} (fixed)"
        else:
            batch = f"batch {self.batch.min}-{self.batch.max} (opt {self.batch.opt})"
        if self.layout == LAYOUT_RAW:
            out = f"{LAYOUT_RAW}, {self.classes} classes"
        else:
            out = f"{LAYOUT_END2END}, up to {self.output.shape[1]} boxes after NMS in the engine"
        dynamic = self.hw is not None or self.input.shape[0] < 0
        extra = (f", profile 0 of {self.profiles}" if dynamic and self.profiles > 1 else "")
        return (f"input {self.input.text()}: {size}, {batch}{extra}; "
                f"output {self.output.text()}: {out}")


def read_engine_tensors(engine: Any) -> list[EngineTensor]:
    """The engine's I/O tensors, through TensorRT's name-based tensor API (8.5+)."""
    out = []
    for i in range(int(engine.num_io_tensors)):
        name = str(engine.get_tensor_name(i))
        out.append(EngineTensor(
            name=name,
            is_input=trt_dtype_name(engine.get_tensor_mode(name)) == "INPUT",
            shape=tuple(int(d) for d in engine.get_tensor_shape(name)),
            dtype=trt_dtype_name(engine.get_tensor_dtype(name)),
            format=trt_dtype_name(engine.get_tensor_format(name))))
    return out


def _dims(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


def _float_dtype(t: EngineTensor, path: Path, what: str) -> None:
    if t.dtype not in ("FLOAT", "HALF"):
        raise ManifestError(f"{path}: {what} {t.text()} is not FLOAT or HALF; a trusted engine must take "
                            f"and give floats as YOLOv8 exports do (an engine with other I/O types needs "
                            f"its manifest: streamd-export --adopt-engine)")
    _linear(t, path, what)


def _input_contract(t: EngineTensor, path: Path) -> InputContract:
    """What the input takes: floats (FLOAT or HALF, NCHW RGB), or the letterbox's uint8 BGR bytes
    channels last, as an engine built from a ``streamd-export --input uint8`` ONNX takes them."""
    if t.dtype != "UINT8":
        _float_dtype(t, path, "input")
        return contract_from_graph(str(numpy_dtype(t.dtype)), t.shape)
    contract = contract_from_graph("uint8", t.shape)
    if contract != RAW_UINT8:          # uint8 in another layout: no such export to have built it from
        raise ManifestError(f"{path}: input {t.text()} is UINT8 but not (batch, H, W, 3); a uint8 input "
                            f"takes the letterbox's BGR bytes channels last, as streamd-export --input uint8 "
                            f"makes it")
    _linear(t, path, "input")
    return contract


def _linear(t: EngineTensor, path: Path, what: str) -> None:
    if t.format != "LINEAR":
        raise ManifestError(f"{path}: {what} {t.name!r} has TensorRT format {t.format}, not LINEAR; build "
                            f"the engine without --inputIOFormats/--outputIOFormats vectorised formats")


def infer_engine_io(engine: Any, *, path: Path, stride: int = 32) -> EngineIO:
    """Read ``engine``'s I/O and decide what it is, or say in one sentence why streamd cannot
    run it (the message names the tensors and their shapes)."""
    tensors = read_engine_tensors(engine)
    inputs = [t for t in tensors if t.is_input]
    outputs = [t for t in tensors if not t.is_input]
    if len(inputs) != 1:
        listed = "; ".join(t.text() for t in inputs) or "none"
        raise ManifestError(f"{path}: the engine has {len(inputs)} inputs ({listed}); streamd feeds one "
                            f"image tensor (batch, 3, H, W), as YOLOv8 detection exports take")
    if len(outputs) != 1:
        listed = "; ".join(t.text() for t in outputs) or "none"
        raise ManifestError(f"{path}: the engine has {len(outputs)} outputs ({listed}); streamd reads one: "
                            f"the YOLOv8 head (batch, 4 + classes, anchors) or end-to-end detections "
                            f"(batch, max_det, 6) (segmentation/pose heads and NMS plugins with several "
                            f"outputs are not supported)")
    inp, out = inputs[0], outputs[0]
    contract = _input_contract(inp, path)
    _float_dtype(out, path, "output")
    shape = inp.shape
    if len(shape) != 4 or (shape[1] != 3 and not contract.raw):
        raise ManifestError(f"{path}: input {inp.text()} is not (batch, 3, H, W)")
    fixed_hw = contract.hw(shape)
    dyn_h, dyn_w = fixed_hw[0] < 0, fixed_hw[1] < 0
    if dyn_h != dyn_w:
        raise ManifestError(f"{path}: input {inp.text()} has one of H and W dynamic and the other fixed; "
                            f"streamd runs engines with both fixed or both dynamic")
    profiles = int(engine.num_optimization_profiles)
    limits: tuple[tuple[int, ...], ...] | None = None
    if shape[0] < 0 or dyn_h:
        if profiles < 1:
            raise ManifestError(f"{path}: input {inp.text()} has dynamic axes but the engine has no "
                                f"optimisation profile")
        limits = tuple(_dims(s) for s in engine.get_tensor_profile_shape(inp.name, 0))
        if len(limits) != 3 or any(len(s) != 4 for s in limits):
            raise ManifestError(f"{path}: profile 0 of input {inp.name!r} is {limits}, not three "
                                f"{contract.shape_text('batch', 'H', 'W')} shapes (min, opt, max)")
    if shape[0] < 0:
        assert limits is not None
        try:
            batch = BatchProfile(limits[0][0], limits[1][0], limits[2][0])
        except ValueError as exc:
            raise ManifestError(f"{path}: input {inp.name!r}: {exc}") from None
    elif shape[0] >= 1:
        batch = BatchProfile(shape[0], shape[0], shape[0])
    else:
        raise ManifestError(f"{path}: input {inp.text()} has batch {shape[0]}")
    hw: HwProfile | None = None
    if dyn_h:
        assert limits is not None
        try:
            hw = hw_profile_from_shapes(*limits, stride=stride, layout=contract.layout)
        except ValueError as exc:
            raise ManifestError(f"{path}: the H x W range of input {inp.name!r} in profile 0: {exc}") from None
        imgsz = hw.max
    else:
        imgsz = fixed_hw
    layout, classes = _output_layout(out, batch_fixed=shape[0] >= 0, batch=shape[0], any_hw=hw is not None,
                                     path=path)
    return EngineIO(inp, out, batch, hw, imgsz, layout, classes, profiles, contract)


def _output_layout(out: EngineTensor, *, batch_fixed: bool, batch: int, any_hw: bool,
                   path: Path) -> tuple[str, int | None]:
    """(layout, classes) of the output. A raw head never has 6 anchors (the smallest YOLOv8
    input, 32 x 32, already has 21), so a last axis of 6 means end-to-end detections."""
    s = out.shape
    if len(s) != 3:
        raise ManifestError(f"{path}: output {out.text()} is not 3-dimensional: expected the YOLOv8 head "
                            f"(batch, 4 + classes, anchors) or end-to-end detections (batch, max_det, 6)")
    if (batch_fixed and s[0] != batch) or (not batch_fixed and s[0] >= 0):
        raise ManifestError(f"{path}: output {out.text()} does not follow the input's batch axis "
                            f"({'dynamic' if not batch_fixed else batch})")
    if s[2] == END2END_COLUMNS:
        if s[1] < 1:
            raise ManifestError(f"{path}: output {out.text()}: end-to-end detections need a fixed max_det")
        return LAYOUT_END2END, None
    if s[1] <= BOX_ROWS:
        raise ManifestError(f"{path}: output {out.text()} has {s[1]} rows per anchor; the YOLOv8 head has "
                            f"4 box rows and one row per class")
    if s[2] < 0 and not any_hw:
        raise ManifestError(f"{path}: output {out.text()} has a dynamic anchor axis but the input's H x W "
                            f"is fixed")
    return LAYOUT_RAW, s[1] - BOX_ROWS


def trust_checks(path: Path, trust_engine: bool, names: Sequence[str] | None) -> list[str] | None:
    """Before TensorRT is touched: the class names to load ``path`` with on trust (a list), or
    None where the engine has its manifest (which is then what it is loaded by). An engine
    without a manifest is refused unless the config trusts it and names its classes."""
    if sidecar_path(path).exists():
        if trust_engine:
            log.info("model.trust_engine: %s has a manifest (%s); it is loaded and checked by it",
                     path.name, sidecar_path(path).name)
        return None
    if not trust_engine:
        raise ManifestError(f"{path}: no manifest ({sidecar_path(path).name}) beside the engine; streamd "
                            f"loads engines whose manifest records what built them (streamd-export "
                            f"--engine), or, said in the config, an engine built elsewhere: {TRUST_HINT}")
    if not names:
        raise ManifestError(f"{path}: model.trust_engine is set but no class names are given: a trusted "
                            f"engine takes them from model.names (or model.names_file)")
    return [str(n) for n in names]


def check_names(io: EngineIO, names: Sequence[str] | None, *, path: Path) -> dict[int, str]:
    """The config's class names by id; their count must be the head's class count."""
    if not names:
        raise ManifestError(f"{path}: a trusted engine takes its class names from the config: "
                            f"model.names (or model.names_file) is not set")
    if io.classes is not None and len(names) != io.classes:
        raise ManifestError(
            f"{path}: model.names lists {len(names)} class names, but the engine's output "
            f"{io.output.text()} has {io.classes} classes ({io.output.shape[1]} rows = 4 box rows + "
            f"{io.classes} class scores); give exactly {io.classes} names, in class-id order")
    return dict(enumerate(str(n) for n in names))


def trusted_manifest(io: EngineIO, names: Sequence[str] | None, *, path: Path, sha256: str,
                     facts: RuntimeFacts, stride: int = 32) -> ModelManifest:
    """The in-memory manifest the runtime loads a trusted engine with: what the engine's I/O
    says, the config's names, and this machine's TensorRT and GPU (the engine deserialized
    here, so it is valid for them)."""
    manifest = ModelManifest(
        model_file=path.name, model_sha256=sha256, model_format=FORMAT_TENSORRT,
        class_names=check_names(io, names, path=path), imgsz=io.imgsz,
        batch_min=io.batch.min, batch_max=io.batch.max, output_layout=io.layout, stride=stride,
        dynamic_hw=io.hw is not None, precision=TRUSTED_PRECISION, input_name=io.input.name,
        input_dtype=io.contract.dtype, input_layout=io.contract.layout, input_channels=io.contract.channels,
        output_names=[io.output.name],
        build={BUILD_TENSORRT: facts.tensorrt, BUILD_CC: facts.compute_capability,
               BUILD_GPU: facts.gpu_name, BUILD_TRUSTED: True})
    manifest.validate(f"{path} (read from the engine)")
    return manifest


def load_trusted(engine: Any, *, path: Path, names: Sequence[str], sha256: str,
                 facts: RuntimeFacts) -> tuple[ModelManifest, EngineIO]:
    """What the runtime loads a trusted engine by, once TensorRT has deserialized it: the
    manifest its I/O makes, and that I/O; logs the warning."""
    io = infer_engine_io(engine, path=path)
    manifest = trusted_manifest(io, names, path=path, sha256=sha256, facts=facts)
    log.warning("%s", trust_warning(io, path=path, sha256=sha256, names=names))
    return manifest, io


def trust_warning(io: EngineIO, *, path: Path, sha256: str, names: Sequence[str]) -> str:
    """The WARNING logged whenever a trusted engine is loaded."""
    shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
    unchecked = ("; an end-to-end output does not say how many classes the model has, so a class id "
                 "beyond these names is published by its number" if io.classes is None else "")
    return (f"model.trust_engine: loading {path.name} without a manifest: its bytes (sha256 "
            f"{sha256[:12]}…) are checked against nothing, and TensorRT runs it as native code. "
            f"Read from the engine: {io.describe()}; class names from the config: {shown}{unchecked}")


def read_plan_io(path: Path) -> EngineIO:  # pragma: no cover - needs TensorRT and a GPU
    """Deserialize the plan at ``path`` with TensorRT and read its I/O (``streamd doctor``).
    Written against TensorRT's documented Python API (``Runtime.deserialize_cuda_engine``)."""
    from ...errors import BackendError
    from .build import last_error, make_logger
    from .probe import import_tensorrt

    trt = import_tensorrt()
    logger = make_logger(trt)
    engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise BackendError(f"{path.name}: TensorRT could not deserialize the engine{last_error(logger)} "
                           f"(built by another TensorRT version, or for another GPU?)")
    return infer_engine_io(engine, path=path)
