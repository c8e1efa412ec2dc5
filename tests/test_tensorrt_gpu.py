"""TensorRT engines built, loaded and run on a real GPU.

Skipped, with the reason, where TensorRT, a CUDA binding (cuda-python or pycuda) or an NVIDIA GPU is missing. Where they
are present: FP32, FP16 and INT8 (Q/DQ) engines are built by ``streamd-export --engine``
from the real Normal/Fall checkpoint, loaded by streamd's TensorRT backend and compared
with ONNX Runtime on the same pictures; dynamic batches and two batches in flight give
the same answers as single images; a changed engine byte is refused; and the daemon runs
end to end on an engine, fed by video files.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from streamd.manifest import ModelManifest, sha256_file

pytestmark = [pytest.mark.gpu, pytest.mark.tensorrt, pytest.mark.slow]

IMGSZ = 320
CONF = 0.25
# Agreement (AP50 against ONNX Runtime FP32) each engine must reach on the sample pictures.
MIN_AP = {"fp32": 0.98, "fp16": 0.95, "int8": 0.85}
# FP32 engines may use TF32 convolutions: raw outputs (boxes in pixels, scores) stay close.
FP32_MAX_ABS = {"boxes": 1.0, "scores": 0.02}


def _missing() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (pip install tensorrt from NVIDIA's index, or JetPack)"
    from streamd.backends.tensorrt.probe import cuda_binding, probe_gpu

    try:
        cuda_binding()
    except ImportError as exc:
        return f"{exc} (the TensorRT backend needs one)"

    gpu, why = probe_gpu(0)
    if gpu is None:
        return f"no usable NVIDIA GPU ({why})"
    return None


_REASON = _missing()
if _REASON is not None:
    pytestmark.append(pytest.mark.skip(reason=_REASON))


def export(pt: Path, out_dir: Path, *args: str) -> tuple[int, str]:
    from streamd_export.cli import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = main([str(pt), "--imgsz", str(IMGSZ), "--batch", "1-4", "--out-dir", str(out_dir), "--engine", *args])
    return rc, err.getvalue()


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory: pytest.TempPathFactory, sample_images: list[Path]) -> Path:
    folder = tmp_path_factory.mktemp("calib")
    for k, path in enumerate(sample_images):
        img = cv2.imread(str(path))
        cv2.imwrite(str(folder / f"{k}.jpg"), img)
        cv2.imwrite(str(folder / f"{k}-flip.jpg"), cv2.flip(img, 1))
    return folder


@pytest.fixture(scope="module")
def engines(fall_pt: Path, tmp_path_factory: pytest.TempPathFactory, calib_dir: Path) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("engines")
    made: dict[str, Path] = {}
    for precision in ("fp32", "fp16", "int8"):
        extra = ["--calib", str(calib_dir)] if precision == "int8" else []
        rc, err = export(fall_pt, out, "--precision", precision, *extra)
        assert rc == 0, err
        suffix = "" if precision == "fp32" else f"-{precision}"
        made[precision] = out / f"{fall_pt.stem}{suffix}.engine"
    assert (out / "timing.cache").is_file(), "the timing cache is written for the next build"
    return made


@pytest.fixture(scope="module")
def pictures(sample_images: list[Path]) -> list[np.ndarray]:
    imgs = [cv2.imread(str(p)) for p in sample_images]
    return imgs + [cv2.flip(i, 1) for i in imgs]


def _dets(output: np.ndarray, names: dict[int, str], layout: str, lbs: list[Any]) -> list[Any]:
    from streamd.pipeline.postprocess import PostprocessParams, postprocess
    from streamd_export.verify_stage import Dets

    out = []
    for ds in postprocess(output, layout, lbs, names, PostprocessParams(conf=0.001)):
        out.append(Dets(np.array([d.box for d in ds]).reshape(-1, 4), np.array([d.confidence for d in ds]),
                        np.array([d.class_id for d in ds])))
    return out


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_manifest_records_its_build(precision: str, engines: dict[str, Path]) -> None:
    import tensorrt as trt

    from streamd.backends.tensorrt.probe import probe_gpu

    engine = engines[precision]
    m = ModelManifest.read(engine)
    gpu, _ = probe_gpu(0)
    assert gpu is not None
    assert m.model_format == "tensorrt" and m.precision == precision
    assert m.model_sha256 == sha256_file(engine)
    b = m.build
    assert b["tensorrt"] == trt.__version__
    assert b["compute_capability"] == gpu.compute_capability and b["gpu"] == gpu.name
    assert b["profile"] == {"min": 1, "opt": 4, "max": 4}
    onnx = engine.with_name(b["onnx_file"])
    assert onnx.suffix == ".onnx" and b["onnx_sha256"] == sha256_file(onnx)
    assert engine.read_bytes()[:4] != b"{\"de"   # a plain plan, no JSON header in front


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_agrees_with_onnxruntime(precision: str, engines: dict[str, Path], fall_onnx_320: Path,
                                        pictures: list[np.ndarray]) -> None:
    from streamd_export.verify_stage import agreement

    from streamd.backends import open_backend
    from streamd.pipeline.preprocess import letterbox_batch

    with open_backend(fall_onnx_320, device="cpu", warmup=False) as ref_b:
        x, lbs = letterbox_batch(pictures, IMGSZ, IMGSZ)
        ref_out = ref_b.infer(x)
        names, layout = ref_b.info.names, ref_b.info.output_layout
    with open_backend(engines[precision]) as b:
        assert b.name == "tensorrt" and b.info.precision == precision
        got_out = b.infer(x)
    assert got_out.shape == ref_out.shape and got_out.dtype == np.float32
    a = agreement(_dets(ref_out, names, layout, lbs), _dets(got_out, names, layout, lbs), names, CONF)
    assert a.reference_boxes >= 8 and a.ap50 is not None
    assert a.ap50 >= MIN_AP[precision], a.summary()
    if precision == "fp32":
        assert np.abs(got_out[:, :4] - ref_out[:, :4]).max() <= FP32_MAX_ABS["boxes"]
        assert np.abs(got_out[:, 4:] - ref_out[:, 4:]).max() <= FP32_MAX_ABS["scores"]


def test_dynamic_batches_and_two_in_flight_match_single_images(engines: dict[str, Path],
                                                               pictures: list[np.ndarray]) -> None:
    from streamd.backends import open_backend
    from streamd.pipeline.preprocess import letterbox_batch

    x, _ = letterbox_batch(pictures, IMGSZ, IMGSZ)
    with open_backend(engines["fp32"]) as b:
        assert (b.profile.min, b.profile.max) == (1, 4)
        singles = np.concatenate([b.infer(x[i:i + 1]) for i in range(4)])
        together = b.infer(x)
        three = b.infer(x[:3])
        h1 = b.infer_async(x[:2])
        h2 = b.infer_async(x[2:])
        with pytest.raises(Exception, match="already in flight"):
            b.infer_async(x[:1])
        second, first = b.wait(h2), b.wait(h1)
        with pytest.raises(Exception, match="already collected"):
            b.wait(h1)
        with pytest.raises(Exception, match="outside the model's range"):
            b.infer(np.concatenate([x, x[:1]]))
    np.testing.assert_allclose(together, singles, rtol=0, atol=1e-2)
    np.testing.assert_allclose(three, singles[:3], rtol=0, atol=1e-2)
    np.testing.assert_allclose(np.concatenate([first, second]), together, rtol=0, atol=1e-2)


def test_a_changed_engine_byte_is_refused(engines: dict[str, Path], tmp_path: Path) -> None:
    from streamd.backends import open_backend
    from streamd.errors import ManifestError

    engine = tmp_path / engines["fp16"].name
    engine.write_bytes(engines["fp16"].read_bytes())
    ModelManifest.read(engines["fp16"]).write(engine)
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0x01
    engine.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="does not match its manifest"):
        open_backend(engine)


def test_engine_from_another_tensorrt_is_rebuilt_when_allowed(engines: dict[str, Path], tmp_path: Path) -> None:
    from dataclasses import replace

    from streamd.backends.tensorrt.runtime import TensorRTBackend
    from streamd.errors import ManifestError

    src = engines["fp32"]
    engine = tmp_path / src.name
    engine.write_bytes(src.read_bytes())
    onnx = src.with_name(ModelManifest.read(src).build["onnx_file"])
    (tmp_path / onnx.name).write_bytes(onnx.read_bytes())
    m = ModelManifest.read(src)
    # The same bytes claimed by an older TensorRT line: refused, or rebuilt from the ONNX.
    replace(m, build={**m.build, "tensorrt": "8.5.3"}).write(engine)
    with pytest.raises(ManifestError, match="built by TensorRT 8.5.3"):
        TensorRTBackend(engine, warmup=False)
    with TensorRTBackend(engine, rebuild=True) as b:
        assert b.info.precision == "fp32"
    rebuilt = ModelManifest.read(engine)
    assert rebuilt.build["tensorrt"] == m.build["tensorrt"] and rebuilt.model_sha256 == sha256_file(engine)


def test_daemon_runs_end_to_end_on_an_engine(engines: dict[str, Path], test_media: Any, daemon_factory: Any,
                                              collector_factory: Any) -> None:
    from tests.fixtures_daemon import free_tcp_port

    cams = [{"id": "bus", "url": str(test_media["bus"].mp4), "loop": True, "fps": 5},
            {"id": "pitch", "url": str(test_media["zidane"].mp4), "loop": True, "fps": 5}]
    cfg = {"model": {"path": str(engines["fp16"]), "conf": CONF},
           "scheduler": {"max_batch": 4, "max_wait_ms": 20, "max_frame_age_ms": 1500},
           "publisher": {"endpoint": f"tcp://127.0.0.1:{free_tcp_port()}", "heartbeat_s": 0.5,
                         "stats_interval_s": 1.0},
           "cameras": cams}
    d = daemon_factory(cfg)
    c = collector_factory(cfg["publisher"]["endpoint"])
    for cam in ("bus", "pitch"):
        c.wait_for(lambda m, cam=cam: m["type"] == "detections" and m["camera"] == cam and m["detections"],
                   90, f"detections from {cam} on the engine\n{d.log()[-2000:]}")
    msg = next(m for m in c.of("detections", "bus") if m["detections"])
    assert all(det["label"] in ("Normal", "Fall") for det in msg["detections"])
    assert d.stop(timeout=20) == 0
    log = d.log()
    assert "tensorrt" in log.lower() and "Traceback" not in log
