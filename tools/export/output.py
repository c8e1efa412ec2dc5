"""Stages ``manifest``, ``verify`` and ``install``: describe, prove, then publish the model.

The manifest is built from what the earlier stages found, and ``verify`` loads the model in
ONNX Runtime and holds it to that manifest (input name and shape, output names and shape,
a real run; for a model that takes any H x W, a second run at a smaller, non-square size)
*before* ``install`` copies anything into the output folder.
"""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from importlib import metadata

import numpy as np

import streamd
from streamd.errors import ExportError
from streamd.fileio import copy_atomic
from streamd.manifest import LAYOUT_END2END, LAYOUT_RAW, ModelManifest, sha256_file

from .onnx_stage import anchor_count, expected_input_dims, expected_output_dims
from .stages import ExportContext, ExportInputError, register

_TOOL_DISTS = ("ultralytics", "torch", "onnx", "onnxruntime", "onnxslim")


def tool_versions() -> dict[str, str]:
    """Versions of everything that shaped the model file (absent packages are left out)."""
    versions = {"streamd": streamd.__version__, "python": platform.python_version()}
    for dist in _TOOL_DISTS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@register("manifest", "describe the model in its sidecar manifest")
def manifest_stage(ctx: ExportContext) -> None:
    req = ctx.request
    if ctx.model_path is None:
        raise RuntimeError("the manifest stage needs a model file")
    out_dims = expected_output_dims(ctx)
    nms = None
    if req.nms:
        nms = {"conf": req.conf, "iou": req.iou, "max_det": out_dims[1]}
    suffix = ".onnx" if ctx.model_format == "onnx" else ".engine"
    manifest = ModelManifest(
        model_file=f"{req.model_name}{suffix}",
        model_sha256=sha256_file(ctx.model_path),
        model_format=ctx.model_format,
        class_names=dict(ctx.class_names),
        imgsz=req.imgsz,
        batch_min=req.batch_min,
        batch_max=req.batch_max,
        output_layout=LAYOUT_END2END if req.nms else LAYOUT_RAW,
        stride=ctx.stride,
        dynamic_hw=req.dynamic_hw,
        precision=ctx.precision,
        input_name=ctx.input_name,
        input_dtype=ctx.input_contract.dtype,
        input_layout=ctx.input_contract.layout,
        input_channels=ctx.input_contract.channels,
        output_names=list(ctx.output_names),
        opset=ctx.opset,
        nms=nms,
        source=dict(ctx.source),
        tools=tool_versions(),
        build={"exporter": "ultralytics", "dynamic_batch": req.dynamic_batch,
               "simplify": req.simplify, **ctx.build_info},
        created=utc_now(),
        backends=list(ctx.backends),
    )
    manifest.validate(where=f"manifest of {manifest.model_file}")
    ctx.manifest = manifest


def _declared(dims: list[object]) -> list[int | None]:
    return [d if isinstance(d, int) else None for d in dims]


@register("verify", "load the model in ONNX Runtime, check it against the manifest, run it once")
def verify_stage(ctx: ExportContext) -> None:
    import onnxruntime as ort

    m = ctx.manifest
    if m is None or ctx.model_path is None:
        raise RuntimeError("the verify stage needs the manifest stage first")
    name = m.model_file

    def fail(msg: str) -> ExportError:
        return ExportError(f"{name}: verification failed: {msg}")

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(ctx.model_path), sess_options=opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise fail(f"ONNX Runtime cannot load it ({str(exc).strip().splitlines()[0][:300]})") from None
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    if len(inputs) != 1:
        raise fail(f"expected one input, found {len(inputs)}")
    inp = inputs[0]
    h, w = m.imgsz
    want_in = expected_input_dims(ctx)
    contract = m.input_contract()
    want_type = f"tensor({'uint8' if contract.raw else 'float'})"
    if inp.name != m.input_name or _declared(list(inp.shape)) != want_in or inp.type != want_type:
        raise fail(f"input is {inp.name} {inp.shape} {inp.type}, the manifest says "
                   f"{m.input_name} {want_in} {want_type}")
    names = [o.name for o in outputs]
    if names != m.output_names:
        raise fail(f"outputs are {names}, the manifest says {m.output_names}")
    want_out = expected_output_dims(ctx)
    declared = _declared(list(outputs[0].shape))
    if any(d is not None and d != e for d, e in zip(declared, want_out)) or len(declared) != len(want_out):
        raise fail(f"output {names[0]} is declared {outputs[0].shape}, expected {want_out}")

    n = m.batch_min
    sizes = [(h, w)]
    if m.dynamic_hw:
        # A model that takes any H x W must really do so: also run it at a smaller size of
        # another aspect, as a 16:9 camera would feed it.
        sizes.append(verify_size((h, w), m.stride))
    rng = np.random.default_rng(0)
    for size in sizes:
        # A fixed pseudo-image rather than zeros: it exercises the score and NMS paths too.
        x = (rng.integers(0, 256, contract.shape(n, *size), dtype=np.uint8) if contract.raw
             else rng.random(contract.shape(n, *size), dtype=np.float32))
        try:
            y = sess.run([names[0]], {inp.name: x})[0]
        except Exception as exc:
            raise fail(f"a run on a batch of {n} at {size[0]}x{size[1]} failed "
                       f"({str(exc).strip().splitlines()[0][:300]})") from None
        got = list(y.shape)
        want = [n, *want_out[1:]]
        if want[-1] is None:
            want[-1] = anchor_count(size, ctx.strides)
        if got != want:
            raise fail(f"a batch of {n} at {size[0]}x{size[1]} gave output shape {got}, expected {want}")
        if not np.isfinite(y).all():
            raise fail(f"the output at {size[0]}x{size[1]} holds NaN or infinite values")


def verify_size(imgsz: tuple[int, int], stride: int) -> tuple[int, int]:
    """A second input size for a model that takes any H x W: the height kept, the width cut
    to about 9/16 of it (a portrait 16:9 picture), rounded up to the stride."""
    h, w = imgsz
    small_w = max(stride, -(-(w * 9 // 16) // stride) * stride)
    if small_w == w:             # too narrow to cut: make it shorter instead
        return (max(stride, h - stride), w) if h > stride else (h, w)
    return (h, small_w)


@register("install", "copy the model into the output folder and write its manifest")
def install_stage(ctx: ExportContext) -> None:
    req = ctx.request
    m = ctx.manifest
    if m is None or ctx.model_path is None:
        raise RuntimeError("the install stage needs a verified model")
    out_dir = req.out_dir
    dest = out_dir / m.model_file
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            ctx.notes.append(f"replaced the previous {dest.name}")
        # A daemon reading the folder never sees half a model under the real name.
        copy_atomic(ctx.model_path, dest)
        ctx.manifest_path = m.write(dest)
    except OSError as exc:
        where = exc.filename or out_dir
        raise ExportInputError(f"{where}: cannot write the model ({exc.strerror})") from None
    ctx.installed_path = dest
