"""What an exported ONNX model is, whichever runtime opens it.

ONNX Runtime and OpenVINO read the same ``.onnx`` files and manifests; the facts the daemon
needs (class names, input size, batch range, output layout, any-H x W) and the checks that
a manifest matches its graph live here once, fed by each runtime's view of the graph.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ManifestError, ModelError
from ..manifest import LAYOUT_END2END, LAYOUT_RAW, ModelManifest, contract_from_graph, sidecar_path
from .base import ModelInfo


@dataclass(frozen=True)
class GraphIO:
    """A runtime's view of the graph's first input and output."""

    input_name: str
    input_shape: tuple[int | None, ...]    # None: a dynamic (named or unnamed) axis
    input_dtype: np.dtype | None           # None: a type streamd does not feed
    input_type: str                        # the runtime's own name for it, for errors
    shape_text: str                        # the runtime's own rendering of the shape, for errors
    output_shape: tuple[int | None, ...]
    metadata: Mapping[str, str]            # the ONNX metadata_props


def first_line(exc: BaseException, limit: int = 300) -> str:
    """A runtime's error in one line: their messages run to many lines of stack and graph."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def read_manifest(path: Path, verify_sha256: bool) -> ModelManifest | None:
    """The sidecar manifest of ``path`` when there is one, its sha256 checked against the file."""
    if not sidecar_path(path).exists():
        return None
    manifest = ModelManifest.read(path)
    if verify_sha256:
        manifest.check_file(path)
    return manifest


def parse_names(text: str) -> dict[int, str]:
    # Ultralytics stores names as a Python dict literal: "{0: 'person', 1: 'bicycle'}".
    value = ast.literal_eval(text)
    if isinstance(value, list):
        value = dict(enumerate(value))
    return {int(k): str(v) for k, v in value.items()}


def model_info(path: Path, manifest: ModelManifest | None, g: GraphIO) -> ModelInfo:
    """The model's facts from its manifest (or, without one, the ONNX metadata Ultralytics
    writes), cross-checked against the graph."""
    if g.input_dtype is None:
        raise ModelError(f"{path}: input type {g.input_type} is not supported (float, float16, or uint8 "
                         f"pixels from streamd-export --input uint8)")
    graph_contract = contract_from_graph(g.input_dtype.name, g.input_shape)
    contract = manifest.input_contract() if manifest is not None else graph_contract
    if contract.raw != graph_contract.raw:
        raise ManifestError(f"{path}: manifest says input {contract.describe()}, but the graph's input "
                            f"{g.input_name!r} is {g.input_type} {g.shape_text}")
    # Axes in (batch, 3, height, width) order whatever the layout, for the checks below.
    shape = g.input_shape
    if len(shape) != 4:
        raise ModelError(f"{path}: input {g.input_name!r} has shape {g.shape_text}, "
                         f"expected {contract.shape_text('batch', 'height', 'width')}")
    if contract.raw:
        shape = (shape[0], shape[3], shape[1], shape[2])
    fixed_batch = shape[0]
    graph_any_hw = shape[2] is None and shape[3] is None
    if manifest is not None:
        names = manifest.class_names
        hw = manifest.imgsz
        bmin, bmax = manifest.batch_min, manifest.batch_max
        layout, precision, source = manifest.output_layout, manifest.precision, "manifest"
        sha = manifest.model_sha256
        dynamic_hw, stride = manifest.dynamic_hw, manifest.stride
        if dynamic_hw and not graph_any_hw:
            raise ManifestError(f"{path}: manifest says the model takes any H x W up to "
                                f"{hw[0]}x{hw[1]}, but the graph's input is {g.shape_text}")
    else:
        meta = g.metadata
        if "names" not in meta:
            raise ManifestError(
                f"{path}: no manifest ({sidecar_path(path).name}) and no class names "
                f"in the ONNX metadata; export it with streamd-export")
        names = parse_names(meta["names"])
        try:
            stride = int(meta.get("stride", 32))
        except ValueError:
            raise ManifestError(f"{path}: ONNX metadata stride {meta['stride']!r} is not "
                                f"an integer") from None
        dynamic_hw = graph_any_hw
        if shape[2] is not None and shape[3] is not None:
            hw = (shape[2], shape[3])
        else:
            # Ultralytics records the size it exported at; for a graph that takes any
            # H x W it is the largest input streamd feeds it.
            h, w = ast.literal_eval(meta.get("imgsz", "[640, 640]"))
            hw = (int(h), int(w))
            if not graph_any_hw:
                raise ModelError(f"{path}: input {g.input_name!r} has shape {g.shape_text}: one of "
                                 f"height and width is fixed, the other not; streamd takes "
                                 f"models with both fixed or both dynamic")
            if stride <= 0 or hw[0] % stride or hw[1] % stride:
                raise ManifestError(f"{path}: ONNX metadata imgsz {hw[0]}x{hw[1]} is not "
                                    f"a multiple of its stride {stride}")
        bmin = 1
        # A dynamic export records its max batch in metadata; without it, be modest.
        bmax = fixed_batch or int(meta.get("batch", 1) or 1)
        if fixed_batch is None and bmax == 1:
            bmax = 16
        out = g.output_shape
        layout = LAYOUT_END2END if (len(out) == 3 and out[2] == 6
                                    and out[1] != 4 + len(names)) else LAYOUT_RAW
        precision = "fp16" if g.input_dtype == np.float16 else "fp32"
        source, sha = "onnx-metadata", ""
    if fixed_batch is not None and not (bmin <= fixed_batch <= bmax):
        bmin = bmax = fixed_batch
    # Cross-check: a manifest that disagrees with the graph is worse than none.
    for axis, want in ((2, hw[0]), (3, hw[1])):
        got = shape[axis]
        if got is not None and got != want:
            raise ManifestError(f"{path}: manifest says input {hw[0]}x{hw[1]} but the "
                                f"graph's input is {g.shape_text}")
    return ModelInfo(path=path, names=names, input_name=g.input_name, input_hw=hw,
                     input_dtype=np.dtype(g.input_dtype), batch_min=bmin, batch_max=bmax,
                     output_layout=layout, precision=precision, sha256=sha, source=source,
                     dynamic_hw=dynamic_hw, stride=stride,
                     nms_conf=manifest.nms_conf() if manifest is not None else None,
                     input_contract=contract)


def pad_to_fixed_batch(batch: np.ndarray, fixed_batch: int | None) -> np.ndarray:
    """A static-batch model takes exactly its batch: pad with zeros (the caller drops the
    extra rows of the output)."""
    n = batch.shape[0]
    if fixed_batch is None or n >= fixed_batch:
        return batch
    pad = np.zeros((fixed_batch - n, *batch.shape[1:]), batch.dtype)
    return np.concatenate([batch, pad])
