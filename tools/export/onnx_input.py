"""An ONNX model as the export's input, with neither torch nor Ultralytics: ``streamd-export
MODEL.onnx [--engine]`` on the box that runs the model (a Jetson with JetPack's TensorRT), and
``streamd-export --adopt-engine X.engine --onnx X.onnx`` for an engine built with ``trtexec``.

An ONNX with its manifest beside it is taken as it is (after checking that the manifest is its
own). Without one, the manifest is derived from the graph (input and output names, types and
shapes) and the metadata Ultralytics writes into its exports (class names, stride, imgsz, batch):
plain functions of the graph, tested on real exports. Only ``onnx`` and ``onnxruntime`` are
used (the ``engine-tools`` extra); the TensorRT steps come last and fail naming TensorRT when it
is missing, after everything that needs no GPU was done.

``streamd-export MODEL.onnx --precision fp16|int8`` runs the precision's own stages (calibrate,
fp16 / int8, agreement, manifest, verify, install) on the ONNX: the ``onnx-source`` stage here
fills the context the way ``load`` and ``onnx`` fill it from a checkpoint, from the manifest or
Ultralytics' metadata and the graph itself (the head's strides by ONNX's shape inference).
"""

from __future__ import annotations

import ast
import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamd.backends.tensorrt.logic import head_prefix, is_decode_node
from streamd.errors import ManifestError
from streamd.manifest import (
    LAYOUT_END2END,
    LAYOUT_RAW,
    ModelManifest,
    contract_from_graph,
    sha256_file,
    sidecar_path,
)

from .graph_shapes import pinned_shapes
from .output import utc_now
from .samples import sample_paths
from .stages import INT8_NMS, ExportContext, ExportInputError, register

_DTYPES = {1: "float32", 10: "float16", 2: "uint8"}


@dataclass
class OnnxFacts:
    """What the graph itself says: names, element types, dims (int, or None where symbolic)."""

    input_name: str
    input_dtype: str
    input_dims: list[int | None]
    output_names: list[str]
    output_dims: list[int | None]
    opset: int | None
    metadata: dict[str, str] = field(default_factory=dict)


def read_onnx(path: Path) -> OnnxFacts:
    try:
        import onnx
    except ImportError:
        raise ExportInputError("reading an ONNX model needs the onnx package: "
                               "pip install 'streamd[engine-tools]'") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, ValueError, OSError ...
        raise ExportInputError(f"{path}: is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    graph = model.graph
    initialisers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initialisers]
    if len(inputs) != 1 or not graph.output:
        raise ExportInputError(f"{path}: expected one image input and an output, found {len(inputs)} "
                               f"input(s) and {len(graph.output)} output(s)")

    def dims(value: Any) -> list[int | None]:
        return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]

    elem = inputs[0].type.tensor_type.elem_type
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return OnnxFacts(inputs[0].name, _DTYPES.get(elem, f"onnx type {elem}"), dims(inputs[0]),
                     [o.name for o in graph.output], dims(graph.output[0]), opset,
                     {p.key: p.value for p in model.metadata_props})


def _literal(meta: dict[str, str], key: str) -> Any:
    try:
        return ast.literal_eval(meta[key]) if key in meta else None
    except (ValueError, SyntaxError):
        return None


def derive_manifest(path: Path, facts: OnnxFacts, *, imgsz: tuple[int, int] | None = None,
                    batch: tuple[int, int] | None = None) -> ModelManifest:
    """The manifest of a YOLOv8 detection ONNX from its graph and Ultralytics' metadata;
    ``imgsz`` / ``batch`` (the CLI's --imgsz / --batch) fill what neither records."""
    where = path.name
    ins, out = facts.input_dims, facts.output_dims
    contract = contract_from_graph(facts.input_dtype, tuple(ins))
    if contract.raw:                 # (batch, height, width, 3): checked below as NCHW
        ins = [ins[0], ins[3], ins[1], ins[2]]
    if len(ins) != 4 or ins[1] not in (3, None):
        raise ExportInputError(f"{where}: input {facts.input_name} is {ins}, expected (batch, 3, height, width)")
    if len(out) != 3:
        raise ExportInputError(f"{where}: output {facts.output_names[0]} is {out}, expected a YOLOv8 detection "
                               f"head (batch, 4 + classes, anchors) or end-to-end (batch, max_det, 6)")
    meta = facts.metadata
    if meta.get("task", "detect") != "detect":
        raise ExportInputError(f"{where}: an Ultralytics '{meta['task']}' model, not a detection model")
    names = _literal(meta, "names")
    end2end = out[2] == 6         # (batch, max_det, 6); a raw head is (batch, 4 + classes, anchors)
    if isinstance(names, dict) and names:
        class_names = {int(k): str(v) for k, v in names.items()}
    elif not end2end and out[1]:
        class_names = {i: str(i) for i in range(out[1] - 4)}     # no names recorded: their ids
    else:
        raise ExportInputError(f"{where}: records no class names (Ultralytics metadata 'names'); export it with "
                               f"Ultralytics, or write its manifest {sidecar_path(path).name}")
    if not end2end and out[1] not in (None, 4 + len(class_names)):
        raise ExportInputError(f"{where}: output has {out[1]} rows but {len(class_names)} class names")
    dynamic_hw = ins[2] is None or ins[3] is None
    recorded = _literal(meta, "imgsz")
    if imgsz is None and isinstance(recorded, (list, tuple)) and len(recorded) == 2:
        imgsz = (int(recorded[0]), int(recorded[1]))
    if imgsz is None and not dynamic_hw:
        imgsz = (int(ins[2]), int(ins[3]))          # type: ignore[arg-type]
    if imgsz is None:
        raise ExportInputError(f"{where}: takes any H x W and records no size; give the largest with --imgsz")
    if not dynamic_hw and imgsz != (ins[2], ins[3]):
        raise ExportInputError(f"{where}: input is {ins[2]}x{ins[3]}, not the --imgsz {imgsz[0]}x{imgsz[1]}")
    if batch is None:
        recorded_batch = _literal(meta, "batch")
        top = ins[0] or (int(recorded_batch) if isinstance(recorded_batch, int) and recorded_batch > 0 else 1)
        batch = (ins[0] or 1, top)
    elif ins[0] is not None and batch != (ins[0], ins[0]):
        raise ExportInputError(f"{where}: has a fixed batch of {ins[0]}, not --batch {batch[0]}-{batch[1]}")
    stride = _literal(meta, "stride")
    manifest = ModelManifest(
        model_file=path.name, model_sha256=sha256_file(path), model_format="onnx", class_names=class_names,
        imgsz=imgsz, batch_min=batch[0], batch_max=batch[1],
        output_layout=LAYOUT_END2END if end2end else LAYOUT_RAW,
        stride=int(stride) if isinstance(stride, int) else 32, dynamic_hw=dynamic_hw,
        input_name=facts.input_name, input_dtype=facts.input_dtype, input_layout=contract.layout,
        input_channels=contract.channels, output_names=list(facts.output_names),
        opset=facts.opset, nms={"max_det": out[1]} if end2end and out[1] else None,
        source={"onnx": path.name, "metadata": "ultralytics" if "names" in meta else "graph only"},
        build={"exporter": "adopted onnx"}, created=utc_now())
    try:
        manifest.validate(where)
    except ManifestError as exc:
        raise ExportInputError(str(exc)) from None
    return manifest


def onnx_manifest(path: Path, *, imgsz: tuple[int, int] | None = None,
                  batch: tuple[int, int] | None = None) -> tuple[ModelManifest, bool]:
    """(manifest, derived): the ONNX's own manifest when it has one (checked to be its own),
    else one derived from the graph."""
    if sidecar_path(path).exists():
        try:
            manifest = ModelManifest.read(path)
            manifest.check_file(path)
        except ManifestError as exc:
            raise ExportInputError(str(exc)) from None
        return manifest, False
    return derive_manifest(path, read_onnx(path), imgsz=imgsz, batch=batch), True


@register("adopt", "take an ONNX model as it is: its manifest, or one derived from the graph")
def adopt_stage(ctx: ExportContext) -> None:
    req = ctx.request
    src = req.weights
    if not src.is_file():
        raise ExportInputError(f"{src}: no such file")
    size_given = req.imgsz if req.imgsz_given else None
    batch_given = (req.batch_min, req.batch_max) if req.batch_given else None
    manifest, derived = onnx_manifest(src, imgsz=size_given, batch=batch_given)
    if derived:
        ctx.notes.append(f"manifest derived from the ONNX graph and its {manifest.source['metadata']} metadata")
    if req.input == "uint8":
        # The uint8 stage makes and installs the new file; the float one is only read.
        ctx.manifest, ctx.model_path, ctx.precision = manifest, src, manifest.precision
        return
    dest = req.out_dir / f"{req.name or src.stem}.onnx"
    req.out_dir.mkdir(parents=True, exist_ok=True)
    if dest.resolve() != src.resolve():
        shutil.copyfile(src, dest)
        ctx.notes.append(f"copied {src} to {dest}")
    manifest.model_file = dest.name
    ctx.manifest_path = manifest.write(dest)
    ctx.manifest, ctx.installed_path, ctx.model_path = manifest, dest, dest
    ctx.precision = manifest.precision


# Nodes that only a converted graph has: FP16 and INT8 are made from the FP32 model, and each is
# checked against it, so an already converted ONNX cannot be a starting point.
_INT8_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger", "MatMulInteger"})
_FLOAT16 = 10          # onnx.TensorProto.FLOAT16


def graph_precision(model: Any) -> str:
    """``int8`` (Q/DQ or integer nodes), ``fp16`` (float16 weights) or ``fp32``."""
    if any(n.op_type in _INT8_OPS for n in model.graph.node):
        return "int8"
    if any(t.data_type == _FLOAT16 for t in model.graph.initializer):
        return "fp16"
    return "fp32"


def strides_from_graph(model: Any, imgsz: tuple[int, int], batch: int) -> tuple[int, ...] | None:
    """The Detect head's strides, read from the graph: the input's size over the size of each
    level's feature map (the head's per-level branch convolutions), by ONNX's shape inference
    with the input pinned to ``imgsz``. None when the graph has no such head, or its shapes
    cannot be inferred."""
    initialisers = {i.name for i in model.graph.initializer}
    image = next(i for i in model.graph.input if i.name not in initialisers)
    try:
        shapes = pinned_shapes(model, image.name, (batch, 3, *imgsz))
    except Exception:  # onnx raises InferenceError and others: then there is nothing to read
        return None
    prefix = head_prefix(n.name for n in model.graph.node)
    strides: set[int] = set()
    for node in model.graph.node:
        if node.op_type != "Conv" or not node.name.startswith(prefix) or is_decode_node(node.name, "Conv", prefix):
            continue
        dims = shapes.get(node.output[0])
        if dims is None or len(dims) != 4 or dims[2] is None or dims[3] is None:
            return None
        h, w = dims[2], dims[3]
        if imgsz[0] % h or imgsz[1] % w or imgsz[0] // h != imgsz[1] // w:
            return None
        strides.add(imgsz[0] // h)
    return tuple(sorted(strides)) or None


def _converted_from(src: Path, manifest: ModelManifest, model: Any, precision_asked: str) -> None:
    """Refuse an ONNX the FP16 and INT8 stages cannot start from, saying why."""
    if precision_asked == "int8" and manifest.output_layout == LAYOUT_END2END:
        raise ExportInputError(f"{src.name}: has NMS in its graph ({LAYOUT_END2END} output): {INT8_NMS}")
    precision = manifest.precision if manifest.precision != "fp32" else graph_precision(model)
    if precision != "fp32":
        raise ExportInputError(f"{src.name}: is already {precision.upper()}; FP16 and INT8 are made from the "
                               f"FP32 ONNX (and compared with it): give that one")
    if manifest.input_contract().raw:
        raise ExportInputError(f"{src.name}: takes uint8 pixels (an --input uint8 export); give the float ONNX "
                               f"it was made from, with --input uint8 to put the uint8 input on the result")


@register("onnx-source", "read an FP32 ONNX in place of the load and onnx stages: its manifest or "
                         "metadata, the head's strides from the graph")
def onnx_source_stage(ctx: ExportContext) -> None:
    import onnx

    req = ctx.request
    src = req.weights
    if not src.is_file():
        raise ExportInputError(f"{src}: no such file")
    if req.precision == "fp16" and req.verify_images is None and not sample_paths():
        # Checked before any work: the agreement stage's default pictures come with Ultralytics.
        raise ExportInputError("--precision fp16 compares the FP16 model with the FP32 one on pictures: give "
                               "--verify-images DIR (Ultralytics' sample pictures are not installed here)")
    size_given = req.imgsz if req.imgsz_given else None
    batch_given = (req.batch_min, req.batch_max) if req.batch_given else None
    manifest, derived = onnx_manifest(src, imgsz=size_given, batch=batch_given)
    for flag, given, own in (("--imgsz", size_given, manifest.imgsz),
                             ("--batch", batch_given, (manifest.batch_min, manifest.batch_max))):
        if given is not None and given != own:
            raise ExportInputError(f"{src.name}: its manifest says {flag} {own}, not {given}; leave {flag} out "
                                   f"(the size and batch of an ONNX are its export's)")
    model = onnx.load(str(src), load_external_data=False)
    _converted_from(src, manifest, model, req.precision)
    strides = strides_from_graph(model, manifest.imgsz, manifest.batch_min)
    if strides is None:
        # No YOLOv8 head found by name (a graph renamed by another tool): YOLOv8's three levels are
        # assumed. The verify stage runs the result and holds its anchor count to these strides.
        strides = (8, 16, 32)
        ctx.notes.append("the head's strides were not found in the graph: YOLOv8's 8, 16, 32 assumed "
                         "(checked against the output's anchors by the verify stage)")
    if max(strides) != manifest.stride:
        raise ExportInputError(f"{src.name}: its head's strides are {strides}, but it records a stride of "
                               f"{manifest.stride}")
    if derived:
        ctx.notes.append(f"read from the ONNX graph and its {manifest.source['metadata']} metadata")
    nms = manifest.nms or {}
    ctx.request = dataclasses.replace(
        req, imgsz=manifest.imgsz, batch_min=manifest.batch_min, batch_max=manifest.batch_max,
        dynamic_batch=manifest.batch_max > manifest.batch_min, dynamic_hw=manifest.dynamic_hw,
        nms=manifest.output_layout == LAYOUT_END2END, conf=nms.get("conf", req.conf),
        iou=nms.get("iou", req.iou), max_det=nms.get("max_det", req.max_det))
    ctx.class_names = dict(manifest.class_names)
    ctx.strides = strides
    ctx.source = {"onnx": src.name, "sha256": sha256_file(src), "size_bytes": src.stat().st_size}
    if not derived and manifest.source:
        ctx.source["onnx_source"] = dict(manifest.source)     # the checkpoint it came from, if recorded
    ctx.build_info["exporter"] = "streamd-export from onnx"
    ctx.model_path, ctx.model_format, ctx.opset = src, "onnx", manifest.opset
    ctx.input_name, ctx.output_names = manifest.input_name, list(manifest.output_names)
