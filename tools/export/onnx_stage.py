"""Stage ``onnx``: the .pt -> ONNX step, done by Ultralytics' own exporter.

Ultralytics' ``dynamic=True`` makes batch, height *and* width dynamic. streamd wants only the
batch axis dynamic: the manifest promises one input size, and a fixed H x W lets ONNX Runtime
and TensorRT fold the shape arithmetic of the head. So after the export the input's H and W
are pinned, stale intermediate shapes are dropped, and the graph is simplified again (or
re-shape-inferred with ``--no-simplify``) so the output's anchor count becomes concrete too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from streamd.errors import ExportError

from ._ultralytics import clean_message, quiet
from .stages import ExportContext, ExportInputError, register

MIN_OPSET_RAW = 9     # Ultralytics' floor for a plain detection export (nearest Upsample)
MIN_OPSET_NMS = 11    # ONNX NonMaxSuppression appears in opset 11


def anchor_count(imgsz: tuple[int, int], strides: tuple[int, ...]) -> int:
    """Number of anchor points of a YOLOv8 head at ``imgsz`` (one per cell of each level)."""
    h, w = imgsz
    return sum((h // s) * (w // s) for s in strides)


def expected_output_dims(ctx: ExportContext) -> list[int | None]:
    """Output shape the manifest promises; None where the axis is the dynamic batch."""
    req = ctx.request
    batch: int | None = None if req.dynamic_batch else req.batch_max
    anchors = anchor_count(req.imgsz, ctx.strides)
    if req.nms:
        # Ultralytics clamps max_det to the anchors available at this input size.
        return [batch, min(req.max_det, anchors), 6]
    return [batch, 4 + len(ctx.class_names), anchors]


def check_opset(req_opset: int | None, nms: bool) -> None:
    if req_opset is None:
        return
    import onnx
    low = MIN_OPSET_NMS if nms else MIN_OPSET_RAW
    high = onnx.defs.onnx_opset_version()
    if not low <= req_opset <= high:
        why = " (--nms needs NonMaxSuppression)" if nms else ""
        raise ExportInputError(f"--opset {req_opset}: must be between {low}{why} and {high} "
                               f"(the newest this onnx {onnx.__version__} knows)")


def _set_dims(value_info: Any, dims: list[int | None], batch_name: str = "batch") -> None:
    shape = value_info.type.tensor_type.shape
    for dim, want in zip(shape.dim, dims):
        if want is None:
            dim.dim_param = batch_name
        else:
            dim.dim_value = want


def pin_spatial_dims(path: Path, ctx: ExportContext) -> None:
    """Make H, W (and the output's non-batch axes) concrete in a dynamic-batch export."""
    import onnx

    req = ctx.request
    h, w = req.imgsz
    model = onnx.load(str(path))
    _set_dims(model.graph.input[0], [None, 3, h, w])
    # Intermediate shapes were inferred with symbolic H and W; they would now contradict
    # the pinned input, so drop them and let the simplifier (or shape inference) redo them.
    del model.graph.value_info[:]
    _set_dims(model.graph.output[0], expected_output_dims(ctx))
    if req.simplify:
        import onnxslim
        model = onnxslim.slim(model)
    else:
        model = onnx.shape_inference.infer_shapes(model)
    onnx.save(model, str(path))


@register("onnx", "export the checkpoint to ONNX with Ultralytics and pin the input size")
def onnx_stage(ctx: ExportContext) -> None:
    import onnx

    req = ctx.request
    if ctx.yolo is None or ctx.work_weights is None:
        raise RuntimeError("the onnx stage needs the load stage first")
    h, w = req.imgsz
    kwargs: dict[str, Any] = {
        "format": "onnx",
        "imgsz": [h, w],
        # The exporter traces with this batch; with --nms it also unrolls the per-image NMS
        # loop this many times, so a dynamic model takes at most batch_max images.
        "batch": req.batch_max,
        "dynamic": req.dynamic_batch,
        "simplify": req.simplify,
        "device": "cpu",
    }
    if req.opset is not None:
        kwargs["opset"] = req.opset
    if req.nms:
        kwargs.update(nms=True, conf=req.conf, iou=req.iou, max_det=req.max_det, agnostic_nms=False)
    with quiet(req.verbose, logging.ERROR):
        try:
            produced = Path(ctx.yolo.export(**kwargs))
        except Exception as exc:
            reason = clean_message(exc, {str(ctx.work_weights): req.weights.name})
            raise ExportError(f"{req.weights}: ONNX export failed ({type(exc).__name__}: {reason})") from None
        if not produced.is_file():
            raise ExportError(f"{req.weights}: the ONNX exporter reported {produced.name} but wrote no file")
        if req.dynamic_batch:
            try:
                pin_spatial_dims(produced, ctx)
            except Exception as exc:
                raise ExportError(f"{req.weights}: fixing the input size of the dynamic-batch ONNX "
                                  f"model failed ({type(exc).__name__}: {clean_message(exc)})") from None

    graph = onnx.load(str(produced), load_external_data=False)
    ctx.model_path = produced
    ctx.model_format = "onnx"
    ctx.opset = next((op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")), None)
    ctx.input_name = graph.graph.input[0].name
    ctx.output_names = [o.name for o in graph.graph.output]
