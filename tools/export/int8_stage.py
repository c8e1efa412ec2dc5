"""Stages ``calibrate`` and ``int8``: explicit Q/DQ INT8, calibrated on the user's pictures.

Calibration images come from a folder (``--calib DIR``) or are grabbed from the cameras of
a streamd config (``--calib-from CONFIG``), and are letterboxed by streamd's own
preprocessing, so the activation ranges are measured on what the daemon will feed. They are
letterboxed to the full ``--imgsz`` even for a model that takes any H x W: the daemon's
stride-padded inputs hold the same picture at the same scale, only with less grey padding
around it.

The quantization is ONNX Runtime's ``quantize_static`` in QDQ format, with the head's
decode part left in float (quantizing it destroys the detections: scores collapse to 0).
Two flavours, because the INT8 that TensorRT wants and the INT8 that is fast on a CPU are
not the same file:

* ``tensorrt`` (default): symmetric int8 activations and weights, per-channel weights kept
  as float behind a Q/DQ pair, biases in float, and the convolutions that read a Concat
  left in float (int8_graph.py says why). TensorRT takes only symmetric int8 Q/DQ and
  refuses int32 bias dequantization. It is made for OpenVINO too (fast on a CPU with its
  INT8 kernels), and listed for it where its agreement through OpenVINO passes
  (verify_stage); on ONNX Runtime's CPU it is slower than FP32.
* ``cpu``: uint8 activations (asymmetric), int8 per-channel weights: what ONNX Runtime's
  CPU kernels run fastest. TensorRT cannot build it.

Both flavours take the head's anchor grid size from the input's shape rather than from
the quantized feature maps (same numbers; int8_graph.py says why OpenVINO needs it).

The manifest records which backends the file is meant for (``backends``), so ``backend:
auto`` measures only those.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamd.backends.tensorrt.logic import BUILD_FP32_ONNX_SHA, head_prefix, keep_float_in_int8
from streamd.errors import ConfigError, ExportError
from streamd.manifest import INT8_FLAVOUR_BACKENDS, sha256_file

from .int8_graph import anchor_grid_from_input, concat_fed_convs
from .stages import ExportContext, ExportInputError, register

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
CAMERA_OPEN_TIMEOUT_S = 10.0
CAMERA_READ_TIMEOUT_S = 5.0
LIVE_FRAME_SPACING_S = 1.0      # live cameras: one calibration frame per second of video


def progress(msg: str, *, end: str = "\n") -> None:
    """Progress of long steps, on stderr (stdout carries the final summary only)."""
    print(f"streamd-export: {msg}", file=sys.stderr, end=end, flush=True)


# ---------------------------------------------------------------------------------------
# calibration images
# ---------------------------------------------------------------------------------------
def to_network_input(image: np.ndarray, imgsz: tuple[int, int]) -> np.ndarray:
    """Letterbox one BGR frame exactly as the daemon does; uint8 (3, H, W) RGB."""
    from streamd.pipeline.preprocess import letterbox_batch

    tensor, _ = letterbox_batch([image], *imgsz)
    # The float tensor is uint8 * (1/255) in float32; rounding recovers the bytes exactly.
    return np.rint(tensor[0] * 255.0).astype(np.uint8)


def as_float(samples: np.ndarray) -> np.ndarray:
    """uint8 (N, 3, H, W) -> the float32 batch the daemon would have fed."""
    return np.multiply(samples, np.float32(1.0 / 255.0), dtype=np.float32)


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def spread(n_items: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``n_items`` (all of them if fewer)."""
    if n_items <= count:
        return list(range(n_items))
    return sorted({int(round(i * (n_items - 1) / (count - 1))) if count > 1 else 0 for i in range(count)})


def check_image_folder(folder: Path, flag: str) -> list[Path]:
    if not folder.exists():
        raise ExportInputError(f"{flag} {folder}: no such folder")
    if not folder.is_dir():
        raise ExportInputError(f"{flag} {folder}: is not a folder")
    files = image_files(folder)
    if not files:
        raise ExportInputError(f"{flag} {folder}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def samples_from_folder(folder: Path, count: int, imgsz: tuple[int, int], flag: str = "--calib") -> np.ndarray:
    import cv2

    files = check_image_folder(folder, flag)
    chosen = [files[i] for i in spread(len(files), count)]
    out: list[np.ndarray] = []
    bad: list[str] = []
    for path in chosen:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            bad.append(path.name)
            continue
        out.append(to_network_input(img, imgsz))
    if bad:
        progress(f"{flag}: skipped {len(bad)} unreadable image(s): {', '.join(bad[:5])}"
                 + (" …" if len(bad) > 5 else ""))
    if not out:
        raise ExportInputError(f"{flag} {folder}: none of its images could be read")
    return np.stack(out)


@dataclass
class CameraGrab:
    camera: str
    frames: list[np.ndarray]
    problem: str = ""


def _grab_from_camera(cam: Any, want: int) -> CameraGrab:
    """Up to ``want`` frames of one camera, spread over the file or over time (live)."""
    import cv2

    from streamd.redact import scrub

    grab = CameraGrab(cam.id, [])
    kind = cam.kind
    try:
        if kind == "usb":
            url = cam.open_url()
            index = int(url.split(":", 1)[1]) if url.startswith("usb:") else url
            cap = cv2.VideoCapture(index, cv2.CAP_V4L2)
        else:
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(CAMERA_OPEN_TIMEOUT_S * 1000),
                      cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(CAMERA_READ_TIMEOUT_S * 1000)]
            cap = cv2.VideoCapture(cam.open_url(), cv2.CAP_FFMPEG, params)
    except cv2.error as exc:
        grab.problem = scrub(f"could not be opened ({exc})")
        return grab
    try:
        if not cap.isOpened():
            grab.problem = "could not be opened"
            return grab
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if kind == "file" else 0
        if total > 0:
            for pos in spread(total, want):
                cap.set(cv2.CAP_PROP_POS_FRAMES, pos)
                ok, frame = cap.read()
                if ok and frame is not None:
                    grab.frames.append(frame)
        else:
            # Live: keep decoding (a stream read late serves stale, smeared frames) and keep
            # one frame per spacing interval, so the set covers some time, not one instant.
            deadline = time.monotonic() + want * LIVE_FRAME_SPACING_S + CAMERA_OPEN_TIMEOUT_S
            next_keep = time.monotonic()
            while len(grab.frames) < want and time.monotonic() < deadline:
                if not cap.grab():
                    break
                now = time.monotonic()
                if now >= next_keep:
                    ok, frame = cap.retrieve()
                    if ok and frame is not None:
                        grab.frames.append(frame)
                        next_keep = now + LIVE_FRAME_SPACING_S
        if not grab.frames:
            grab.problem = "gave no frames"
        return grab
    finally:
        cap.release()


def samples_from_config(config: Path, count: int, imgsz: tuple[int, int]) -> tuple[np.ndarray, str]:
    """Frames from every enabled camera of a daemon config, ``count`` in all."""
    from streamd.config import load_config
    from streamd.redact import scrub
    from streamd.pipeline.sources.camera import configure_ffmpeg_defaults

    try:
        cfg = load_config(config, check_files=False)
    except ConfigError as exc:
        raise ExportInputError(f"--calib-from: {scrub(str(exc))}") from None
    cams = [c for c in cfg.cameras if c.enabled]
    if not cams:
        raise ExportInputError(f"--calib-from {config}: the config has no enabled cameras")
    # FFmpeg's and OpenCV's own log lines can carry URLs with credentials: silence them.
    configure_ffmpeg_defaults()
    per_cam = max(1, math.ceil(count / len(cams)))
    out: list[np.ndarray] = []
    failed: list[str] = []
    for k, cam in enumerate(cams, 1):
        progress(f"calibration frames: camera {k}/{len(cams)} {cam.id} ({cam.safe_url}) …")
        grab = _grab_from_camera(cam, per_cam)
        if grab.problem:
            failed.append(f"{cam.id} ({cam.safe_url}): {grab.problem}")
            progress(f"calibration frames: camera {cam.id} ({cam.safe_url}) {grab.problem}")
        out.extend(to_network_input(f, imgsz) for f in grab.frames)
    if not out:
        raise ExportInputError(f"--calib-from {config}: no camera gave a frame ({'; '.join(failed)})")
    return np.stack(out[:count]), f"{len(cams) - len(failed)} camera(s) of {config.name}"


@register("calibrate", "collect calibration images (folder or cameras), letterboxed like the daemon")
def calibrate_stage(ctx: ExportContext) -> None:
    req = ctx.request
    if req.calib is not None:
        ctx.calib_samples = samples_from_folder(req.calib, req.calib_count, req.imgsz)
        ctx.calib_source = f"folder {req.calib.name}"
    elif req.calib_from is not None:
        ctx.calib_samples, ctx.calib_source = samples_from_config(req.calib_from, req.calib_count, req.imgsz)
    else:
        raise ExportInputError("--precision int8 needs --calib DIR or --calib-from CONFIG")
    n = len(ctx.calib_samples)
    if n < req.calib_count:
        ctx.notes.append(f"calibrated on {n} image(s), fewer than --calib-count {req.calib_count}")


# ---------------------------------------------------------------------------------------
# quantization
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flavour:
    name: str
    activation: str              # QuantType member
    weight: str
    per_channel: bool
    extra: dict[str, Any]
    # Percentile (99.999 %) instead of min/max: a handful of extreme activations otherwise
    # set the scale of every tensor. Measured on the Normal/Fall model at 320 with 12
    # images: symmetric int8 AP50 0.948 -> 0.992 against FP32, mean IoU 0.927 -> 0.954.
    method: str = "Percentile"
    # Leave the convolutions fed by a Concat in float: what OpenVINO needs to run symmetric
    # int8 activations as ONNX Runtime and TensorRT define them (int8_graph.py).
    float_concat_convs: bool = False


FLAVOURS = {
    "tensorrt": Flavour("tensorrt", "QInt8", "QInt8", True, {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        # TensorRT rejects DequantizeLinear of int32 (the default quantized bias) and
        # quantizes float weights itself from their Q/DQ scale.
        "QuantizeBias": False,
        "AddQDQPairToWeight": True,
        "DedicatedQDQPair": True,
    }, float_concat_convs=True),
    "cpu": Flavour("cpu", "QUInt8", "QInt8", True, {
        "ActivationSymmetric": False,
        "WeightSymmetric": True,
    }),
}


class _Reader:
    """Feeds the calibration samples to ``quantize_static`` and reports progress."""

    def __init__(self, input_name: str, samples: np.ndarray, batch: int, static_batch: bool) -> None:
        self.input_name = input_name
        self.samples = samples
        self.batch = batch
        self.static_batch = static_batch
        self.pos = 0
        self.last_report = -1.0
        self.t0 = time.monotonic()

    def get_next(self) -> dict[str, np.ndarray] | None:
        n = len(self.samples)
        if self.pos >= n:
            if self.last_report < 1.0:
                self.report(final=True)
            return None
        chunk = self.samples[self.pos:self.pos + self.batch]
        self.pos += len(chunk)
        if self.static_batch and len(chunk) < self.batch:
            # A static-batch model takes exactly its batch: repeat images to fill it.
            reps = -(-self.batch // len(chunk))
            chunk = np.concatenate([chunk] * reps)[: self.batch]
        self.report()
        return {self.input_name: as_float(chunk)}

    def report(self, final: bool = False) -> None:
        n = len(self.samples)
        done = min(self.pos, n) / n
        if final or done - self.last_report >= 0.25:
            self.last_report = done
            progress(f"calibrating: {min(self.pos, n)}/{n} images ({time.monotonic() - self.t0:.0f} s)")

    def rewind(self) -> None:
        self.pos = 0


def quantize_int8(src: Path, dst: Path, samples: np.ndarray, flavour: str, *, input_name: str,
                  batch: int, static_batch: bool, workdir: Path) -> dict[str, Any]:
    """Quantize the FP32 ONNX ``src`` to a Q/DQ ``dst``; returns facts for the manifest."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fl = FLAVOURS[flavour]
    pre = workdir / "int8-preprocessed.onnx"
    # Symbolic shape inference chokes on the dynamic axes (batch, and H x W by default);
    # ONNX's own inference is enough for these graphs: the quantizer needs types, not sizes.
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    model = onnx.load(str(pre))
    graph = model.graph
    prefix = head_prefix(n.name for n in graph.node)
    grid_from_input = anchor_grid_from_input(model, input_name, prefix, probe=int(samples.shape[2]))
    if grid_from_input:
        onnx.save(model, str(pre))
    exclude = [n.name for n in graph.node if keep_float_in_int8(n.name, n.op_type, prefix)]
    if fl.float_concat_convs:
        exclude += [name for name in concat_fed_convs(graph.node) if name not in exclude]

    reader_impl = _Reader(input_name, samples, batch, static_batch)

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def get_next(self) -> dict[str, np.ndarray] | None:
            return reader_impl.get_next()

        def rewind(self) -> None:
            reader_impl.rewind()

    # The calibrators print their own progress lines; stdout is for the tool's summary.
    with contextlib.redirect_stdout(sys.stderr):
        quantize_static(
            str(pre), str(dst), Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=getattr(QuantType, fl.activation),
            weight_type=getattr(QuantType, fl.weight),
            per_channel=fl.per_channel,
            nodes_to_exclude=exclude,
            calibrate_method=getattr(CalibrationMethod, fl.method),
            extra_options=dict(fl.extra),
        )
    qgraph = onnx.load(str(dst), load_external_data=False).graph
    ops = [n.op_type for n in qgraph.node]
    return {
        "flavour": fl.name,
        "activations": fl.activation.lower().replace("q", "", 1),
        "weights": fl.weight.lower().replace("q", "", 1),
        "per_channel": fl.per_channel,
        "symmetric_activations": bool(fl.extra.get("ActivationSymmetric")),
        "calibration_method": fl.method.lower(),
        "calibration_images": int(len(samples)),
        "float_nodes": len(exclude),
        "anchor_grid_from_input": bool(grid_from_input),
        "quantize_nodes": ops.count("QuantizeLinear"),
        "dequantize_nodes": ops.count("DequantizeLinear"),
    }


@register("int8", "quantize to INT8 with Q/DQ nodes, calibrated on the collected images")
def int8_stage(ctx: ExportContext) -> None:
    req = ctx.request
    if ctx.model_path is None or ctx.calib_samples is None:
        raise RuntimeError("the int8 stage needs the onnx and calibrate stages first")
    src = ctx.model_path
    if ctx.reference_onnx is None:
        ctx.reference_onnx = src
    dst = ctx.workdir / f"model-int8-{req.int8_flavour}.onnx"
    batch = req.batch_max if not req.dynamic_batch else min(req.batch_max, 4)
    progress(f"quantizing to INT8 ({req.int8_flavour} flavour) with {len(ctx.calib_samples)} "
             f"calibration image(s) from {ctx.calib_source}")
    try:
        facts = quantize_int8(src, dst, ctx.calib_samples, req.int8_flavour, input_name=ctx.input_name,
                              batch=batch, static_batch=not req.dynamic_batch, workdir=ctx.workdir)
    except Exception as exc:
        raise ExportError(f"{req.weights}: INT8 quantization failed "
                          f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]})") from None
    ctx.model_path = dst
    ctx.precision = "int8"
    ctx.backends = list(INT8_FLAVOUR_BACKENDS[req.int8_flavour])
    facts["calibration_source"] = ctx.calib_source
    ctx.build_info.update({BUILD_FP32_ONNX_SHA: sha256_file(src), "int8": facts})
