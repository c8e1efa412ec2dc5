"""Stage ``onnx``: the .pt -> ONNX step, done by Ultralytics' own exporter.

By default the model takes any H x W up to ``--imgsz`` (multiples of the stride): each camera
is then letterboxed to its own aspect and padded only up to the next multiple of the stride,
as Ultralytics' default predict does, so a 16:9 camera at 640 runs at 640x384 (40% fewer
pixels) and gets the boxes Ultralytics itself reports. The output's anchor axis then
follows the input size and stays symbolic; an in-graph NMS output keeps its fixed
(max_det, 6) rows, zero-padded at small inputs.

Ultralytics' ``dynamic=True`` makes batch, height *and* width dynamic together. Axes that
should be fixed (a static batch; H and W with ``--fixed-size``) are pinned after the export,
stale intermediate shapes are dropped, and the graph is simplified again (or
re-shape-inferred with ``--no-simplify``) so the output's shape becomes concrete too: a fixed
size lets ONNX Runtime and TensorRT fold the shape arithmetic of the head.
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
    """Output shape the manifest promises; None where the axis is dynamic (the batch, and
    the anchors of a raw head that takes any H x W)."""
    req = ctx.request
    batch: int | None = None if req.dynamic_batch else req.batch_max
    anchors = anchor_count(req.imgsz, ctx.strides)
    if req.nms:
        # Ultralytics clamps max_det to the anchors available at the export size; smaller
        # inputs of a dynamic-HW model fill the same rows, zero-padded.
        return [batch, min(req.max_det, anchors), 6]
    return [batch, 4 + len(ctx.class_names), None if req.dynamic_hw else anchors]


def expected_input_dims(ctx: ExportContext) -> list[int | None]:
    """Input shape the manifest promises, (N, 3, H, W) or for a uint8 input (N, H, W, 3);
    None where the axis is dynamic."""
    req = ctx.request
    batch: int | None = None if req.dynamic_batch else req.batch_max
    h, w = (None, None) if req.dynamic_hw else req.imgsz
    return [batch, h, w, 3] if ctx.input_contract.raw else [batch, 3, h, w]


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


# Names of the symbolic axes, as Ultralytics' exporter names them.
INPUT_AXES = ("batch", None, "height", "width")
OUTPUT_AXES = ("batch", None, "anchors")


def _set_dims(value_info: Any, dims: list[int | None], names: tuple[str | None, ...]) -> None:
    shape = value_info.type.tensor_type.shape
    for dim, want, name in zip(shape.dim, dims, names):
        if want is None:
            dim.dim_param = name or "dim"
        else:
            dim.dim_value = want


def pin_static_dims(path: Path, ctx: ExportContext) -> None:
    """Make the axes that should be fixed concrete in an export made with ``dynamic=True``:
    the batch when it is static, H and W (and with them the anchors) with ``--fixed-size``."""
    import onnx

    req = ctx.request
    model = onnx.load(str(path))
    _set_dims(model.graph.input[0], expected_input_dims(ctx), INPUT_AXES)
    # Intermediate shapes were inferred with symbolic axes; they would now contradict the
    # pinned input, so drop them and let the simplifier (or shape inference) redo them.
    del model.graph.value_info[:]
    _set_dims(model.graph.output[0], expected_output_dims(ctx), OUTPUT_AXES)
    if req.simplify:
        import onnxslim
        model = onnxslim.slim(model)
    else:
        model = onnx.shape_inference.infer_shapes(model)
    onnx.save(model, str(path))


@register("onnx", "export the checkpoint to ONNX with Ultralytics and pin its fixed axes")
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
        "dynamic": req.exporter_dynamic,
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
        # With both the batch and H x W dynamic, Ultralytics' graph is already what the
        # manifest promises; otherwise some of its dynamic axes must be pinned.
        if req.exporter_dynamic and not (req.dynamic_batch and req.dynamic_hw):
            fixed = "the batch" if req.dynamic_hw else "the input size"
            try:
                pin_static_dims(produced, ctx)
            except Exception as exc:
                raise ExportError(f"{req.weights}: fixing {fixed} of the dynamic ONNX model failed "
                                  f"({type(exc).__name__}: {clean_message(exc)})") from None

    graph = onnx.load(str(produced), load_external_data=False)
    ctx.model_path = produced
    ctx.model_format = "onnx"
    ctx.opset = next((op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")), None)
    ctx.input_name = graph.graph.input[0].name
    ctx.output_names = [o.name for o in graph.graph.output]
