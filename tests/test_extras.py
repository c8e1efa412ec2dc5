"""The extras in pyproject.toml bring what the code they are for imports.

The torch-free export (``streamd-export MODEL.onnx --engine``, run as a process in which torch,
Ultralytics, onnxslim and sympy cannot be imported) is traced module by module to the
distribution that installs each: every one must be among what ``pip install
'streamd[engine-tools]'`` installs (the daemon's dependencies, the extra, and what those require
in turn), so a box without the export extra has all it needs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from streamd.backends.tensorrt.probe import tensorrt_version
from tests.fixtures_models import bare_copy

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]
# What the torch-free export must do without: the export extra's heavy parts, and sympy (ONNX
# Runtime's optional symbolic shape inference, which the FP16 and INT8 stages skip).
NOT_INSTALLED = ("torch", "torchvision", "ultralytics", "onnxslim", "sympy")
TRACE = ("import json, sys\n"
         f"for m in {NOT_INSTALLED!r}: sys.modules[m] = None\n"
         "from streamd_export.cli import main\n"
         "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as exc:\n    rc = exc.code\n"
         # modules from files (not built-ins or the ones Cython makes at run time, like cython_runtime)
         "print(json.dumps({'rc': rc, 'modules': sorted({n.split('.')[0] for n, m in sys.modules.items() "
         "if getattr(m, '__file__', None) or getattr(m, '__path__', None)})}))")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def names(requirements: list[str]) -> set[str]:
    return {canonical(Requirement(r).name) for r in requirements}


def installed_closure(requirements: list[str]) -> set[str]:
    """The distributions ``requirements`` install, following each one's own requirements (those
    without an extra), as installed here."""
    todo = list(names(requirements))
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in reqs:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonical(req.name))
    return seen


def test_the_daemon_installs_without_the_export_tools_heavy_parts() -> None:
    assert not names(PROJECT["dependencies"]) & {"torch", "ultralytics", "onnx", "onnxslim"}


def test_the_tensorrt_extra_brings_the_cuda_binding_and_nvml() -> None:
    assert {"cuda-python", "nvidia-ml-py"} <= names(EXTRAS["tensorrt"])
    # ... and nothing the daemon could not load on a box without TensorRT's own wheels
    assert not names(EXTRAS["tensorrt"]) & {"pycuda", "tensorrt", "torch"}


def test_the_light_export_extra_has_no_torch() -> None:
    light = names(EXTRAS["engine-tools"])
    assert "onnx" in light and not light & {"torch", "ultralytics", "onnxslim"}


def test_the_torch_free_export_needs_only_the_engine_tools_extra(fall_onnx_640_anyhw: Path,
                                                                 tmp_path: Path) -> None:
    if tensorrt_version() is not None:
        pytest.skip("TensorRT is installed here: the export would go on to build the engine")
    onnx = bare_copy(fall_onnx_640_anyhw, tmp_path / "from-workstation")
    r = subprocess.run([sys.executable, "-c", TRACE, str(onnx), "--engine", "--out-dir", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    trace = json.loads(r.stdout.strip().splitlines()[-1])
    assert trace["rc"] == 3 and "needs TensorRT" in r.stderr, r.stderr        # stopped at TensorRT only
    assert (tmp_path / "out" / "model.onnx.json").is_file()                    # after the rest was done
    providers = metadata.packages_distributions()
    allowed = installed_closure(PROJECT["dependencies"] + EXTRAS["engine-tools"])
    own = {"streamd", "streamd_export", "tests"}
    outside = {module: sorted(canonical(d) for d in providers.get(module, ["?"]))
               for module in trace["modules"]
               if module not in sys.stdlib_module_names and module not in own and not module.startswith("_")}
    missing = {m: dists for m, dists in outside.items() if not set(dists) & allowed}
    assert not missing, f"imported by the torch-free export but not installed by streamd[engine-tools]: {missing}"
