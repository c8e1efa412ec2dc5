"""The edge box without the export extra, for real: a new venv (``python -m venv``, without the
system site-packages) into which this checkout is installed as a user installs it there,
``pip install 'streamd[engine-tools]'``; torch and Ultralytics are absent from it, not blocked.

In that venv ``streamd-export MODEL.onnx --engine``, ``--precision fp16 --engine`` and
``--precision int8 --engine`` write their ONNX models and manifests and stop at the TensorRT step
with its message and exit status 3, and the daemon's ``streamd check --load-model`` loads each
model they wrote.

It fails when the extra lacks what those stages import. With ``onnx`` dropped from
``engine-tools`` in a copy of pyproject.toml, 7 of its 8 tests failed: ``onnx`` was not found,
the three exports stopped at reading the ONNX ("reading an ONNX model needs the onnx package",
exit status 2 or ExportInputError) and the daemon had no model to load. Before the FP16 stage
stopped using ONNX Runtime's symbolic shape inference, that stage failed here for want of sympy.

pip resolves from this machine's configured indexes and wheel folders (``pip config list``),
with its cache: the venv and the install take about 30 s here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from streamd.manifest import ModelManifest, sha256_file
from streamd_export.cli import EXIT_NEEDS_GPU

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# What building the package reads (pyproject.toml's packages, package-dir and readme): copied
# out, so that the build's own build/ and *.egg-info never land in the checkout.
BUILD_INPUTS = ("pyproject.toml", "README.md", "streamd", "tools/export")
EXTRA = "engine-tools"
NEEDS_TENSORRT = "the 'engine' step (TensorRT build) needs TensorRT, which is not installed here"
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class EdgeVenv:
    root: Path
    home: Path
    install_seconds: float

    def run(self, program: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """``program`` from the venv's bin/, with an environment of its own (no PYTHONPATH)."""
        env = {"PATH": f"{self.root / 'bin'}:/usr/bin:/bin", "HOME": str(self.home)}
        return subprocess.run([str(self.root / "bin" / program), *args], capture_output=True, text=True,
                              cwd=cwd, env=env, timeout=timeout)

    def python(self, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        # -I: neither the working folder nor the script's folder on sys.path, no PYTHONPATH, no user site
        return self.run("python", "-I", *args, cwd=cwd)


def copy_checkout(dest: Path) -> Path:
    for name in BUILD_INPUTS:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest / name)
    return dest


def make_venv(folder: Path) -> None:
    try:
        import ensurepip  # noqa: F401
    except ImportError:
        pytest.skip(f"{sys.executable} has no ensurepip, so python -m venv cannot put pip into a new venv "
                    f"(Debian: apt-get install python3-venv)")
    r = subprocess.run([sys.executable, "-m", "venv", str(folder)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0 and "ensurepip" in r.stdout + r.stderr:
        pytest.skip(f"python -m venv cannot install pip here: {(r.stdout + r.stderr).strip()[-300:]}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "include-system-site-packages = false" in (folder / "pyvenv.cfg").read_text()


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> EdgeVenv:
    base = tmp_path_factory.mktemp("edge-box")
    src = copy_checkout(base / "streamd-src")
    t0 = time.monotonic()
    make_venv(base / "venv")
    # pip's own configuration and cache (the user's environment), not the test process's PYTHONPATH
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    r = subprocess.run([str(base / "venv" / "bin" / "python"), "-m", "pip", "install", f"{src}[{EXTRA}]"],
                       capture_output=True, text=True, env=env, cwd=base, timeout=600)
    assert r.returncode == 0, f"pip install '{src}[{EXTRA}]' failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    seconds = time.monotonic() - t0
    print(f"new venv + pip install '.[{EXTRA}]': {seconds:.1f} s")
    (base / "home").mkdir()
    return EdgeVenv(base / "venv", base / "home", seconds)


@dataclass
class Export:
    run: subprocess.CompletedProcess[str]
    model: Path


@pytest.fixture(scope="module")
def exports(edge: EdgeVenv, workstation_onnx: Path, sample_pictures_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Export]:
    work = tmp_path_factory.mktemp("edge-exports")
    onnx = str(workstation_onnx)
    out = {p: work / p for p in PRECISIONS}
    return {
        "fp32": Export(edge.run("streamd-export", onnx, "--engine", "--out-dir", str(out["fp32"]), "--name", "fall",
                                cwd=work), out["fp32"] / "fall.onnx"),
        "fp16": Export(edge.run("streamd-export", onnx, "--precision", "fp16", "--engine", "--verify-images",
                                str(sample_pictures_dir), "--out-dir", str(out["fp16"]), cwd=work), out["fp16"] / "model-fp16.onnx"),
        "int8": Export(edge.run("streamd-export", onnx, "--precision", "int8", "--calib", str(sample_pictures_dir), "--engine",
                                "--out-dir", str(out["int8"]), cwd=work), out["int8"] / "model-int8.onnx"),
    }


def test_torch_and_ultralytics_are_not_installed_there(edge: EdgeVenv, tmp_path: Path) -> None:
    for module in ("torch", "ultralytics"):
        r = edge.python("-c", f"import {module}", cwd=tmp_path)
        assert r.returncode == 1 and f"ModuleNotFoundError: No module named '{module}'" in r.stderr, r.stderr
    # Not on sys.path at all (nothing blocks them), and the streamd that runs is the venv's own.
    r = edge.python("-c", "import importlib.util as u, json, streamd, streamd_export\n"
                          "print(json.dumps({'found': [m for m in ('torch', 'ultralytics', 'onnxslim', 'sympy') "
                          "if u.find_spec(m)], 'onnx': bool(u.find_spec('onnx')), "
                          "'files': [streamd.__file__, streamd_export.__file__]}))", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    assert facts["found"] == [] and facts["onnx"]
    site = edge.root / "lib"
    assert all(Path(f).is_relative_to(site) for f in facts["files"]), facts["files"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_onnx_stages_run_there_up_to_tensorrt(exports: dict[str, Export], workstation_onnx: Path,
                                                  precision: str) -> None:
    export = exports[precision]
    r = export.run
    assert r.returncode == EXIT_NEEDS_GPU, r.stdout + r.stderr
    assert NEEDS_TENSORRT in r.stderr and "Traceback" not in r.stderr, r.stderr
    # Everything before the TensorRT step was done: the model and its manifest, and no engine.
    manifest = ModelManifest.read(export.model)
    assert manifest.precision == precision and manifest.model_sha256 == sha256_file(export.model)
    assert manifest.class_names == {0: "Normal", 1: "Fall"} and manifest.imgsz == (320, 320)
    assert not export.model.with_suffix(".engine").exists()
    # stdout carries the summary alone, and an export that stopped prints none: the calibrator's
    # own lines went to stderr with the progress.
    assert r.stdout == "", r.stdout
    if precision == "fp32":
        return
    # Made from the workstation's ONNX, which the manifest names with its digest.
    assert manifest.source["onnx"] == workstation_onnx.name
    assert manifest.source["sha256"] == sha256_file(workstation_onnx)
    assert manifest.build["fp32_onnx_sha256"] == sha256_file(workstation_onnx)
    agreement = manifest.build["agreement"]
    assert agreement["images"] == 12 and agreement["ap50"] >= agreement["min_agreement"], agreement
    if precision == "int8":
        assert manifest.build["int8"]["calibration_images"] == 12
        assert manifest.build["int8"]["flavour"] == "tensorrt"
        # OpenVINO is not installed there, so its agreement was not measured and it is not listed.
        assert "tensorrt" in manifest.backends and "openvino" not in manifest.backends


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_daemon_there_loads_what_they_wrote(edge: EdgeVenv, exports: dict[str, Export], precision: str,
                                                tmp_path: Path) -> None:
    model = exports[precision].model
    config = tmp_path / "streamd.yaml"
    config.write_text(f"model:\n  path: {model}\ncameras:\n  - id: door\n    url: rtsp://127.0.0.1:8554/door\n")
    r = edge.run("streamd", "check", "-c", str(config), "--load-model", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"model: {model.name} (2 classes, 320x320, batch 1-8, yolov8_raw, {precision}) on onnxruntime" in r.stdout
    assert f"{config}: OK (1 cameras, model {model.name}" in r.stdout
