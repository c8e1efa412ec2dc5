"""Two changes the INT8 step makes to the graph so that OpenVINO runs the Q/DQ file as ONNX
Runtime (and so TensorRT) defines it. Neither changes what the model computes.

Found on the Normal/Fall YOLOv8s at 320 with OpenVINO 2026.4 on the development box's CPU
(AMD EPYC, AVX-512 VNNI) by comparing tensors through OpenVINO with ONNX Runtime's on
truncated copies of the graph: through OpenVINO the symmetric file had AP50 0.00-0.04 against
FP32 where ONNX Runtime gave 0.99. Two separate faults, each enough to lose every box:

1. Symmetric int8 activations (:func:`concat_fed_convs`). OpenVINO runs them as uint8 with a
   zero point of 128 and moves a convolution's input FakeQuantize from behind a Concat onto
   each of the Concat's inputs. In a C2f block one of those inputs (the second half of the
   Split) also feeds the next bottleneck's conv through its own Q/DQ; OpenVINO fuses the two
   quantizations on that branch and the conv after the Concat comes out wrong (mean relative
   error 0.18 against ONNX Runtime at the first C2f, 0.5 by the neck; every layer before it
   agrees to 1e-3). Quantizing the Concat itself, giving all its inputs the output's scale,
   per-tensor weights, weights stored as int8 or 7-bit weights each changed nothing; uint8
   activations with a calibrated zero point do not trip it. The symmetric flavour therefore
   leaves the 13 convolutions that read a Concat in float (floating only the 8 after a C2f's
   Concat is not enough); on the development box that costs about a quarter of its speed on
   OpenVINO, which stays about twice OpenVINO's FP32 (benchmarks/RESULTS.md).
2. Models that take any H x W (:func:`anchor_grid_from_input`). Their head builds its anchor
   grid from ``Shape`` of the three neck outputs (then ``Range``). With that data-dependent
   shape path reading a tensor OpenVINO runs in int8, the last C2f of the neck comes out
   wrong (p99 error 2.8 where ONNX Runtime's is 0.12), whatever the quantizer's settings; the
   same file reshaped to a static H x W, or with only the batch dynamic, agrees. Taking the
   grid's size from the input picture's shape instead (H / stride, rounded up, as the strided
   convolutions do) gives the same numbers and OpenVINO then agrees with dynamic H x W too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from .graph_shapes import pinned_shapes


def concat_fed_convs(nodes: Iterable[Any]) -> list[str]:
    """Names of the Conv nodes whose input is a Concat's output: in YOLOv8 the last conv of
    every C2f block and of the SPPF, and the first conv after each neck concat."""
    nodes = list(nodes)
    producer = {out: n for n in nodes for out in n.output}
    return [n.name for n in nodes if n.op_type == "Conv" and n.input
            and getattr(producer.get(n.input[0]), "op_type", "") == "Concat"]


def _feature_strides(model: Any, input_name: str, tensors: set[str], probe: int) -> dict[str, int]:
    """Stride of each of ``tensors`` (NCHW feature maps), with the input pinned to ``probe`` x ``probe``."""
    shapes = pinned_shapes(model, input_name, (1, None, probe, probe))
    out: dict[str, int] = {}
    for name in tensors & shapes.keys():
        dims = shapes[name]
        if len(dims) == 4 and dims[2] is not None and probe % dims[2] == 0:
            out[name] = probe // dims[2]
    return out


def anchor_grid_from_input(model: Any, input_name: str, head_prefix: str, probe: int) -> int:
    """Rewrite, in place, each ``Shape`` of a head input (a neck feature map) as
    ``ceil(Shape(input) / [1, 1, stride, stride])``; returns how many were rewritten.

    The head reads only the batch, H and W of those shapes, which the input's shape gives
    exactly (every strided conv rounds up). A model of fixed input size has no such Shape
    nodes (its grid is constant) and is left as it is."""
    from onnx import helper, numpy_helper

    graph = model.graph
    produced_in_head = {o for n in graph.node if n.name.startswith(head_prefix) for o in n.output}
    shapes = [n for n in graph.node if n.op_type == "Shape" and n.name.startswith(head_prefix)
              and n.input[0] not in produced_in_head]
    if not shapes:
        return 0
    strides = _feature_strides(model, input_name, {n.input[0] for n in shapes}, probe)
    shapes = [n for n in shapes if n.input[0] in strides]
    if not shapes:
        return 0
    in_shape = f"{head_prefix}anchor_grid/input_shape"
    added = [helper.make_node("Shape", [input_name], [in_shape], name=in_shape)]
    for s in sorted({strides[n.input[0]] for n in shapes}):
        base = f"{head_prefix}anchor_grid/stride{s}"
        graph.initializer.extend([numpy_helper.from_array(np.array([0, 0, s - 1, s - 1], np.int64), f"{base}/round_up"),
                                  numpy_helper.from_array(np.array([1, 1, s, s], np.int64), f"{base}/stride")])
        added.append(helper.make_node("Add", [in_shape, f"{base}/round_up"], [f"{base}/padded"], name=f"{base}/Add"))
    for n in shapes:
        base = f"{head_prefix}anchor_grid/stride{strides[n.input[0]]}"
        # The Shape node becomes the Div, keeping its name and output for its consumers.
        n.op_type = "Div"
        del n.attribute[:]
        del n.input[:]
        n.input.extend([f"{base}/padded", f"{base}/stride"])
    nodes = added + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return len(shapes)
