"""Tensor shapes of an ONNX model with its input pinned to one size, by ONNX's shape inference.

Two steps read the Detect head's geometry this way: the ONNX source stage (the head's strides,
``onnx_input.strides_from_graph``) and the INT8 step (the neck feature maps' strides,
``int8_graph.anchor_grid_from_input``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def pinned_shapes(model: Any, input_name: str, pin: Sequence[int | None]) -> dict[str, tuple[int | None, ...]]:
    """Each intermediate tensor's shape (None for a dimension left unknown) in a copy of
    ``model`` whose input ``input_name`` has its dimensions set to ``pin`` (None: kept).
    Raises what ``onnx.shape_inference`` raises when the shapes cannot be inferred."""
    import onnx

    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    for inp in pinned.graph.input:
        if inp.name == input_name:
            for dim, value in zip(inp.type.tensor_type.shape.dim, pin):
                if value is not None:
                    dim.Clear()
                    dim.dim_value = value
    # Shapes recorded at export time were inferred for the free input: infer them again.
    del pinned.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(pinned).graph
    return {vi.name: tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                           for d in vi.type.tensor_type.shape.dim)
            for vi in inferred.value_info}
