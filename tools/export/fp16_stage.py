"""Stage ``fp16``: the FP32 ONNX rewritten to compute in half precision.

The conversion itself is ONNX Runtime's (``onnxruntime.transformers``, installed with
onnxruntime); this module only decides what must stay FP32, because that is specific to
these graphs:

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

Why ``OnnxModel.convert_float_to_float16`` and not the bare ``float16.convert_float_to_float16``
(measured 2026-11-30 on the Normal/Fall YOLOv8s, 12 sample pictures, 2-core AMD EPYC, see
benchmarks/RESULTS.md "FP16: ONNX Runtime's converter"): the bare function casts around every
blocked node on its own, so the decode passes through FP16 between each pair of its FP32
nodes (152 Casts instead of 16). Its model loads in ONNX Runtime (not in ``onnx.checker``:
the Casts are appended unsorted) and keeps AP50 1.000, but box edges move 4-7x more: mean
0.065 px at 320 and 0.129 px at 640 instead of 0.010 and 0.031, median IoU with FP32 0.998
instead of 0.9999. ``OnnxModel``'s method runs the same converter, then removes the Cast
pairs; its models are what the hand-written converter this replaced made: bit-identical
outputs on all 14 exported test models (the same nodes and Casts on 13, 3 more Casts on
one), the same AP50 and IoU, the same speed (72.6 vs 72.6 ms/img at 320, 288.9 vs 286.2
at 640, batch 1, one thread). So ONNX Runtime's converter stays and that one went.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamd.backends.tensorrt.logic import BUILD_FP32_ONNX_SHA, head_prefix, is_decode_node
from streamd.errors import ExportError
from streamd.manifest import sha256_file

from .stages import ExportContext, register

# Operators whose float inputs and outputs all share one type parameter, so converting a
# node is just converting its float tensors (Resize's scales stay FP32: ONNX Runtime's
# converter knows that input).
FP16_OPS = frozenset({
    "Conv", "ConvTranspose", "Sigmoid", "Mul", "Add", "Sub", "Div", "Relu", "LeakyRelu",
    "HardSigmoid", "HardSwish", "Tanh", "Concat", "Split", "Slice", "MaxPool", "AveragePool",
    "GlobalAveragePool", "Resize", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
    "Identity", "Pad",
})

_FP16_MAX = float(np.finfo(np.float16).max)


@dataclass
class Fp16Report:
    nodes_fp16: int = 0
    nodes_fp32: int = 0
    casts: int = 0                                           # Cast nodes the conversion added
    kept_fp32: list[str] = field(default_factory=list)     # node names left in FP32
    clipped_weights: int = 0                                 # values beyond the FP16 range


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


def _constants_to_initializers(graph: object) -> None:
    """Constant nodes become initializers: the keep-FP32 rule above would otherwise treat
    each Constant as an unknown op and keep everything it feeds in FP32, and ONNX Runtime's
    converter keeps an initializer FP32 for FP32 consumers where it would convert a
    Constant's value for all of them."""
    import onnx

    kept_nodes = []
    for node in graph.node:  # type: ignore[attr-defined]
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            graph.initializer.append(t)  # type: ignore[attr-defined]
        else:
            kept_nodes.append(node)
    del graph.node[:]  # type: ignore[attr-defined]
    graph.node.extend(kept_nodes)  # type: ignore[attr-defined]


def _without_symbolic_shapes(model: object) -> Any:
    """ONNX Runtime's ``OnnxModel`` with its symbolic shape inference off for good.

    ``convert_float_to_float16`` re-initialises the model with the converted graph, which turns
    that inference back on for the Cast clean-up. It needs sympy, which the ``engine-tools``
    extra leaves out (ONNX Runtime 1.32 raises ImportError there), and fails on an in-graph NMS
    anyway, where the clean-up falls back to the types ONNX's own inference gave. Without it
    the FP16 files are byte-identical (sha256) on all 19 exported test models, and made 1.2-12x
    faster (0.3-1.7 s instead of 0.7-7.7 s each on the loaded 2-core development box).
    """
    from onnxruntime.transformers.onnx_model import OnnxModel

    class WithoutSymbolicShapes(OnnxModel):  # type: ignore[misc]
        def initialize(self, model: Any) -> None:
            super().initialize(model)
            self.disable_shape_inference()

    return WithoutSymbolicShapes(model)


def convert_fp16(src: Path, dst: Path) -> Fp16Report:
    """Write an FP16 version of the FP32 ONNX ``src`` to ``dst``; see the module docstring."""
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    # Unnamed nodes would all look alike to the block list; name them first.
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    _constants_to_initializers(graph)
    keep32 = fp32_node_names(model)
    # ONNX Runtime clips weights beyond the FP16 range (and says so in its log); count them
    # here so the manifest records it.
    over_range: dict[str, int] = {}
    for t in graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            arr = numpy_helper.to_array(t)
            n = int((np.isfinite(arr) & (np.abs(arr) > _FP16_MAX)).sum())
            if n:
                over_range[t.name] = n
    casts_before = sum(n.op_type == "Cast" for n in graph.node)

    converted = _without_symbolic_shapes(model)
    # The tool's stdout is its summary: whatever the converter prints goes.
    with contextlib.redirect_stdout(io.StringIO()):
        # ONNX shape inference, not the symbolic one: these graphs hold only standard ops.
        converted.convert_float_to_float16(use_symbolic_shape_infer=False, keep_io_types=True,
                                           node_block_list=sorted(keep32))
    # The converter appends its Casts at the end of the node list.
    converted.topological_sort()
    model = converted.model
    # Drop the converter's intermediate value infos and let inference redo them strictly.
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))

    nodes = model.graph.node
    # The clean-up may merge a graph's own Cast with one the converter added (under the
    # added one's name): count what was added, not names.
    casts = sum(n.op_type == "Cast" for n in nodes) - casts_before
    nodes_fp16 = sum(n.op_type != "Cast" and n.name not in keep32 for n in nodes)
    return Fp16Report(
        nodes_fp16=nodes_fp16,
        nodes_fp32=len(nodes) - nodes_fp16 - casts,
        casts=casts,
        kept_fp32=sorted(keep32),
        clipped_weights=sum(over_range.get(t.name, 0) for t in model.graph.initializer
                            if t.data_type == TensorProto.FLOAT16))


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
