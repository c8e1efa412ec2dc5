"""Session fixtures that provide real models: weights, ONNX exports and sample images.

Loaded as a pytest plugin (``pytest_plugins`` in conftest.py, or ``-p tests.fixtures_models``).
Everything expensive is cached under ``<repo>/.cache/test-models`` in folders named by a hash
of all inputs (weights bytes, export options, the export tool's own source, library
versions), so a rerun reuses it and any change that could alter the result makes a new one.

Fixtures:
    fall_pt                   the trained Normal/Fall YOLOv8s checkpoint (skips if unreachable)
    yolov8n_pt                a YOLOv8n built from yolov8n.yaml with seeded random weights
    exported_model            factory: (pt, imgsz, batch, nms, **opts) -> exported .onnx path
    fall_onnx_320             fall model, 320x320, dynamic batch 1-8, raw head
    yolov8n_onnx_320          random YOLOv8n, 320x320, dynamic batch 1-8, raw head
    fall_onnx_640_anyhw       fall model, any H x W up to 640x640, dynamic batch 1-8, raw head
    yolov8n_onnx_640_anyhw    random YOLOv8n, any H x W up to 640x640, dynamic batch 1-8, raw head
    sample_images             Ultralytics' bus.jpg and zidane.jpg from the installed package
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from streamd.thresholds import DEFAULT_CONF, DEFAULT_IOU, DEFAULT_MAX_DET

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".cache" / "test-models"
EXPORT_SRC = REPO_ROOT / "tools" / "export"
FETCH_SCRIPT = REPO_ROOT / "tools" / "fetch_sample_model.py"

# Bump when the recipe below changes: the cached random model is keyed by it.
RANDOM_YOLOV8N_RECIPE = "v2 seed=0 bn=16 crops@320 cls_bias=-6 box_gain=4"

ExportFactory = Callable[..., Path]


def _digest(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _versions() -> tuple[str, ...]:
    out = []
    for dist in ("ultralytics", "torch", "onnx", "onnxruntime", "onnxslim"):
        try:
            out.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            out.append(f"{dist}=-")
    return tuple(out)


def _source_digest(folder: Path) -> str:
    """Hash of the export tool's source, so editing it invalidates cached exports."""
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    manifest_py = REPO_ROOT / "streamd" / "manifest.py"
    if manifest_py.exists():
        h.update(manifest_py.read_bytes())
    return h.hexdigest()[:16]


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def load_fetch_module() -> ModuleType:
    """tools/fetch_sample_model.py is a script, not a package module: load it by path."""
    spec = importlib.util.spec_from_file_location("streamd_tools_fetch_sample_model", FETCH_SCRIPT)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {FETCH_SCRIPT}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sample_image_paths() -> list[Path]:
    # find_spec, not import: the paths are known without paying for importing Ultralytics.
    spec = importlib.util.find_spec("ultralytics")
    if spec is None or spec.origin is None:
        pytest.skip("ultralytics is not installed")
    assets = Path(spec.origin).parent / "assets"
    paths = [assets / "bus.jpg", assets / "zidane.jpg"]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        pytest.skip(f"Ultralytics sample images missing: {', '.join(map(str, missing))}")
    return paths


@pytest.fixture(scope="session")
def sample_images() -> list[Path]:
    """[bus.jpg (810x1080, portrait), zidane.jpg (1280x720, landscape)]."""
    return sample_image_paths()


@pytest.fixture(scope="session")
def fall_pt() -> Path:
    fetch = load_fetch_module()
    try:
        return Path(fetch.fetch(fetch.DEFAULT_OUT))
    except fetch.FetchError as exc:
        pytest.skip(f"the sample fall model could not be fetched: {exc}")


def build_random_yolov8n(out: Path, calibration_images: list[Path]) -> None:
    """Save a YOLOv8n with seeded random weights that still produces varied detections.

    Straight out of ``YOLO("yolov8n.yaml")`` the network is degenerate for testing: with
    default init and BatchNorm statistics of (0, 1), activations shrink layer by layer, so
    every anchor outputs the same box and a score of about 1e-4 - parity on that tests ties,
    not decoding. Two deterministic adjustments keep it a random network but a lively one:
    BatchNorm statistics are estimated on crops of the sample images (activations keep
    unit scale through the depth), and the head's final convolutions get a class prior of
    -6 (instead of about -11) and 4x box logits (distinct box sizes instead of a flat DFL).
    At conf 0.25 it then finds a few dozen boxes on bus.jpg and none on zidane.jpg.
    """
    import cv2
    import numpy as np
    import torch
    from ultralytics import YOLO

    torch.manual_seed(0)
    yolo = YOLO("yolov8n.yaml")
    net: Any = yolo.model
    rng = np.random.default_rng(0)
    frames: list[Any] = [cv2.imread(str(p)) for p in calibration_images]
    if any(f is None for f in frames):
        raise FileNotFoundError(f"cannot read the calibration images {calibration_images}")
    crops = []
    for k in range(16):
        img = frames[k % len(frames)]
        h, w = img.shape[:2]
        side = int(rng.integers(160, min(h, w)))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = cv2.resize(img[y:y + side, x:x + side], (320, 320))
        crops.append(crop[:, :, ::-1].transpose(2, 0, 1) / 255.0)
    batch = torch.from_numpy(np.stack(crops).astype(np.float32))
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None   # cumulative average: one pass gives the batch's statistics
    net.train()
    with torch.no_grad():
        net(batch)
    net.eval()
    head = net.model[-1]
    with torch.no_grad():
        for branch in head.cv2:
            branch[-1].weight.mul_(4.0)
        for branch in head.cv3:
            branch[-1].bias.fill_(-6.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    yolo.save(str(tmp))
    os.replace(tmp, out)


@pytest.fixture(scope="session")
def yolov8n_pt() -> Path:
    images = sample_image_paths()
    key = _digest("yolov8n-random", RANDOM_YOLOV8N_RECIPE, _versions(),
                  [file_sha256(p) for p in images])
    path = CACHE_DIR / f"yolov8n-random-{key}.pt"
    if not path.is_file():
        build_random_yolov8n(path, images)
    return path


def _norm_imgsz(imgsz: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(imgsz, int):
        return (imgsz, imgsz)
    h, w = imgsz
    return (int(h), int(w))


def _norm_batch(batch: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(batch, int):
        return (batch, batch)
    lo, hi = batch
    return (int(lo), int(hi))


def export_cached(pt: Path, imgsz: int | tuple[int, int] = 320, batch: int | tuple[int, int] = (1, 8),
                  nms: bool = False, *, conf: float = DEFAULT_CONF, iou: float = DEFAULT_IOU,
                  max_det: int = DEFAULT_MAX_DET,
                  simplify: bool = True, dynamic_hw: bool = False) -> Path:
    """Export ``pt`` through streamd-export's pipeline, or reuse an identical earlier export.

    ``batch`` is N for a static batch or (MIN, MAX) for a dynamic one (MIN < MAX).
    ``dynamic_hw`` exports a model that takes any H x W up to ``imgsz`` (the tool's default);
    without it the input is pinned to ``imgsz`` (``--fixed-size``), the models the tests that
    feed ``imgsz``-sized batches were written for.
    """
    from streamd_export import ExportRequest, run_export

    pt = Path(pt)
    hw = _norm_imgsz(imgsz)
    bmin, bmax = _norm_batch(batch)
    dynamic = bmax > bmin
    opts = {"imgsz": hw, "batch": (bmin, bmax), "nms": nms, "simplify": simplify, "dynamic_hw": dynamic_hw}
    if nms:
        opts.update(conf=conf, iou=iou, max_det=max_det)
    # Folder = what was asked for (weights + options) + how it was made (tool source and
    # library versions). A new "how" for the same "what" replaces the old folder below, so
    # editing the export tool does not pile up stale models.
    what = _digest(file_sha256(pt), sorted(opts.items()))
    how = _digest(_source_digest(EXPORT_SRC), _versions())[:8]
    layout = "nms" if nms else "raw"
    size = f"upto{hw[0]}x{hw[1]}" if dynamic_hw else f"{hw[0]}x{hw[1]}"
    name = f"{pt.stem}-{size}-b{bmin}-{bmax}-{layout}"
    exports = CACHE_DIR / "exports"
    folder = exports / f"{name}-{what}-{how}"
    model = folder / f"{name}.onnx"
    if model.is_file() and model.with_name(model.name + ".json").is_file():
        return model
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    request = ExportRequest(weights=pt, imgsz=hw, batch_min=bmin, batch_max=bmax,
                            dynamic_batch=dynamic, dynamic_hw=dynamic_hw, nms=nms, conf=conf, iou=iou,
                            max_det=max_det, simplify=simplify, out_dir=tmp, name=name)
    result = run_export(request)
    # Timings of the export, for whoever wonders what the first test run spent its time on.
    record = {"seconds": round(result.seconds, 2),
              "stages": {k: round(v, 2) for k, v in result.stage_seconds.items()},
              "weights": str(pt), **{k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}}
    (tmp / "export.json").write_text(json.dumps(record, indent=2))
    try:
        os.replace(tmp, folder)
    except OSError:
        if not model.is_file():
            raise
        # Another test process finished the same export first: keep theirs.
        shutil.rmtree(tmp, ignore_errors=True)
    for stale in exports.glob(f"{name}-{what}-*"):
        if stale != folder and ".tmp" not in stale.name:
            shutil.rmtree(stale, ignore_errors=True)
    return model


@pytest.fixture(scope="session")
def exported_model() -> ExportFactory:
    """Factory ``exported_model(pt, imgsz=320, batch=(1, 8), nms=False, *, conf, iou, max_det,
    simplify, dynamic_hw=False) -> Path`` of the exported .onnx (its manifest sits beside it)."""
    return export_cached


@pytest.fixture(scope="session")
def fall_onnx_320(fall_pt: Path, exported_model: ExportFactory) -> Path:
    return exported_model(fall_pt, 320, (1, 8), False)


@pytest.fixture(scope="session")
def yolov8n_onnx_320(yolov8n_pt: Path, exported_model: ExportFactory) -> Path:
    return exported_model(yolov8n_pt, 320, (1, 8), False)


@pytest.fixture(scope="session")
def fall_onnx_640_anyhw(fall_pt: Path, exported_model: ExportFactory) -> Path:
    # 640: the size the checkpoint was trained at, which Ultralytics' default predict uses.
    return exported_model(fall_pt, 640, (1, 8), False, dynamic_hw=True)


@pytest.fixture(scope="session")
def yolov8n_onnx_640_anyhw(yolov8n_pt: Path, exported_model: ExportFactory) -> Path:
    return exported_model(yolov8n_pt, 640, (1, 8), False, dynamic_hw=True)


def bare_copy(onnx: Path, folder: Path, name: str = "model.onnx") -> Path:
    """The ONNX alone, as a workstation hands it over: no manifest beside it."""
    from streamd.manifest import sidecar_path

    folder.mkdir(parents=True, exist_ok=True)
    out = folder / name
    shutil.copyfile(onnx, out)
    assert not sidecar_path(out).exists()
    return out


@pytest.fixture(scope="session")
def sample_pictures_dir(tmp_path_factory: pytest.TempPathFactory, sample_images: list[Path]) -> Path:
    """A folder of the 12 sample pictures the export tool verifies and calibrates with."""
    from streamd_export.samples import write_sample_pictures

    folder = tmp_path_factory.mktemp("pictures")
    assert write_sample_pictures(folder, sample_images) == 12
    return folder


@pytest.fixture(scope="session")
def workstation_onnx(fall_onnx_320: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The FP32 ONNX a workstation exported, copied to the box without its manifest."""
    return bare_copy(fall_onnx_320, tmp_path_factory.mktemp("from-workstation"))
