"""An ONNX model as streamd-export's input, without torch or Ultralytics: the manifest derived
from the graph and its metadata, an engine requested from it, an engine built elsewhere adopted.
TensorRT is not installable here: those runs must stop at the TensorRT step, naming it, after
every torch-free step worked (proved in a process where importing torch or ultralytics fails)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from streamd.backends.tensorrt.probe import tensorrt_version
from streamd.manifest import ModelManifest, sidecar_path
from streamd_export.adopt_engine import profile_facts
from streamd_export.onnx_input import derive_manifest, read_onnx
from streamd_export.stages import ExportInputError

REPO = Path(__file__).resolve().parent.parent
# streamd-export in a process where torch and Ultralytics cannot be imported.
NO_TORCH = ("import sys\nfor m in ('torch', 'ultralytics', 'torchvision'): sys.modules[m] = None\n"
            "from streamd_export.cli import main\nsys.exit(main(sys.argv[1:]))")
FIELDS = ("class_names", "imgsz", "output_layout", "dynamic_hw", "stride", "input_name", "input_dtype",
          "output_names", "opset", "batch_max", "model_sha256")


def export_without_torch(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", NO_TORCH, *argv], capture_output=True, text=True, cwd=cwd,
                          timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def bare_copy(onnx: Path, folder: Path, name: str = "model.onnx") -> Path:
    """The ONNX alone, as a workstation hands it over: no manifest beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / name
    shutil.copyfile(onnx, out)
    assert not sidecar_path(out).exists()
    return out


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
