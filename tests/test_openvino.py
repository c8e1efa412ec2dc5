"""The OpenVINO backend for real on this CPU, and ``backend: auto``'s choice by measurement.

OpenVINO's FP32 detections must equal ONNX Runtime's on the parity frames (same files, same
letterbox, same postprocess): IoU >= 0.99 and |conf diff| <= 0.01, at the square size and at
each picture's own rectangle on a model that takes any H x W. The Intel GPU and NPU paths
need those devices and skip where they are absent.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install '.[openvino]')")

from streamd.backends import open_backend  # noqa: E402
from streamd.backends.choice import CHOICE_FILE, choice_key, open_model_pool, survey  # noqa: E402
from streamd.backends.openvino import OpenVinoBackend, present_devices  # noqa: E402
from streamd.backends.pool import open_pool  # noqa: E402
from streamd.config import parse_config  # noqa: E402
from streamd.errors import BackendError, ConfigError, ManifestError, ModelError  # noqa: E402
from streamd.pipeline.postprocess import PostprocessParams, postprocess  # noqa: E402
from streamd.pipeline.preprocess import BatchBuffer, net_shape_for  # noqa: E402
from tests.fixtures_daemon import wait_until  # noqa: E402
from tests.test_parity import (  # noqa: E402,F401  (fall_case, yolov8n_case, images: fixtures)
    LAYOUTS, MODELS, Dets, assert_match, dets_from_streamd, fall_case, get_case, images, run_streamd,
    yolov8n_case)

OV_IOU_MIN, OV_CONF_TOL = 0.99, 0.01


def _ov_device_present(name: str) -> bool:
    return any(d.split(".")[0] == name for d in present_devices())


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("model", MODELS)
def test_fp32_detections_equal_onnxruntime(request: pytest.FixtureRequest, images: list[np.ndarray],
                                           model: str, layout: str, tmp_path: Path) -> None:
    case = get_case(request, model)
    onnx = case.onnx[layout]
    ref = run_streamd(onnx, images, case.confs)
    got = run_streamd(onnx, images, case.confs, backend_name="openvino", cache_dir=tmp_path)
    assert sum(len(r) for r in ref) >= 4, "too few reference boxes for a meaningful comparison"
    res = assert_match(ref, got, case.confs, OV_IOU_MIN, OV_CONF_TOL, f"{model}/{layout} openvino vs onnxruntime")
    print(f"\n[parity] {model}/{layout} openvino vs onnxruntime: min IoU "
          f"{min(c.min_iou for c in res):.6f}, max |dconf| {max(c.max_conf_diff for c in res):.2e}")


def _run_at_own_rectangle(model: Path, img: np.ndarray, backend: str, **options: Any) -> Dets:
    with open_backend(model, backend, device="cpu", warmup=False, **options) as b:
        info = b.info
        net_h, net_w = net_shape_for(img.shape[1], img.shape[0], info.input_hw, info.stride)
        tensor, boxes = BatchBuffer(1, net_h, net_w, fit=info.input_hw).fill([img])
        raw = b.infer(tensor)
        (dets,) = postprocess(raw, info.output_layout, boxes, info.names, PostprocessParams(conf=0.25))
    return dets_from_streamd(dets)


@pytest.mark.slow
def test_any_hw_model_at_each_pictures_rectangle(fall_onnx_640_anyhw: Path, images: list[np.ndarray],
                                                  tmp_path: Path) -> None:
    # bus.jpg (810x1080) runs at 480x640, zidane.jpg (1280x720) at 384x640: two shapes on
    # one compiled model, as the scheduler feeds cameras of different aspects.
    ref = [_run_at_own_rectangle(fall_onnx_640_anyhw, img, "onnxruntime") for img in images]
    got = [_run_at_own_rectangle(fall_onnx_640_anyhw, img, "openvino", cache_dir=tmp_path) for img in images]
    assert all(len(r) >= 2 for r in ref)
    assert_match(ref, got, [0.25] * len(images), OV_IOU_MIN, OV_CONF_TOL, "any-HxW openvino vs onnxruntime")


def test_same_facts_as_onnxruntime_and_the_batch_range_is_honoured(fall_onnx_320: Path, tmp_path: Path) -> None:
    with open_backend(fall_onnx_320, "onnxruntime", device="cpu", warmup=False) as ort_b, \
            open_backend(fall_onnx_320, "openvino", device="cpu", warmup=False, cache_dir=tmp_path) as ov_b:
        assert ov_b.info == ort_b.info
        x = np.random.default_rng(0).random((3, 3, 320, 320), dtype=np.float32)
        np.testing.assert_allclose(ov_b.infer(x), ort_b.infer(x), atol=2e-2, rtol=1e-3)
        with pytest.raises(BackendError, match=r"batch of 9 is outside the model's range 1-8"):
            ov_b.infer(np.zeros((9, 3, 320, 320), np.float32))
        with pytest.raises(BackendError, match=r"expects shape \(n, 3, 320, 320\), got \(1, 3, 330, 320\)"):
            ov_b.infer(np.zeros((1, 3, 330, 320), np.float32))


def test_compiled_model_cache_is_reused_on_a_second_load(fall_onnx_320: Path, tmp_path: Path) -> None:
    cache = tmp_path / "ov-cache"
    with OpenVinoBackend(fall_onnx_320, device="cpu", warmup=False, cache_dir=cache) as first:
        assert not first.loaded_from_cache
        assert first.cache_dir == cache
    blobs = sorted(p.name for p in cache.iterdir())
    assert blobs, "nothing was written to the cache dir"
    with OpenVinoBackend(fall_onnx_320, device="cpu", warmup=False, cache_dir=cache) as second:
        assert second.loaded_from_cache
        second.infer(np.zeros((1, 3, 320, 320), np.float32))
    assert sorted(p.name for p in cache.iterdir()) == blobs


def test_fp32_model_runs_in_fp32_unless_bf16_is_asked_for(fall_onnx_320: Path, tmp_path: Path) -> None:
    from streamd.backends.openvino import core
    has_bf16 = "BF16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    for bf16, want in ((False, "f32"), (True, "bf16" if has_bf16 else "f32")):
        with OpenVinoBackend(fall_onnx_320, device="cpu", warmup=False, cache_dir=tmp_path, bf16=bf16) as b:
            assert b._compiled.model.get_property("INFERENCE_PRECISION_HINT").get_type_name() == want


def test_bad_model_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x01garbage that is not a protobuf graph")
    with pytest.raises(ModelError, match=r"broken\.onnx: not a loadable ONNX model"):
        OpenVinoBackend(bad, device="cpu", cache_dir=tmp_path / "c")


def test_changed_model_bytes_are_refused_like_onnxruntime(fall_onnx_320: Path, tmp_path: Path) -> None:
    copy = tmp_path / fall_onnx_320.name
    shutil.copyfile(fall_onnx_320, copy)
    shutil.copyfile(fall_onnx_320.with_name(fall_onnx_320.name + ".json"), copy.with_name(copy.name + ".json"))
    with copy.open("ab") as f:
        f.write(b"\0")
    errors = []
    for name in ("onnxruntime", "openvino"):
        with pytest.raises(ManifestError) as info:
            open_backend(copy, name, device="cpu", warmup=False)
        errors.append(str(info.value))
    assert errors[0] == errors[1] and str(copy) in errors[0]


@pytest.mark.parametrize("device,ov_name", [("gpu", "GPU"), ("npu", "NPU")])
def test_missing_device_is_named(fall_onnx_320: Path, device: str, ov_name: str) -> None:
    if _ov_device_present(ov_name):
        pytest.skip(f"an OpenVINO {ov_name} is present here: its absence cannot be tested")
    with pytest.raises(BackendError, match=rf"{fall_onnx_320.name}: OpenVINO device {ov_name} "
                                           rf"\(model.device: {device}\) is not present on this machine "
                                           rf"\(present: CPU"):
        OpenVinoBackend(fall_onnx_320, device=device)


@pytest.mark.parametrize("device,ov_name", [("gpu", "GPU"), ("npu", "NPU")])
def test_intel_gpu_and_npu_run_the_model(fall_onnx_320: Path, device: str, ov_name: str, tmp_path: Path) -> None:
    if not _ov_device_present(ov_name):
        pytest.skip(f"no OpenVINO {ov_name} device on this machine (present: {', '.join(present_devices())})")
    with open_backend(fall_onnx_320, "openvino", device=device, cache_dir=tmp_path) as b, \
            open_backend(fall_onnx_320, "onnxruntime", device="cpu") as ref:
        x = np.random.default_rng(0).random((1, 3, 320, 320), dtype=np.float32)
        np.testing.assert_allclose(b.infer(x), ref.infer(x), atol=0.5, rtol=0.05)   # FP16 inside


def test_config_names_the_field_and_line_of_a_device_the_backend_lacks() -> None:
    text = "model:\n  path: m.onnx\n  backend: openvino\n  device: cuda\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, check_files=False)
    assert "model.device" in str(info.value) and ":4:" in str(info.value)
    assert "not an OpenVINO device" in str(info.value)


def test_pool_is_one_compiled_model_with_a_request_per_worker(fall_onnx_320: Path, tmp_path: Path) -> None:
    pool = open_pool(fall_onnx_320, "openvino", device="cpu", threads=1, workers=2, autotune_s=0,
                     cache_dir=tmp_path)
    try:
        a, b = pool.backends
        assert a._compiled is b._compiled and a._request is not b._request
        x = np.random.default_rng(1).random((2, 2, 3, 320, 320), dtype=np.float32)
        out: list[np.ndarray | None] = [None, None]

        def run(i: int) -> None:
            out[i] = pool.backends[i].infer(x[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        with open_backend(fall_onnx_320, "onnxruntime", device="cpu", warmup=False) as ref:
            for i in range(2):
                np.testing.assert_allclose(out[i], ref.infer(x[i]), atol=2e-2, rtol=1e-3)
    finally:
        pool.close()


# ---------------------------------------------------------------------------------------
# backend: auto
# ---------------------------------------------------------------------------------------
def test_auto_measures_remembers_and_is_overridable(fall_onnx_320: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="streamd.backend.choice")
    usable = [c for c in survey(fall_onnx_320, "cpu") if not c.why_not]
    assert {c.backend for c in usable} == {"onnxruntime", "openvino"}
    kw: dict[str, Any] = dict(device="cpu", threads=0, workers=None, autotune_s=1.0, cache_dir=tmp_path)

    pool = open_model_pool(fall_onnx_320, "auto", **kw)
    pool.close()
    saved = json.loads((tmp_path / CHOICE_FILE).read_text())
    entry = saved[choice_key(fall_onnx_320)]
    assert set(entry["img_s"]) == {"onnxruntime (cpu)", "openvino (cpu)"}
    fastest = max(entry["img_s"], key=entry["img_s"].get)
    assert fastest == f"{entry['backend']} ({entry['device']})" and pool.name == entry["backend"]
    assert "chosen by measurement" in caplog.text

    # Remembered: the next start takes the recorded choice, here edited to the other backend.
    other = "onnxruntime" if entry["backend"] == "openvino" else "openvino"
    saved[choice_key(fall_onnx_320)] = {**entry, "backend": other}
    (tmp_path / CHOICE_FILE).write_text(json.dumps(saved))
    caplog.clear()
    pool = open_model_pool(fall_onnx_320, "auto", **kw)
    pool.close()
    assert pool.name == other and "measured on this machine before" in caplog.text

    # Naming a backend overrides the choice.
    pool = open_model_pool(fall_onnx_320, entry["backend"], **kw)
    pool.close()
    assert pool.name == entry["backend"]


def test_auto_on_a_bad_file_gives_the_loaders_own_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x01garbage that is not a protobuf graph")
    with pytest.raises(ModelError, match=r"broken\.onnx: not a loadable ONNX model"):
        open_model_pool(bad, "auto", device="cpu", threads=0, workers=None, autotune_s=1.0, cache_dir=tmp_path)


def test_auto_with_an_absent_device_says_why_each_backend_cannot(fall_onnx_320: Path, tmp_path: Path) -> None:
    if _ov_device_present("GPU"):
        pytest.skip("an OpenVINO GPU is present here: its absence cannot be tested")
    with pytest.raises(BackendError, match=r"no installed backend runs it on device 'gpu' \(model.device\): "
                                           r"openvino \(gpu\): no GPU device here"):
        open_model_pool(fall_onnx_320, "auto", device="gpu", threads=0, workers=None, autotune_s=1.0,
                        cache_dir=tmp_path)


# ---------------------------------------------------------------------------------------
# the daemon on OpenVINO
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_daemon_on_openvino_publishes_detections(fall_onnx_320: Path, test_media, daemon_factory,
                                                 collector_factory, tmp_path: Path) -> None:
    from tests.test_daemon import base_config, started

    cams = [{"id": "bus", "url": str(test_media["bus"].mp4), "loop": True, "fps": 4},
            {"id": "pitch", "url": str(test_media["zidane"].mp4), "loop": True, "fps": 4}]
    cfg = base_config(fall_onnx_320, cams, autotune_s=1)
    cfg["model"].update(backend="openvino", device="cpu", cache_dir=str(tmp_path / "cache"))
    d, c = started(daemon_factory, collector_factory, cfg)
    wait_until(lambda: {m["camera"] for m in c.of("detections") if m["detections"]} == {"bus", "pitch"},
               90, what=f"detections with boxes from both cameras\n{d.log()[-2000:]}")
    labels = {det["label"] for m in c.of("detections") for det in m["detections"]}
    assert labels and labels <= {"Normal", "Fall"}
    assert d.stop(timeout=15) == 0
    log = d.log()
    assert "with OpenVINO on CPU" in log and "Traceback" not in log
    assert any((tmp_path / "cache" / "openvino").iterdir())


# ---------------------------------------------------------------------------------------
# streamd doctor's table
# ---------------------------------------------------------------------------------------
def test_doctor_measures_each_backend_and_says_why_others_are_unavailable(fall_onnx_320: Path) -> None:
    import re
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "streamd.cli", "doctor", "--model", str(fall_onnx_320)],
                         capture_output=True, text=True, timeout=180).stdout
    table = out[out.index("backends ("):]
    for backend in ("onnxruntime", "openvino"):
        m = re.search(rf"^  {backend} +cpu +(\d+\.\d) ", table, re.M)
        assert m and float(m.group(1)) > 0, table
    if not _ov_device_present("GPU"):
        assert re.search(r"^  openvino +gpu +-- +no GPU device here", table, re.M), table
    assert "<- fastest" in table
