"""Stage ``uint8`` (``--input uint8``): the model takes the letterbox's own bytes.

The float export takes (N, 3, H, W) RGB scaled to [0, 1], which the daemon makes on the host
from its uint8 (N, H, W, 3) BGR letterbox: one more pass over every pixel, and 4 bytes per
pixel handed to the backend (and, with TensorRT, uploaded to the GPU). This stage puts that
step into the graph instead: four nodes in front of the float model, built with
``onnx.helper`` and joined with ``onnx.compose``:

    images uint8 (N, H, W, 3) BGR -> Cast float32 -> Transpose (0, 3, 1, 2) -> Gather [2, 1, 0]
    on the channel axis (BGR -> RGB) -> Mul float32(1/255) -> the float model's input

The Cast comes first because TensorRT runs no layer on a uint8 tensor but the cast to float
(its Identity layer's documented conversions: uint8 -> float32 | float16). The
arithmetic is the host's (``BatchBuffer.fill``: float32(byte) * float32(1/255)), so the float
model sees bit for bit the tensor it saw before. The batch, height and width axes keep the
float model's dims, fixed or dynamic.

It runs after every stage that changes the float model: an FP16 model's input stays float32
(its own first Cast to FP16 follows these nodes, so the scaling runs in FP32, as on the host,
and the detections the agreement stage accepted are the ones this model gives; scaling in
FP16 instead would give 10 of the 256 byte values another FP16 input, 1 unit in the last
place, so the FP16 model would no longer see what it was checked on); an INT8
model was calibrated and compared on exactly the float tensors these nodes make from the
same letterboxed pictures. The stage then runs the float and the uint8 model on the same
letterboxed pictures and refuses to install one whose outputs differ.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from streamd.errors import ExportError
from streamd.manifest import RAW_UINT8, sha256_file

from .output import utc_now
from .stages import ExportContext, ExportInputError, register

PREFIX = "streamd_uint8/"          # names of the added nodes and tensors
FLOAT_INPUT_PREFIX = "streamd_float/"
# A uint8 model's outputs may differ from its float model's by this much (relative to the
# largest output value); measured: 0, the same tensor goes into the same float graph.
MAX_RELATIVE_DIFF = 1e-6


def _dims(value_info: Any) -> list[int | str | None]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value_info.type.tensor_type.shape.dim]


def uint8_prefix(float_model: Any, input_name: str, float_name: str) -> Any:
    """A model from the uint8 (N, H, W, 3) BGR input ``input_name`` to ``float_name``, the
    (N, 3, H, W) RGB [0, 1] tensor of ``float_model``'s input type."""
    from onnx import TensorProto, helper, numpy_helper

    inp = float_model.graph.input[0]
    dims = _dims(inp)
    if len(dims) != 4 or dims[1] not in (3, None):
        raise ExportInputError(f"input {inp.name} has shape {dims}: --input uint8 needs a (batch, 3, height, "
                               f"width) float input")
    elem = inp.type.tensor_type.elem_type
    if elem not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        raise ExportInputError(f"input {inp.name} is not float32 or float16: --input uint8 applies to float models")
    n, _, h, w = dims
    # The host's constant: numpy rounds 1/255 to float32 once, then multiplies in float32.
    scale = numpy_helper.from_array(np.array(np.float32(1.0 / 255.0)), f"{PREFIX}scale")
    rgb = numpy_helper.from_array(np.array([2, 1, 0], np.int64), f"{PREFIX}rgb_order")
    scaled = float_name if elem == TensorProto.FLOAT else f"{PREFIX}scaled"
    nodes = [
        helper.make_node("Cast", [input_name], [f"{PREFIX}pixels"], to=TensorProto.FLOAT, name=f"{PREFIX}cast"),
        helper.make_node("Transpose", [f"{PREFIX}pixels"], [f"{PREFIX}nchw_bgr"], perm=[0, 3, 1, 2],
                         name=f"{PREFIX}nchw"),
        helper.make_node("Gather", [f"{PREFIX}nchw_bgr", rgb.name], [f"{PREFIX}nchw_rgb"], axis=1,
                         name=f"{PREFIX}rgb"),
        helper.make_node("Mul", [f"{PREFIX}nchw_rgb", scale.name], [scaled], name=f"{PREFIX}scale"),
    ]
    if elem != TensorProto.FLOAT:
        # Scaled in float32 as on the host, then to the input's own type (what the backend's
        # astype did for a float16-input model).
        nodes.append(helper.make_node("Cast", [scaled], [float_name], to=elem, name=f"{PREFIX}to_input"))
    graph = helper.make_graph(
        nodes, "streamd_uint8_input",
        [helper.make_tensor_value_info(input_name, TensorProto.UINT8, [n, h, w, 3])],
        [helper.make_tensor_value_info(float_name, elem, [n, 3, h, w])],
        [scale, rgb])
    prefix = helper.make_model(graph, opset_imports=[o for o in float_model.opset_import
                                                     if o.domain in ("", "ai.onnx")])
    prefix.ir_version = float_model.ir_version
    return prefix


def wrap_uint8(src: Path, dst: Path) -> None:
    """Write ``src`` (a float-input ONNX) to ``dst`` taking uint8 (N, H, W, 3) BGR pixels
    under the same input name; outputs, metadata and everything else unchanged."""
    import onnx
    from onnx import compose

    model = onnx.load(str(src))
    input_name = model.graph.input[0].name
    float_name = FLOAT_INPUT_PREFIX + input_name
    prefix = uint8_prefix(model, input_name, PREFIX + "float_input")
    # The float model's input gets a new name, so the uint8 input can have the old one (the
    # name the manifest, the backends and trtexec command lines know).
    body = onnx.ModelProto()
    body.CopyFrom(model)
    body.graph.CopyFrom(compose.add_prefix_graph(model.graph, FLOAT_INPUT_PREFIX, rename_nodes=False,
                                                 rename_edges=False, rename_inputs=True, rename_outputs=False,
                                                 rename_initializers=False, rename_value_infos=False))
    merged = compose.merge_models(prefix, body, io_map=[(PREFIX + "float_input", float_name)],
                                  producer_name=model.producer_name, producer_version=model.producer_version,
                                  doc_string=model.doc_string, name=model.graph.name)
    # merge_models keeps the second model's metadata only where both lack conflicts; set
    # Ultralytics' (class names, stride, size) explicitly: a model without a manifest is
    # read from it.
    del merged.metadata_props[:]
    merged.metadata_props.extend(model.metadata_props)
    onnx.checker.check_model(merged)
    onnx.save(merged, str(dst))


def check_same_outputs(float_model: Path, uint8_model: Path, samples: list[np.ndarray],
                       batch: int, sizes: list[tuple[int, int]]) -> float:
    """Run both models on the same letterboxed pictures (``samples``: BGR frames) at each of
    ``sizes``; return the largest output difference relative to the largest output value.
    Each model is fed as the daemon feeds it: the float one the host's tensor, the uint8
    one the letterbox's bytes."""
    import onnxruntime as ort

    from streamd.pipeline.preprocess import letterbox_batch

    def session(path: Path) -> Any:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])

    ref, got = session(float_model), session(uint8_model)
    ref_input = ref.get_inputs()[0]
    # What the backend hands a float16-input model: the host's float32 tensor, cast.
    ref_dtype = np.float16 if ref_input.type == "tensor(float16)" else np.float32
    worst = 0.0
    for (h, w), start in ((size, k) for size in sizes for k in range(0, len(samples), batch)):
        # ``batch`` pictures per run (a static-batch model takes exactly that many).
        frames = [samples[(start + i) % len(samples)] for i in range(batch)]
        x_float, _ = letterbox_batch(frames, h, w)
        x_u8, _ = letterbox_batch(frames, h, w, RAW_UINT8)
        y_ref = ref.run(None, {ref_input.name: x_float.astype(ref_dtype, copy=False)})[0]
        y_got = got.run(None, {got.get_inputs()[0].name: x_u8})[0]
        if y_ref.shape != y_got.shape:
            raise ExportError(f"{uint8_model.name}: output shape {y_got.shape} at {h}x{w}, the float model's "
                              f"is {y_ref.shape}")
        scale = max(1.0, float(np.max(np.abs(y_ref))))
        worst = max(worst, float(np.max(np.abs(y_got.astype(np.float64) - y_ref))) / scale)
    return worst


def _check_pictures(imgsz: tuple[int, int], stride: int,
                    dynamic_hw: bool) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Ultralytics' sample pictures (or, without them, noise) and the sizes to run them at:
    the model's, and for one that takes any H x W the verify stage's second size too."""
    import cv2

    from .output import verify_size
    from .samples import sample_paths

    pictures = [img for img in (cv2.imread(str(p)) for p in sample_paths()) if img is not None]
    if not pictures:
        # Without Ultralytics' sample pictures (a torch-free install): a seeded noise picture
        # of a 16:9 camera still runs every node of both graphs.
        rng = np.random.default_rng(0)
        pictures = [rng.integers(0, 256, (720, 1280, 3), np.uint8)]
    sizes = [imgsz] + ([verify_size(imgsz, stride)] if dynamic_hw else [])
    return pictures, sizes


@register("uint8", "put BGR->RGB, NHWC->NCHW and the /255 scaling into the graph (--input uint8)")
def uint8_stage(ctx: ExportContext) -> None:
    req = ctx.request
    if ctx.model_path is None:
        raise RuntimeError("the uint8 stage needs a model")
    src = ctx.model_path
    if ctx.manifest is not None and ctx.manifest.input_contract().raw:
        raise ExportInputError(f"{src.name}: already takes {RAW_UINT8.describe()} pixels (--input uint8 "
                               f"applies to float models)")
    dst = ctx.workdir / "model-uint8.onnx"
    try:
        wrap_uint8(src, dst)
    except ExportInputError as exc:
        raise ExportInputError(f"{src.name}: {exc}") from None
    except Exception as exc:
        raise ExportError(f"{req.weights}: putting the uint8 input into the graph failed "
                          f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]})") from None
    adopted = ctx.manifest
    if adopted is not None:          # an ONNX taken as it is: its manifest, now for the new file
        imgsz, stride, dynamic_hw, batch = adopted.imgsz, adopted.stride, adopted.dynamic_hw, adopted.batch_min
    else:
        imgsz, stride, dynamic_hw, batch = req.imgsz, ctx.stride, req.dynamic_hw, req.batch_min
    pictures, sizes = _check_pictures(imgsz, stride, dynamic_hw)
    worst = check_same_outputs(src, dst, pictures, batch, sizes)
    if worst > MAX_RELATIVE_DIFF:
        raise ExportError(f"{req.model_name}: verification failed: the uint8-input model's output differs from "
                          f"the float model's by {worst:.2e} of its range on the same pictures; not installed")
    ctx.notes.append(f"takes uint8 NHWC BGR pixels (the letterbox's bytes); output equal to the float "
                     f"model's on {len(pictures)} picture(s) at {', '.join(f'{h}x{w}' for h, w in sizes)} "
                     f"(largest difference {worst:.1e} of its range)")
    ctx.model_path = dst
    ctx.input_contract = RAW_UINT8
    ctx.build_info["uint8_input"] = {"float_onnx_sha256": sha256_file(src), "max_relative_diff": worst}
    if adopted is not None:
        build = {**adopted.build, **ctx.build_info}
        ctx.manifest = dataclasses.replace(
            adopted, model_file=f"{req.model_name}.onnx", model_sha256=sha256_file(dst),
            input_dtype=RAW_UINT8.dtype, input_layout=RAW_UINT8.layout, input_channels=RAW_UINT8.channels,
            build=build, created=utc_now())
