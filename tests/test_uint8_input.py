"""Models that take the letterbox's uint8 bytes (``streamd-export --input uint8``).

The float model gets (n, 3, H, W) RGB / 255 made on the host; the uint8 model gets the
letterbox's (n, H, W, 3) BGR staging buffer itself and makes that tensor in its first nodes.
Proved here on the real Normal/Fall model, through the daemon's own BatchBuffer, backends and
postprocess, on ONNX Runtime and OpenVINO: the graph's first nodes make bit for bit the host's
tensor, and both models give the same detections (every box matched, IoU >= 0.9999, |dconf|
<= 1e-5) at a stride-padded 16:9 shape and a square one, batch 1 and 3; FP16 and INT8
exports compose with it; the torch-free path makes it; ``streamd run`` publishes the same
detections with either model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from streamd.backends import open_backend
from streamd.backends.tensorrt.probe import tensorrt_version
from streamd.backends.tensorrt.profiles import (
    BatchProfile,
    HwProfile,
    TensorSpec,
    check_io,
    hw_profile_for_network,
    hw_profile_from_shapes,
    profile_shapes,
)
from streamd.errors import BackendError, ManifestError
from streamd.manifest import FLOAT_INPUT, RAW_UINT8, ModelManifest, sidecar_path
from streamd.pipeline.postprocess import PostprocessParams, postprocess
from streamd.pipeline.preprocess import BatchBuffer, net_shape_for
from streamd_export.cli import main as export_main
from streamd_export.stages import ExportRequest, run_export
from streamd_export.uint8_input import uint8_prefix
from tests.test_export_onnx_input import bare_copy, export_without_torch
from tests.test_parity import Dets, compare, dets_from_streamd

IOU_MIN, CONF_TOL = 0.9999, 1e-5
CONF = 0.25
BACKENDS = ("onnxruntime", "openvino")


def _openvino_or_skip(backend: str) -> None:
    if backend == "openvino" and importlib.util.find_spec("openvino") is None:
        pytest.skip("the openvino extra is not installed (pip install '.[openvino]')")


@pytest.fixture(scope="module")
def float_model(fall_onnx_640_anyhw: Path) -> Path:
    return fall_onnx_640_anyhw


@pytest.fixture(scope="module")
def uint8_model(float_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The float export made uint8 by the torch-free path (an ONNX taken as it is)."""
    out = tmp_path_factory.mktemp("uint8")
    result = run_export(ExportRequest(weights=float_model, input="uint8", out_dir=out))
    assert result.model_path == out / f"{float_model.stem}-uint8.onnx"
    return result.model_path


@pytest.fixture(scope="module")
def frames(sample_images: list[Path]) -> dict[str, list[np.ndarray]]:
    """Three frames per camera shape, all of one letterbox shape: a 16:9 camera (zidane,
    1280x720 -> 640x384, stride-padded) and a square one (a crop of bus.jpg -> 640x640)."""
    bus, zidane = (cv2.imread(str(p)) for p in sample_images)
    square = np.ascontiguousarray(bus[200:1010, 0:810])
    return {
        "16:9": [zidane, cv2.flip(zidane, 1), cv2.resize(zidane, (960, 540))],
        "square": [square, cv2.flip(square, 1), cv2.resize(square, (500, 500))],
    }


def detect(model: Path, backend: str, images: list[np.ndarray], tmp: Path) -> tuple[list[Dets], np.ndarray]:
    """The daemon's path: net shape, BatchBuffer in the model's contract, backend, postprocess.
    Returns the detections and the batch handed to the backend."""
    options: dict[str, Any] = {"cache_dir": tmp} if backend == "openvino" else {}
    with open_backend(model, backend, device="cpu", warmup=False, **options) as b:
        info = b.info
        h, w = images[0].shape[:2]
        net = net_shape_for(w, h, info.input_hw, info.stride) if info.dynamic_hw else info.input_hw
        batch, boxes = BatchBuffer(len(images), *net, fit=info.input_hw,
                                   contract=info.input_contract).fill(images)
        raw = b.infer(batch)
        params = PostprocessParams(conf=CONF, iou=0.7, max_det=300)
        dets = postprocess(raw, info.output_layout, boxes, info.names, params)
        return [dets_from_streamd(d) for d in dets], batch.copy()


# ---------------------------------------------------------------------------------------
# the graph and the host make the same tensor
# ---------------------------------------------------------------------------------------
def test_the_uint8_graph_starts_with_the_input_step(uint8_model: Path) -> None:
    import onnx

    model = onnx.load(str(uint8_model), load_external_data=False)
    (inp,) = model.graph.input
    dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims == ["batch", "height", "width", 3]
    # Cast first: TensorRT takes a uint8 network input only into a Cast.
    assert [n.op_type for n in model.graph.node[:4]] == ["Cast", "Transpose", "Gather", "Mul"]
    assert {p.key for p in model.metadata_props} >= {"names", "stride", "imgsz"}
    m = ModelManifest.read(uint8_model)
    assert m.input_contract() == RAW_UINT8 and m.input_dtype == "uint8"
    assert (m.input_layout, m.input_channels) == ("nhwc", "bgr")
    assert m.build["uint8_input"]["max_relative_diff"] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_first_nodes_make_exactly_the_hosts_tensor(backend: str, float_model: Path,
                                                       frames: dict[str, list[np.ndarray]], tmp_path: Path) -> None:
    """The added nodes alone, run by the backend, against BatchBuffer's float pass: equal bit
    for bit (the rest of the graph is the float model's own)."""
    import onnx

    _openvino_or_skip(backend)
    prefix = uint8_prefix(onnx.load(str(float_model)), "images", "scaled")
    path = tmp_path / "prefix.onnx"
    onnx.save(prefix, str(path))
    if backend == "onnxruntime":
        import onnxruntime as ort
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        run = lambda x: sess.run(None, {"images": x})[0]  # noqa: E731
    else:
        import openvino as ov
        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        run = lambda x: np.asarray(compiled(x)[0])  # noqa: E731
    for images in frames.values():
        h, w = images[0].shape[:2]
        net = net_shape_for(w, h, (640, 640))
        want, _ = BatchBuffer(3, *net, fit=(640, 640)).fill(images)
        raw, _ = BatchBuffer(3, *net, fit=(640, 640), contract=RAW_UINT8).fill(images)
        got = run(raw)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.array_equal(got, want), f"max diff {np.abs(got - want).max()}"


# ---------------------------------------------------------------------------------------
# same detections through the daemon's path
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("shape", ["16:9", "square"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_model_gives_the_float_models_detections(backend: str, shape: str, n: int, float_model: Path,
                                                       uint8_model: Path, frames: dict[str, list[np.ndarray]],
                                                       tmp_path: Path) -> None:
    _openvino_or_skip(backend)
    images = frames[shape][:n]
    ref, x_float = detect(float_model, backend, images, tmp_path)
    got, x_u8 = detect(uint8_model, backend, images, tmp_path)
    assert x_float.dtype == np.float32 and x_u8.dtype == np.uint8
    assert x_u8.shape == (n, *x_float.shape[2:], 3)
    want_hw = {"16:9": (384, 640), "square": (640, 640)}[shape]
    assert x_float.shape[2:] == want_hw
    assert sum(len(r) for r in ref) >= n, "too few boxes for a meaningful comparison"
    for k, (r, g) in enumerate(zip(ref, got)):
        c = compare(r, g, CONF, IOU_MIN, CONF_TOL)
        assert not c.problems() and c.excused == 0 and c.matched == len(r) == len(g), (
            f"{backend} {shape} image {k}: {c}")
    print(f"\n[uint8] {backend} {shape} batch {n}: {sum(len(r) for r in ref)} boxes, all matched")


def test_the_batch_buffer_hands_over_its_staging_bytes(frames: dict[str, list[np.ndarray]]) -> None:
    buf = BatchBuffer(4, 384, 640, fit=(640, 640), contract=RAW_UINT8)
    assert buf.tensor is None                      # no float tensor allocated at all
    first, _ = buf.fill(frames["16:9"][:2])
    second, _ = buf.fill(frames["16:9"][1:])
    assert first.dtype == np.uint8 and first.shape == (2, 384, 640, 3) and second.shape == (2, 384, 640, 3)
    assert first.flags.c_contiguous and np.shares_memory(first, second)      # one buffer, reused
    float_buf = BatchBuffer(4, 384, 640, fit=(640, 640))
    x, _ = float_buf.fill(frames["16:9"][1:])
    # The same letterbox: the float tensor is these bytes, RGB, CHW, / 255.
    want = second[:, :, :, ::-1].transpose(0, 3, 1, 2).astype(np.float32) * np.float32(1 / 255)
    assert np.array_equal(x[:2], want)


# ---------------------------------------------------------------------------------------
# the contract: manifests old and new, a model without one, wrong batches
# ---------------------------------------------------------------------------------------
def test_an_old_manifest_means_float_nchw_rgb(uint8_model: Path) -> None:
    d = json.loads(sidecar_path(uint8_model).read_text())
    for key in ("input_layout", "input_channels"):
        del d[key]
    d["input_dtype"] = "float32"
    assert ModelManifest.from_dict(d).input_contract() == FLOAT_INPUT
    d.update(input_dtype="uint8", input_layout="nchw")
    with pytest.raises(ManifestError, match=r"input_dtype/input_layout/input_channels: input uint8 NCHW "):
        ModelManifest.from_dict(d, where="x.onnx.json")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_uint8_model_without_manifest_is_read_from_its_graph(backend: str, uint8_model: Path,
                                                               tmp_path: Path) -> None:
    _openvino_or_skip(backend)
    bare = bare_copy(uint8_model, tmp_path / "bare")
    options: dict[str, Any] = {"cache_dir": tmp_path} if backend == "openvino" else {}
    with open_backend(bare, backend, device="cpu", warmup=True, **options) as b:
        assert b.info.source == "onnx-metadata" and b.info.input_contract == RAW_UINT8
        assert b.info.dynamic_hw and b.info.input_hw == (640, 640)
        with pytest.raises(BackendError, match=r"takes the letterbox's uint8 bytes .*got float32"):
            b.infer(np.zeros((1, 384, 640, 3), np.float32))
        with pytest.raises(BackendError, match=r"expects shape \(n, h, w, 3\)"):
            b.infer(np.zeros((1, 3, 384, 640), np.uint8))


def test_a_manifest_that_disagrees_with_the_graph_is_refused(uint8_model: Path, tmp_path: Path) -> None:
    model = bare_copy(uint8_model, tmp_path / "m")
    m = ModelManifest.read(uint8_model)
    m.input_dtype, m.input_layout, m.input_channels = "float32", "nchw", "rgb"
    m.write(model)
    with pytest.raises(ManifestError, match=r"manifest says input float32 NCHW RGB, but the graph's input"):
        open_backend(model, "onnxruntime", device="cpu", warmup=False)


def test_tensorrt_shapes_follow_the_inputs_layout() -> None:
    """The TensorRT build and runtime's shape decisions for an NHWC uint8 input (no GPU here)."""
    batch, hw = BatchProfile(1, 4, 4), HwProfile((320, 320), (640, 640), (640, 640), 32)
    assert profile_shapes(batch, hw, (640, 640), "nhwc") == ((1, 320, 320, 3), (4, 640, 640, 3), (4, 640, 640, 3))
    assert profile_shapes(batch, None, (384, 640), "nhwc")[2] == (4, 384, 640, 3)
    assert profile_shapes(batch, None, (384, 640))[2] == (4, 3, 384, 640)
    assert hw_profile_from_shapes((1, 320, 320, 3), (4, 640, 640, 3), (4, 640, 640, 3), layout="nhwc") == hw
    assert hw_profile_for_network((-1, -1, -1, 3), (640, 640), layout="nhwc") is not None
    assert hw_profile_for_network((-1, 384, 640, 3), (384, 640), layout="nhwc") is None
    out = TensorSpec("output0", False, (-1, 6, -1), "FLOAT")
    check_io([TensorSpec("images", True, (-1, -1, -1, 3), "UINT8"), out], path="m.engine", input_name="images",
             output_names=["output0"], imgsz=(640, 640), dynamic_hw=True, layout="nhwc")
    with pytest.raises(ValueError, match=r"expected \(batch, -1, -1, 3\)"):
        check_io([TensorSpec("images", True, (-1, 3, -1, -1), "UINT8"), out], path="m.engine",
                 input_name="images", output_names=["output0"], imgsz=(640, 640), dynamic_hw=True, layout="nhwc")


# ---------------------------------------------------------------------------------------
# the export tool: torch-free, and composed with each precision
# ---------------------------------------------------------------------------------------
def test_onnx_to_uint8_runs_without_torch(float_model: Path, tmp_path: Path) -> None:
    onnx = bare_copy(float_model, tmp_path / "from-workstation")
    out = tmp_path / "engines"
    r = export_without_torch(str(onnx), "--input", "uint8", "--out-dir", str(out), "--name", "fall-u8",
                             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "images uint8 NHWC BGR, batch 1-8 x any H x W up to 640 x 640 (multiples of 32) x 3" in r.stdout
    assert "manifest derived from the ONNX graph" in r.stdout and "on 1 picture(s)" in r.stdout   # no torch: noise
    assert sorted(p.name for p in out.iterdir()) == ["fall-u8.onnx", "fall-u8.onnx.json"]   # no float copy
    m = ModelManifest.read(out / "fall-u8.onnx")
    assert m.input_contract() == RAW_UINT8 and m.class_names == {0: "Normal", 1: "Fall"}
    m.check_file(out / "fall-u8.onnx")
    again = export_without_torch(str(out / "fall-u8.onnx"), "--input", "uint8", "--out-dir", str(out),
                                 cwd=tmp_path)
    assert again.returncode == 2 and "fall-u8.onnx: already takes uint8 NHWC BGR pixels" in again.stderr
    if tensorrt_version() is None:
        # --engine as well: the uint8 model installed first, then the step TensorRT would do, named.
        engine = export_without_torch(str(onnx), "--input", "uint8", "--engine", "--out-dir",
                                      str(tmp_path / "e"), cwd=tmp_path)
        assert engine.returncode == 3 and "needs TensorRT, which is not installed" in engine.stderr
        assert ModelManifest.read(tmp_path / "e" / "model-uint8.onnx").input_contract() == RAW_UINT8


def _export(pt: Path, out_dir: Path, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = export_main([str(pt), "--imgsz", "320", "--batch", "1-4", "--fixed-size", "--input", "uint8",
                          "--out-dir", str(out_dir), *args])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def calib_folder(tmp_path_factory: pytest.TempPathFactory, sample_images: list[Path]) -> Path:
    from streamd_export.samples import write_sample_pictures

    folder = tmp_path_factory.mktemp("calib")
    write_sample_pictures(folder, sample_images)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_the_pt_export_makes_uint8_models_of_each_precision(precision: str, fall_pt: Path, fall_onnx_320: Path,
                                                            calib_folder: Path, tmp_path: Path) -> None:
    """From the checkpoint: the uint8 input goes on last (after FP16 conversion, INT8
    calibration and the agreement check), the verify stage checks it, and its detections on
    the samples are those of the same precision's float model (the export compared them)."""
    extra = {"fp32": [], "fp16": ["--precision", "fp16"],
             "int8": ["--precision", "int8", "--int8-flavour", "cpu", "--calib", str(calib_folder)]}[precision]
    rc, out, err = _export(fall_pt, tmp_path, *extra)
    assert rc == 0, err
    suffix = {"fp32": "", "fp16": "-fp16", "int8": "-int8-cpu"}[precision]
    model = tmp_path / f"fall-yolov8s{suffix}-uint8.onnx"
    m = ModelManifest.read(model)
    assert m.precision == precision and m.input_contract() == RAW_UINT8 and not m.dynamic_hw
    assert m.build["uint8_input"]["max_relative_diff"] <= 1e-6
    if precision != "fp32":
        assert m.build["agreement"]["ap50"] >= 0.85            # the float model's check, kept
    assert "takes uint8 NHWC BGR pixels" in out
    # Against the FP32 float model, as the daemon runs both.
    images = [cv2.imread(str(p)) for p in sorted(calib_folder.glob("*.jpg"))]      # both, and mirrored
    ref, _ = detect(fall_onnx_320, "onnxruntime", images, tmp_path)
    got, _ = detect(model, "onnxruntime", images, tmp_path)
    tol = {"fp32": (IOU_MIN, CONF_TOL), "fp16": (0.99, 0.01), "int8": (0.8, 0.1)}[precision]
    matched = sum(compare(r, g, CONF, *tol).matched for r, g in zip(ref, got))
    assert matched >= {"fp32": 1.0, "fp16": 1.0, "int8": 0.8}[precision] * sum(len(r) for r in ref)


def test_uint8_input_is_named_in_the_help() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert export_main(["--help"]) == 0
    assert "--input {float,uint8}" in out.getvalue()


# ---------------------------------------------------------------------------------------
# the daemon
# ---------------------------------------------------------------------------------------
def still_clip(path: Path, picture: np.ndarray, frames: int = 30) -> Path:
    """A clip whose every frame is the same JPEG (MJPG): every frame decodes to the same
    pixels, so every frame's detections must be the same whichever frames a run publishes."""
    h, w = picture.shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (w, h))
    assert writer.isOpened(), "OpenCV cannot write MJPG here"
    for _ in range(frames):
        writer.write(picture)
    writer.release()
    return path


def published(model: Path, clip: Path, daemon_factory: Any, collector_factory: Any,
              count: int = 4) -> tuple[list[list[dict[str, Any]]], str]:
    from tests.fixtures_daemon import wait_until
    from tests.test_daemon import base_config, started

    cfg = base_config(model, [{"id": "pitch", "url": str(clip), "loop": True, "fps": 4}], autotune_s=1)
    cfg["model"].update(backend="onnxruntime", device="cpu")
    d, c = started(daemon_factory, collector_factory, cfg)
    wait_until(lambda: len([m for m in c.of("detections", "pitch") if m["detections"]]) >= count, 120,
               what=f"{count} frames with boxes\n{d.log()[-2000:]}")
    assert d.stop(timeout=15) == 0
    msgs = [m for m in c.of("detections", "pitch") if m["detections"]]
    assert all((m["width"], m["height"]) == (1280, 720) for m in msgs)
    return [m["detections"] for m in msgs], d.log()


@pytest.mark.slow
def test_streamd_run_publishes_the_same_detections_with_the_uint8_model(
        float_model: Path, uint8_model: Path, sample_images: list[Path], tmp_path: Path,
        daemon_factory: Any, collector_factory: Any) -> None:
    clip = still_clip(tmp_path / "pitch.avi", cv2.imread(str(sample_images[1])))       # zidane, 16:9
    want, _ = published(float_model, clip, daemon_factory, collector_factory)
    got, log = published(uint8_model, clip, daemon_factory, collector_factory)
    assert "takes uint8 NHWC BGR" in log and "Traceback" not in log
    # A frame is published either as decoded (the first) or as scaled in the decoder to what
    # the pipeline needs (the rest), and the two differ by a few pixels' rounding: the uint8
    # run publishes only the float run's detections, and the same in the steady state.
    assert len(want[-1]) >= 2 and same(got[-1], want[-1]), (got[-1], want[-1])
    for dets in got:
        assert any(same(dets, ref) for ref in want), f"{dets} is none of the float run's {want}"


def same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """Equal detections as published (rounded to 4 decimals and 0.1 px: one unit apart at most)."""
    return [(d["class_id"], d["label"]) for d in a] == [(d["class_id"], d["label"]) for d in b] and all(
        abs(x["confidence"] - y["confidence"]) <= 1e-4 + 1e-9
        and float(np.abs(np.subtract(x["box"], y["box"])).max()) <= 0.1 + 1e-9 for x, y in zip(a, b))
