"""Which backends a model file is meant for: the manifest's ``backends``, and how ``backend:
auto`` and a named ``model.backend`` honour it.

An INT8 file of the symmetric flavour is made for TensorRT and OpenVINO, one with uint8
activations for ONNX Runtime; old manifests (without the field) still load and get the
backends their INT8 flavour was verified on then. The choice is exercised for real on the FP32 Normal/Fall export,
its manifest rewritten to name the backends (the file's bytes, and so its sha256, are
unchanged), with ONNX Runtime and OpenVINO both installed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from streamd.backends.choice import open_model_pool
from streamd.errors import ManifestError
from streamd.manifest import LAYOUT_RAW, ModelManifest, sidecar_path


def manifest_dict(**change: Any) -> dict[str, Any]:
    return {"model_file": "m.onnx", "model_sha256": "0" * 64, "model_format": "onnx",
            "class_names": {"0": "a"}, "imgsz": [320, 320], "batch_min": 1, "batch_max": 8,
            "output_layout": LAYOUT_RAW, **change}


# ---------------------------------------------------------------------------------------
# the manifest field
# ---------------------------------------------------------------------------------------
def test_backends_round_trip_and_old_manifests_still_load(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model bytes")
    m = ModelManifest.from_dict(manifest_dict(precision="int8", backends=["tensorrt", "openvino"]))
    m.write(model)
    assert json.loads(sidecar_path(model).read_text())["backends"] == ["tensorrt", "openvino"]
    back = ModelManifest.read(model)
    assert back == m and back.meant_for() == ("tensorrt", "openvino")

    # Written before the field existed: FP32/FP16 run anywhere, INT8 by its recorded flavour.
    for precision, flavour, want in (("fp32", None, ()), ("fp16", None, ()),
                                     ("int8", "tensorrt", ("tensorrt",)),
                                     ("int8", "cpu", ("onnxruntime",)), ("int8", None, ())):
        build = {"int8": {"flavour": flavour}} if flavour else {}
        old = ModelManifest.from_dict(manifest_dict(precision=precision, build=build))
        assert old.backends == [] and old.meant_for() == want, (precision, flavour)


@pytest.mark.parametrize("value", ["openvino", [""], [1], {"openvino": True}])
def test_bad_backends_value_is_refused_naming_the_field(value: Any) -> None:
    with pytest.raises(ManifestError, match=r"m\.onnx\.json: backends must be a list of backend names"):
        ModelManifest.from_dict(manifest_dict(backends=value), where="m.onnx.json")


# ---------------------------------------------------------------------------------------
# backend: auto and a named backend
# ---------------------------------------------------------------------------------------
@pytest.fixture()
def labelled(fall_onnx_320: Path, tmp_path: Path) -> Any:
    """``labelled(backends)``: a copy of the FP32 export whose manifest names ``backends``."""
    def make(backends: list[str]) -> Path:
        model = tmp_path / f"fall-{'-'.join(backends) or 'any'}.onnx"
        shutil.copyfile(fall_onnx_320, model)
        m = ModelManifest.read(fall_onnx_320)
        m.model_file, m.backends = model.name, list(backends)
        m.write(model)
        return model
    return make


def _open(model: Path, backend: str, tmp_path: Path, autotune_s: float) -> str:
    pool = open_model_pool(model, backend, device="cpu", threads=0, workers=1, autotune_s=autotune_s,
                           cache_dir=tmp_path / "cache")
    pool.close()
    return pool.name


@pytest.mark.parametrize("meant,other", [(["openvino"], "onnxruntime"), (["onnxruntime"], "openvino")])
def test_auto_only_measures_the_backends_the_file_is_meant_for(meant: list[str], other: str, labelled: Any,
                                                               tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("openvino", reason="the openvino extra is not installed: auto has one backend")
    caplog.set_level(logging.INFO, logger="streamd.backend.choice")
    model = labelled(meant)
    assert _open(model, "auto", tmp_path, autotune_s=0.5) == meant[0]
    assert f"skipped {other} (cpu): {model.name} is meant for {meant[0]}" in caplog.text
    # One candidate left: nothing was measured, so nothing was remembered as a comparison.
    assert "chosen by measurement" not in caplog.text
    assert not (tmp_path / "cache" / "backend-choice.json").exists()


def test_auto_with_none_of_its_backends_here_runs_on_what_is_and_warns(labelled: Any, tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="streamd.backend.choice")
    model = labelled(["tensorrt"])          # an .onnx file: TensorRT is no candidate for it here
    # ONNX Runtime, which every export verifies through, and nothing else is measured.
    assert _open(model, "auto", tmp_path, autotune_s=0.5) == "onnxruntime"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith(
        f"backend auto: {model.name} is meant for tensorrt, none of which can run it here; running it "
        f"on onnxruntime (cpu) instead")
    assert "chosen by measurement" not in caplog.text
    if importlib.util.find_spec("openvino") is not None:
        assert f"skipped openvino (cpu): {model.name} is meant for tensorrt" in caplog.text


def test_naming_a_backend_the_file_is_not_meant_for_warns_and_runs(labelled: Any, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="streamd.backend.choice")
    model = labelled(["tensorrt", "openvino"])
    assert _open(model, "onnxruntime", tmp_path, autotune_s=0) == "onnxruntime"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"model.backend onnxruntime: {model.name} is meant for tensorrt, openvino")
    assert "--int8-flavour cpu" in warning

    caplog.clear()
    model = labelled(["onnxruntime"])
    assert _open(model, "onnxruntime", tmp_path, autotune_s=0) == "onnxruntime"
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_doctor_marks_backends_the_file_is_not_meant_for(labelled: Any, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("openvino", reason="the openvino extra is not installed: one backend to measure")
    from streamd.service.backend_table import print_backend_table

    model = labelled(["openvino"])
    print_backend_table(model)
    rows = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()
            if ln.startswith("  ") and ln.split()[1] == "cpu"}
    # Both are measured; only the one the file is meant for can be auto's pick, however the
    # two measure on a busy box.
    assert "not meant for this file (its manifest: openvino)" in rows["onnxruntime"]
    assert "<- fastest" not in rows["onnxruntime"] and "<- fastest" in rows["openvino"]
    assert "not meant" not in rows["openvino"]


def test_float_parts_of_int8_and_fp16_models_run_in_fp32_on_openvino_cpu() -> None:
    # The head's decode stays float in an INT8 file; OpenVINO would run it in BF16 on CPUs
    # that have it, which is not what the export verified. BF16 is for FP32 models, when asked.
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    from streamd.backends.openvino import compile_properties

    for precision in ("int8", "fp16"):
        for bf16 in (False, True):
            assert compile_properties("CPU", 2, 1, precision, bf16)["INFERENCE_PRECISION_HINT"] == "f32"
    assert compile_properties("CPU", 2, 1, "fp32", True)["INFERENCE_PRECISION_HINT"] == "bf16"
    assert compile_properties("CPU", 2, 1, "fp32", False)["INFERENCE_PRECISION_HINT"] == "f32"
