"""Stage ``fp16``: the FP32 ONNX rewritten to compute in half precision.

The conversion is done here with the ``onnx`` package rather than a generic converter,
because what must stay FP32 is specific to these graphs:

* the model's input and outputs stay float32 (a Cast after the input, one before each
  output), so the daemon feeds and reads the same arrays whatever the precision;
* the head's decode part (DFL softmax and its conv, anchor/stride arithmetic, the class
  sigmoid) and everything after it (an in-graph NMS) stay FP32: box coordinates reach
  the input size (640 and more), where FP16 resolves only 0.5 px, and softmax over 16
  bins is where half precision loses the most;
* operators outside a known list stay FP32 (Casts are inserted around them), so a graph
  with an unexpected op still converts to something correct, just less fast.

Everything else (the backbone, neck and the head's conv branches) becomes FP16, weights
included. ONNX Runtime runs the result on the CPU (it computes the FP16 nodes it has no
kernels for by casting internally), TensorRT >= 10 builds it strongly typed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamd.backends.tensorrt.logic import BUILD_FP32_ONNX_SHA, head_prefix, is_decode_node
from streamd.errors import ExportError
from streamd.manifest import sha256_file

from .stages import ExportContext, register

# Operators whose float inputs and outputs all share one type parameter, so converting a
# node is just converting its float tensors. Resize and Pad have float inputs that stay
# FP32 (see _FLOAT32_INPUTS).
FP16_OPS = frozenset({
    "Conv", "ConvTranspose", "Sigmoid", "Mul", "Add", "Sub", "Div", "Relu", "LeakyRelu",
    "HardSigmoid", "HardSwish", "Tanh", "Concat", "Split", "Slice", "MaxPool", "AveragePool",
    "GlobalAveragePool", "Resize", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
    "Identity", "Pad",
})
# (op, input index) that the ONNX spec types separately from the data, kept FP32.
_FLOAT32_INPUTS = {("Resize", 1), ("Resize", 2)}

_FP16_MAX = float(np.finfo(np.float16).max)


@dataclass
class Fp16Report:
    nodes_fp16: int = 0
    nodes_fp32: int = 0
    casts: int = 0
    kept_fp32: list[str] = field(default_factory=list)     # node names left in FP32
    clipped_weights: int = 0                                 # values beyond the FP16 range


def _to_fp16(arr: np.ndarray, report: Fp16Report) -> np.ndarray:
    finite = np.isfinite(arr)
    over = finite & (np.abs(arr) > _FP16_MAX)
    report.clipped_weights += int(over.sum())
    return np.where(over, np.sign(arr) * _FP16_MAX, arr).astype(np.float16)


def fp32_node_names(model: object) -> set[str]:
    """Nodes that stay FP32: the decode part, everything downstream of it, unknown ops."""
    graph = model.graph  # type: ignore[attr-defined]
    prefix = head_prefix(n.name for n in graph.node)
    keep: set[str] = set()
    tainted: set[str] = set()       # tensors produced by an FP32-only node
    for node in graph.node:         # a valid ONNX graph is topologically sorted
        downstream = any(i in tainted for i in node.input)
        if (downstream or is_decode_node(node.name, node.op_type, prefix)
                or node.op_type not in FP16_OPS):
            keep.add(node.name)
            tainted.update(node.output)
    return keep


def convert_fp16(src: Path, dst: Path) -> Fp16Report:
    """Write an FP16 version of the FP32 ONNX ``src`` to ``dst``; see the module docstring."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    report = Fp16Report()
    # Unnamed nodes would all look alike to the keep-FP32 rule; name them first.
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    # Constants become initializers so one code path handles every constant tensor.
    kept_nodes = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            graph.initializer.append(t)
        else:
            kept_nodes.append(node)
    del graph.node[:]
    graph.node.extend(kept_nodes)

    inferred = onnx.shape_inference.infer_shapes(model)
    elem: dict[str, int] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        elem[vi.name] = vi.type.tensor_type.elem_type
    inits = {t.name: t for t in graph.initializer}
    for name, t in inits.items():
        elem[name] = t.data_type

    keep32 = fp32_node_names(model)
    report.kept_fp32 = sorted(keep32)

    def is_float(name: str) -> bool:
        return bool(name) and elem.get(name) == TensorProto.FLOAT

    def wants_fp16(node: object, index: int) -> bool:
        return node.name not in keep32 and (node.op_type, index) not in _FLOAT32_INPUTS  # type: ignore[attr-defined]

    # Which precision each consumer wants of each float initializer.
    init_uses: dict[str, set[bool]] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in inits and is_float(name):
                init_uses.setdefault(name, set()).add(wants_fp16(node, k))
    init_fp16_name: dict[str, str] = {}
    for name, uses in init_uses.items():
        t = inits[name]
        if uses == {True}:
            arr = _to_fp16(numpy_helper.to_array(t), report)
            t.CopyFrom(numpy_helper.from_array(arr, name))
            init_fp16_name[name] = name
        elif True in uses:    # shared by FP16 and FP32 consumers: keep both copies
            arr = _to_fp16(numpy_helper.to_array(t), report)
            graph.initializer.append(numpy_helper.from_array(arr, f"{name}__fp16"))
            init_fp16_name[name] = f"{name}__fp16"

    # Precision each activation tensor is produced in.
    produced_fp16: set[str] = set()
    for node in graph.node:
        if node.name in keep32:
            continue
        for out in node.output:
            if is_float(out):
                produced_fp16.add(out)

    graph_outputs = {o.name for o in graph.output}
    renamed_outputs: dict[str, str] = {}     # graph output name -> internal FP16 name
    for name in graph_outputs & produced_fp16:
        renamed_outputs[name] = f"{name}__fp16"

    new_nodes = []
    casts_made: dict[tuple[str, bool], str] = {}

    def cast(tensor: str, to_fp16: bool) -> str:
        key = (tensor, to_fp16)
        if key not in casts_made:
            out = f"{tensor}__to_{'fp16' if to_fp16 else 'fp32'}"
            new_nodes.append(helper.make_node(
                "Cast", [tensor], [out], name=f"{out}__cast",
                to=TensorProto.FLOAT16 if to_fp16 else TensorProto.FLOAT))
            casts_made[key] = out
            report.casts += 1
        return casts_made[key]

    for node in graph.node:
        fp16_node = node.name not in keep32
        for k, name in enumerate(node.input):
            if not is_float(name):
                continue
            want16 = wants_fp16(node, k)
            if name in inits:
                if want16:
                    node.input[k] = init_fp16_name[name]
                continue
            src_name = renamed_outputs.get(name, name)
            have16 = name in produced_fp16
            if want16 != have16:
                node.input[k] = cast(src_name, want16)
            else:
                node.input[k] = src_name
        if fp16_node:
            report.nodes_fp16 += 1
            for k, out in enumerate(node.output):
                if out in renamed_outputs:
                    node.output[k] = renamed_outputs[out]
        else:
            report.nodes_fp32 += 1
        new_nodes.append(node)
        for out in node.output:
            for orig, internal in renamed_outputs.items():
                if out == internal:
                    new_nodes.append(helper.make_node("Cast", [internal], [orig], name=f"{orig}__cast_out",
                                                      to=TensorProto.FLOAT))
                    report.casts += 1

    del graph.node[:]
    graph.node.extend(new_nodes)
    # Drop initializers nothing reads any more (FP32 originals fully replaced keep their
    # name, so only unused leftovers go).
    used = {i for n in graph.node for i in n.input}
    keep_inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)
    # Intermediate shapes/types were recorded for FP32; let inference redo them.
    del graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return report


@register("fp16", "convert the FP32 ONNX to FP16, keeping I/O and the head's decode in FP32")
def fp16_stage(ctx: ExportContext) -> None:
    if ctx.model_path is None:
        raise RuntimeError("the fp16 stage needs the onnx stage first")
    src = ctx.model_path
    if ctx.reference_onnx is None:
        ctx.reference_onnx = src
    dst = ctx.workdir / "model-fp16.onnx"
    try:
        report = convert_fp16(src, dst)
    except Exception as exc:
        raise ExportError(f"{ctx.request.weights}: FP16 conversion failed "
                          f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]})") from None
    ctx.model_path = dst
    ctx.precision = "fp16"
    ctx.build_info.update({
        BUILD_FP32_ONNX_SHA: sha256_file(src),
        "fp16": {"nodes_fp16": report.nodes_fp16, "nodes_fp32": report.nodes_fp32,
                 "casts": report.casts, "clipped_weights": report.clipped_weights},
    })
    if report.clipped_weights:
        ctx.notes.append(f"{report.clipped_weights} weight values were beyond the FP16 range "
                         f"and were clipped")
