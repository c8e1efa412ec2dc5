"""An ONNX model as streamd-export's input, without torch or Ultralytics: the manifest derived
from the graph and its metadata, FP16 and INT8 made from it, an engine requested from it, an engine
built elsewhere adopted.
TensorRT is not installable here: those runs must stop at the TensorRT step, naming it, after
every torch-free step worked (proved in a process where importing torch or ultralytics fails)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from streamd.backends.tensorrt.probe import tensorrt_version
from streamd.manifest import ModelManifest, sha256_file, sidecar_path
from streamd_export.adopt_engine import profile_facts
from streamd_export.onnx_input import derive_manifest, read_onnx, strides_from_graph
from streamd_export.stages import ExportInputError, ExportRequest, plan_for
from tests.fixtures_models import bare_copy

REPO = Path(__file__).resolve().parent.parent
# streamd-export in a process where torch and Ultralytics cannot be imported.
NO_TORCH = ("import sys\nfor m in ('torch', 'ultralytics', 'torchvision'): sys.modules[m] = None\n"
            "from streamd_export.cli import main\nsys.exit(main(sys.argv[1:]))")
FIELDS = ("class_names", "imgsz", "output_layout", "dynamic_hw", "stride", "input_name", "input_dtype",
          "output_names", "opset", "batch_max", "model_sha256")


def export_without_torch(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", NO_TORCH, *argv], capture_output=True, text=True, cwd=cwd,
                          timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("which", ["fall_onnx_320", "fall_onnx_640_anyhw"])
def test_the_derived_manifest_is_the_exporters_own(which: str, request, tmp_path: Path) -> None:
    exported = request.getfixturevalue(which)
    own = ModelManifest.read(exported)
    onnx = bare_copy(exported, tmp_path)
    derived = derive_manifest(onnx, read_onnx(onnx))
    for name in FIELDS:
        assert getattr(derived, name) == getattr(own, name), name


def test_an_onnx_without_ultralytics_metadata_needs_only_what_the_graph_lacks(fall_onnx_640_anyhw: Path,
                                                                            tmp_path: Path) -> None:
    import onnx

    model = onnx.load(str(fall_onnx_640_anyhw))
    del model.metadata_props[:]
    path = tmp_path / "plain.onnx"
    onnx.save(model, str(path))
    facts = read_onnx(path)
    with pytest.raises(ExportInputError, match="--imgsz"):
        derive_manifest(path, facts)             # any H x W, and no size recorded anywhere
    m = derive_manifest(path, facts, imgsz=(640, 640), batch=(1, 8))
    assert m.class_names == {0: "0", 1: "1"} and m.output_layout == "yolov8_raw" and m.dynamic_hw


def test_onnx_to_engine_runs_without_torch_up_to_tensorrt(fall_onnx_640_anyhw: Path, tmp_path: Path) -> None:
    if tensorrt_version() is not None:
        pytest.skip("TensorRT is installed here: the build itself would run")
    onnx = bare_copy(fall_onnx_640_anyhw, tmp_path / "from-workstation")
    out = tmp_path / "engines"
    r = export_without_torch(str(onnx), "--engine", "--out-dir", str(out), "--name", "fall", cwd=tmp_path)
    assert r.returncode == 3, r.stderr
    assert "needs TensorRT, which is not installed" in r.stderr and "Traceback" not in r.stderr
    # Every torch-free step was done: the model and a manifest the daemon's backend loads and runs.
    assert json.loads((out / "fall.onnx.json").read_text())["class_names"] == {"0": "Normal", "1": "Fall"}
    from streamd.backends import open_backend

    with open_backend(out / "fall.onnx", "onnxruntime", device="cpu", warmup=False) as b:
        y = b.infer(np.full((1, 3, 384, 640), 0.5, np.float32))
    assert b.info.names == {0: "Normal", 1: "Fall"} and y.shape[:2] == (1, 6)


def test_a_changed_onnx_is_refused_against_its_manifest(fall_onnx_320: Path, tmp_path: Path) -> None:
    onnx = bare_copy(fall_onnx_320, tmp_path)
    shutil.copyfile(sidecar_path(fall_onnx_320), sidecar_path(onnx))
    with open(onnx, "ab") as f:
        f.write(b"\0")
    r = export_without_torch(str(onnx), "--out-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 2 and "does not match its manifest" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_adopting_an_engine_stops_at_tensorrt_after_reading_the_onnx(fall_onnx_320: Path, tmp_path: Path) -> None:
    if tensorrt_version() is not None:
        pytest.skip("TensorRT is installed here")
    onnx = bare_copy(fall_onnx_320, tmp_path)
    plan = tmp_path / "model.engine"
    plan.write_bytes(b"plan bytes trtexec wrote")
    r = export_without_torch("--adopt-engine", str(plan), "--onnx", str(onnx), cwd=tmp_path)
    assert r.returncode == 3, r.stderr
    assert "read model.onnx (2 classes, yolov8_raw output)" in r.stderr and "needs TensorRT" in r.stderr
    assert not sidecar_path(plan).exists()
    bad = export_without_torch("--adopt-engine", str(plan), "--onnx", str(tmp_path / "nothing.onnx"), cwd=tmp_path)
    assert bad.returncode == 2 and "nothing.onnx" in bad.stderr


def test_an_engines_profile_becomes_its_build_facts() -> None:
    fixed = profile_facts(((1, 3, 320, 320), (4, 3, 320, 320), (8, 3, 320, 320)), 32)
    assert fixed == {"profile": {"min": 1, "opt": 4, "max": 8}}
    any_hw = profile_facts(((1, 3, 160, 160), (2, 3, 320, 320), (4, 3, 320, 320)), 32)
    assert any_hw["hw_profile"] == {"min": [160, 160], "opt": [320, 320], "max": [320, 320], "stride": 32}
    with pytest.raises(ExportInputError):
        profile_facts(((1, 320), (1, 320), (1, 320)), 32)


# ---------------------------------------------------------------------------------------
# FP16 and INT8 from an ONNX: the precision's own stages, the context read from the ONNX
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_exports(workstation_onnx: Path, sample_pictures_dir: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    work = tmp_path_factory.mktemp("onnx-exports")
    runs = {
        "fp16": ("--verify-images", str(sample_pictures_dir)),
        "int8": ("--calib", str(sample_pictures_dir)),
    }
    return {p: (export_without_torch(str(workstation_onnx), "--precision", p, *opts, "--out-dir", str(work / p),
                                     cwd=work), work / p / f"model-{p}.onnx")
            for p, opts in runs.items()}


def summary_only(stdout: str, model: Path) -> None:
    """stdout is streamd-export's summary and nothing else: its first line names the model,
    every other line is one of its indented fields."""
    lines = stdout.splitlines()
    assert lines and lines[0].startswith(f"streamd-export: wrote {model}"), stdout
    fields = ("classes:", "input:", "compute:", "output:", "for:", "note:")
    assert all(line.startswith("  ") and line.split()[0] in fields for line in lines[1:]), stdout


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_fp16_and_int8_are_made_from_an_onnx_without_torch(onnx_exports, workstation_onnx: Path,
                                                          precision: str) -> None:
    r, model = onnx_exports[precision]
    assert r.returncode == 0, r.stderr
    summary_only(r.stdout, model)
    m = ModelManifest.read(model)
    assert m.precision == precision and m.model_sha256 == sha256_file(model)
    # The manifest names the ONNX it was made from, with its digest, and what the graph says.
    assert m.source["onnx"] == workstation_onnx.name and m.source["sha256"] == sha256_file(workstation_onnx)
    assert m.build["fp32_onnx_sha256"] == sha256_file(workstation_onnx)
    assert (m.imgsz, m.batch_min, m.batch_max, m.stride) == ((320, 320), 1, 8, 32)
    assert m.class_names == {0: "Normal", 1: "Fall"}
    agreement = m.build["agreement"]
    assert agreement["images"] == 12 and agreement["ap50"] >= agreement["min_agreement"], agreement
    from streamd.backends import open_backend

    with open_backend(model, "onnxruntime", device="cpu", warmup=False) as b:
        y = b.infer(np.full((2, 3, 320, 320), 0.5, np.float32))
    assert b.info.names == {0: "Normal", 1: "Fall"} and y.shape == (2, 6, 2100)


def test_int8_calibration_prints_go_to_stderr(onnx_exports) -> None:
    r, model = onnx_exports["int8"]
    assert r.returncode == 0, r.stderr
    # ONNX Runtime's calibrator prints these itself; they are on stderr, not in the summary.
    assert "Collecting tensor data" in r.stderr and "Collecting tensor data" not in r.stdout
    summary_only(r.stdout, model)


def test_the_daemon_checks_and_loads_an_int8_model_made_from_an_onnx(onnx_exports, tmp_path: Path) -> None:
    _, model = onnx_exports["int8"]
    config = tmp_path / "streamd.yaml"
    config.write_text(f"model:\n  path: {model}\ncameras:\n  - id: door\n    url: rtsp://127.0.0.1:8554/door\n")
    r = subprocess.run([sys.executable, "-m", "streamd.cli", "check", "-c", str(config), "--load-model"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout + r.stderr
    # The symmetric file is meant for TensorRT and OpenVINO: it loads on OpenVINO where the
    # export's check through OpenVINO listed it, else (no backend it is meant for) on ONNX Runtime.
    meant = ModelManifest.read(model).backends
    # Made from an ONNX, the INT8 file gets the same graph changes as from a .pt, so it
    # passes its check through OpenVINO wherever OpenVINO is installed.
    assert ("openvino" in meant) == (importlib.util.find_spec("openvino") is not None), meant
    backend = "openvino" if "openvino" in meant else "onnxruntime"
    assert f"model: {model.name} (2 classes, 320x320, batch 1-8, yolov8_raw, int8) on {backend}" in r.stdout


def test_an_already_converted_onnx_is_refused(onnx_exports, sample_pictures_dir: Path, tmp_path: Path) -> None:
    for precision in ("fp16", "int8"):
        _, converted = onnx_exports[precision]
        # With its manifest, and alone (then the graph's float16 weights or Q/DQ nodes tell).
        for onnx in (converted, bare_copy(converted, tmp_path / precision)):
            r = export_without_torch(str(onnx), "--precision", "int8", "--calib", str(sample_pictures_dir),
                                     "--out-dir", str(tmp_path / "out"), cwd=tmp_path)
            assert r.returncode == 2, r.stderr
            assert f"is already {precision.upper()}; FP16 and INT8 are made from the FP32 ONNX" in r.stderr
    assert not (tmp_path / "out").exists()


def test_int8_of_an_onnx_with_nms_in_its_graph_is_refused(exported_model, fall_pt: Path, sample_pictures_dir: Path,
                                                         tmp_path: Path) -> None:
    with_nms = bare_copy(exported_model(fall_pt, 320, (1, 8), True), tmp_path)
    r = export_without_torch(str(with_nms), "--precision", "int8", "--calib", str(sample_pictures_dir),
                             "--out-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 2 and "has NMS in its graph" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
    # From a checkpoint, --nms with int8 is refused before the export (quantizing it failed with
    # "inhomogeneous shape" after 30 s of work); FP16 runs through NMS.
    with pytest.raises(ExportInputError, match="INT8 calibration cannot run through NMS"):
        ExportRequest(weights=fall_pt, nms=True, precision="int8", calib=sample_pictures_dir)
    ExportRequest(weights=fall_pt, nms=True, precision="fp16")


def test_a_uint8_input_onnx_is_refused_as_a_starting_point(fall_onnx_320: Path, sample_pictures_dir: Path,
                                                           tmp_path: Path) -> None:
    from streamd_export.uint8_input import wrap_uint8

    raw = tmp_path / "raw.onnx"
    wrap_uint8(fall_onnx_320, raw)
    r = export_without_torch(str(raw), "--precision", "fp16", "--verify-images", str(sample_pictures_dir),
                             "--out-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 2 and "takes uint8 pixels" in r.stderr, r.stderr


@pytest.mark.parametrize("which", ["fall_onnx_320", "fall_onnx_640_anyhw", "yolov8n_onnx_320"])
def test_the_heads_strides_are_read_from_the_graph(which: str, request) -> None:
    import onnx

    path = request.getfixturevalue(which)
    m = ModelManifest.read(path)
    model = onnx.load(str(path))
    assert strides_from_graph(model, m.imgsz, m.batch_min) == (8, 16, 32)
    # Found by its DFL nodes' names wherever the head sits ...
    for node in model.graph.node:
        node.name = node.name.replace("model.22", "head")
    assert strides_from_graph(model, m.imgsz, m.batch_min) == (8, 16, 32)
    # ... and nothing is read from a graph without them (the stage then assumes 8/16/32).
    for node in model.graph.node:
        node.name = node.name.replace("/dfl/", "/dist/")
    assert strides_from_graph(model, m.imgsz, m.batch_min) is None


def test_an_onnx_gets_its_precisions_plan_without_the_torch_stages(tmp_path: Path) -> None:
    def names(**kw) -> list[str]:
        return [s.name for s in plan_for(ExportRequest(weights=tmp_path / "m.onnx", **kw))]

    assert names() == ["preflight", "adopt"]
    assert names(precision="fp16", input="uint8", engine=True) == [
        "preflight", "inputs", "onnx-source", "fp16", "agreement", "uint8", "manifest", "verify", "install", "engine"]
    assert names(precision="int8", calib=tmp_path) == [
        "preflight", "inputs", "onnx-source", "calibrate", "int8", "agreement", "manifest", "verify", "install"]
