"""streamd-export: real checkpoints in, ONNX + manifest out, and clear refusals of bad input.

The manifest is checked against the ONNX graph itself and against facts computed here
independently (file hashes, the checkpoint's class names, the anchor count of a YOLOv8
head), never against values the export tool reported about itself.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from streamd_export import PLANS, ExportNotImplemented, ExportRequest, plan_for
from streamd_export.cli import main

from streamd.backends import open_backend
from streamd.manifest import LAYOUT_END2END, LAYOUT_RAW, ModelManifest, sidecar_path

REPO_ROOT = Path(__file__).resolve().parent.parent
STRIDES = (8, 16, 32)        # YOLOv8's three detection levels


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def anchors(h: int, w: int) -> int:
    return sum((h // s) * (w // s) for s in STRIDES)


def checkpoint_names(pt: Path) -> dict[int, str]:
    from ultralytics import YOLO

    return {int(k): str(v) for k, v in YOLO(str(pt)).names.items()}


def graph_dims(value_info: Any) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param
            for d in value_info.type.tensor_type.shape.dim]


# ---------------------------------------------------------------------------------------
# exports of real checkpoints: manifest against graph
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportCase:
    model: str                           # "fall" | "yolov8n"
    imgsz: tuple[int, int]
    batch: int | tuple[int, int]
    nms: bool
    simplify: bool = True
    dynamic_hw: bool = False             # any H x W up to imgsz (the tool's default)

    @property
    def id(self) -> str:
        b = self.batch if isinstance(self.batch, int) else f"{self.batch[0]}-{self.batch[1]}"
        extra = "" if self.simplify else "-nosimplify"
        size = f"{'upto' if self.dynamic_hw else ''}{self.imgsz[0]}x{self.imgsz[1]}"
        return f"{self.model}-{size}-b{b}-{'nms' if self.nms else 'raw'}{extra}"


EXPORT_CASES = [
    ExportCase("fall", (320, 320), (1, 8), False),       # the daemon tests' model
    ExportCase("fall", (320, 320), 4, True),
    ExportCase("yolov8n", (320, 320), (1, 8), False),    # the daemon tests' model
    ExportCase("yolov8n", (320, 320), 2, False, simplify=False),
    ExportCase("yolov8n", (256, 320), (2, 4), True),
    # Any H x W: both batch kinds, with and without NMS or simplification.
    ExportCase("yolov8n", (320, 320), (1, 8), False, dynamic_hw=True),
    ExportCase("yolov8n", (320, 320), 2, True, dynamic_hw=True),
    ExportCase("yolov8n", (256, 320), 1, False, simplify=False, dynamic_hw=True),
    ExportCase("fall", (320, 320), (2, 4), True, dynamic_hw=True),
]
# Smaller inputs of other aspects an any-size model must take (scaled to imgsz below).
RECT_FRACTIONS = ((1.0, 0.6), (0.6, 1.0), (0.5, 0.5))


def rect_sizes(imgsz: tuple[int, int]) -> list[tuple[int, int]]:
    h, w = imgsz
    return sorted({(max(32, int(h * fh) // 32 * 32), max(32, int(w * fw) // 32 * 32))
                   for fh, fw in RECT_FRACTIONS})


@pytest.mark.slow
@pytest.mark.parametrize("case", EXPORT_CASES, ids=[c.id for c in EXPORT_CASES])
def test_manifest_describes_the_exported_graph(case: ExportCase, request: pytest.FixtureRequest,
                                               exported_model: Any) -> None:
    import onnx
    import onnxruntime as ort

    pt: Path = request.getfixturevalue(f"{case.model}_pt")   # only the model this case needs
    path = exported_model(pt, case.imgsz, case.batch, case.nms, conf=0.2, iou=0.6, max_det=100,
                          simplify=case.simplify, dynamic_hw=case.dynamic_hw)
    m = ModelManifest.read(path)
    graph = onnx.load(str(path))
    h, w = case.imgsz
    bmin, bmax = (case.batch, case.batch) if isinstance(case.batch, int) else case.batch
    dynamic = bmax > bmin
    names = checkpoint_names(pt)

    # What the file is.
    assert m.model_file == path.name and m.model_format == "onnx" and m.precision == "fp32"
    assert m.model_sha256 == sha256_of(path)
    assert m.source["weights"] == pt.name and m.source["sha256"] == sha256_of(pt)
    assert m.class_names == names
    assert (m.imgsz, m.batch_min, m.batch_max, m.stride) == ((h, w), bmin, bmax, 32)
    assert m.dynamic_hw is case.dynamic_hw
    opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    assert m.opset == opset

    # Input and outputs as the graph declares them.
    (inp,) = graph.graph.input
    assert m.input_name == inp.name and m.input_dtype == "float32"
    in_dims = graph_dims(inp)
    if case.dynamic_hw:
        assert in_dims[1] == 3 and all(isinstance(d, str) and d for d in in_dims[2:]), in_dims
    else:
        assert in_dims[1:] == [3, h, w]
    assert isinstance(in_dims[0], str) if dynamic else in_dims[0] == bmax
    assert m.output_names == [o.name for o in graph.graph.output]
    out_dims = graph_dims(graph.graph.output[0])
    assert isinstance(out_dims[0], str) if dynamic else out_dims[0] == bmax
    if case.nms:
        assert m.output_layout == LAYOUT_END2END
        assert m.nms == {"conf": 0.2, "iou": 0.6, "max_det": 100}
        assert out_dims[1:] == [100, 6]
    else:
        assert m.output_layout == LAYOUT_RAW and m.nms is None
        # The anchor count follows the input size when that is dynamic.
        assert out_dims[1:] == [4 + len(names), "anchors" if case.dynamic_hw else anchors(h, w)]

    # Ultralytics' own metadata in the graph agrees on the classes.
    meta = {p.key: p.value for p in graph.metadata_props}
    assert ast.literal_eval(meta["names"]) == names   # a dict literal written by Ultralytics

    # Provenance.
    for dist in ("ultralytics", "torch", "onnx", "onnxruntime", "onnxslim"):
        assert m.tools[dist] == metadata.version(dist)
    assert m.tools["streamd"]
    created = datetime.strptime(m.created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert created <= datetime.now(timezone.utc)

    # It runs at both ends of its batch range with the promised output shape, and an
    # any-size model also at smaller sizes of other aspects.
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sizes = [(h, w), *rect_sizes((h, w))] if case.dynamic_hw else [(h, w)]
    for n in sorted({bmin, bmax}):
        for sh, sw in sizes:
            x = np.random.default_rng(n).random((n, 3, sh, sw), dtype=np.float32)
            (y,) = sess.run(None, {m.input_name: x})
            want = [n, 100, 6] if case.nms else [n, 4 + len(names), anchors(sh, sw)]
            assert list(y.shape) == want, (sh, sw)
            assert np.isfinite(y).all()

    # And the daemon's backend accepts it, facts taken from the manifest.
    with open_backend(path, device="cpu", warmup=False) as backend:
        info = backend.info
        assert info.source == "manifest" and info.names == names and info.input_hw == (h, w)
        assert (info.batch_min, info.batch_max, info.output_layout) == (bmin, bmax, m.output_layout)
        assert (info.dynamic_hw, info.stride) == (case.dynamic_hw, 32)


# ---------------------------------------------------------------------------------------
# models that take any H x W
# ---------------------------------------------------------------------------------------
def test_manifest_round_trip_with_and_without_dynamic_hw(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model bytes")
    base = ModelManifest(model_file=model.name, model_sha256=sha256_of(model), model_format="onnx",
                         class_names={0: "Normal", 1: "Fall"}, imgsz=(640, 640), batch_min=1,
                         batch_max=8, output_layout=LAYOUT_RAW)
    assert base.dynamic_hw is False
    for dynamic_hw in (False, True):
        m = ModelManifest(**{**base.__dict__, "dynamic_hw": dynamic_hw})
        m.write(model)
        data = json.loads(sidecar_path(model).read_text())
        assert data["dynamic_hw"] is dynamic_hw
        assert ModelManifest.read(model) == m
    # A manifest written before the key existed describes a fixed-size model.
    data.pop("dynamic_hw")
    sidecar_path(model).write_text(json.dumps(data))
    old = ModelManifest.read(model)
    assert old.dynamic_hw is False and old.imgsz == (640, 640)


@pytest.mark.parametrize(("change", "needle"), [
    ({"dynamic_hw": "yes"}, "dynamic_hw must be true or false, got 'yes'"),
    ({"dynamic_hw": True, "imgsz": [640, 600]}, "imgsz 640x600 of a dynamic_hw model must be multiples "
                                                "of its stride 32"),
    ({"stride": 0}, "stride 0 is invalid"),
])
def test_manifest_refuses_a_bad_dynamic_hw(change: dict[str, Any], needle: str) -> None:
    from streamd.errors import ManifestError

    d = {"model_file": "m.onnx", "model_sha256": "0" * 64, "model_format": "onnx",
         "class_names": {"0": "a"}, "imgsz": [640, 640], "batch_min": 1, "batch_max": 1,
         "output_layout": LAYOUT_RAW, **change}
    with pytest.raises(ManifestError, match=needle):
        ModelManifest.from_dict(d, where="m.onnx.json")


def _cli_export(pt: Path, out_dir: Path, *args: str) -> Path:
    rc = main([str(pt), "--imgsz", "320", "--batch", "1-2", "--out-dir", str(out_dir), *args])
    assert rc == 0
    (path,) = out_dir.glob("*.onnx")
    return path


@pytest.mark.slow
def test_cli_default_takes_any_size_and_fixed_size_pins_it(yolov8n_pt: Path, tmp_path: Path,
                                                           capfd: pytest.CaptureFixture[str]) -> None:
    import onnx

    anyhw = _cli_export(yolov8n_pt, tmp_path / "default")
    out = capfd.readouterr().out
    assert "any H x W up to 320 x 320 (multiples of 32)" in out
    g = onnx.load(str(anyhw), load_external_data=False).graph
    assert graph_dims(g.input[0]) == ["batch", 3, "height", "width"]
    assert graph_dims(g.output[0]) == ["batch", 84, "anchors"]
    m = ModelManifest.read(anyhw)
    assert m.dynamic_hw is True and m.imgsz == (320, 320) and m.stride == 32

    fixed = _cli_export(yolov8n_pt, tmp_path / "fixed", "--fixed-size")
    assert "3 x 320 x 320" in capfd.readouterr().out
    g = onnx.load(str(fixed), load_external_data=False).graph
    assert graph_dims(g.input[0]) == ["batch", 3, 320, 320]
    assert graph_dims(g.output[0]) == ["batch", 84, anchors(320, 320)]
    assert ModelManifest.read(fixed).dynamic_hw is False


@pytest.mark.slow
def test_any_size_model_runs_at_each_cameras_own_size(yolov8n_onnx_640_anyhw: Path) -> None:
    from streamd.pipeline.preprocess import net_shape_for

    # The inputs of a 3:4 portrait camera (bus.jpg's 810x1080), a 16:9 one (zidane.jpg's
    # 1280x720) and a square one, as H x W.
    sizes = [net_shape_for(fw, fh, (640, 640), 32) for fw, fh in ((810, 1080), (1280, 720), (1000, 1000))]
    assert sizes == [(640, 480), (384, 640), (640, 640)]
    with open_backend(yolov8n_onnx_640_anyhw, device="cpu", warmup=False) as backend:
        info = backend.info
        assert (info.dynamic_hw, info.stride, info.input_hw) == (True, 32, (640, 640))
        for h, w in sizes:
            for n in (1, 3):
                x = np.random.default_rng(h + w).random((n, 3, h, w), dtype=np.float32)
                y = backend.infer(x)
                # One anchor per cell of each of the three levels (strides 8, 16, 32).
                assert y.shape == (n, 84, sum((h // s) * (w // s) for s in STRIDES)), (h, w)
                assert np.isfinite(y).all()


@pytest.mark.slow
@pytest.mark.parametrize(("shape", "needle"), [
    ((1, 3, 384, 630), "got (1, 3, 384, 630)"),                 # not a multiple of the stride
    ((1, 3, 650, 640), "got (1, 3, 650, 640)"),                 # not a multiple, and too tall
    ((1, 3, 672, 640), "got (1, 3, 672, 640)"),                 # a multiple, but too tall
    ((2, 3, 384, 704), "got (2, 3, 384, 704)"),                 # too wide
    ((1, 1, 384, 640), "got (1, 1, 384, 640)"),                 # one channel
    ((9, 3, 384, 640), "batch of 9 is outside the model's range 1-8"),
])
def test_any_size_model_refuses_what_it_cannot_take(yolov8n_onnx_640_anyhw: Path, shape: tuple[int, ...],
                                                    needle: str) -> None:
    from streamd.errors import BackendError

    with open_backend(yolov8n_onnx_640_anyhw, device="cpu", warmup=False) as backend:
        with pytest.raises(BackendError) as err:
            backend.infer(np.zeros(shape, np.float32))
    msg = str(err.value)
    assert needle in msg and yolov8n_onnx_640_anyhw.name in msg
    if "batch of" not in needle:
        assert ("expects shape (n, 3, h, w) with h <= 640 and w <= 640, both multiples of the "
                "stride 32") in msg


@pytest.mark.slow
def test_fixed_size_model_still_takes_only_its_size(yolov8n_onnx_320: Path) -> None:
    from streamd.errors import BackendError

    with open_backend(yolov8n_onnx_320, device="cpu", warmup=False) as backend:
        assert backend.info.dynamic_hw is False
        with pytest.raises(BackendError, match=r"expects shape \(n, 3, 320, 320\), got \(1, 3, 192, 320\)"):
            backend.infer(np.zeros((1, 3, 192, 320), np.float32))


@pytest.mark.slow
def test_any_size_is_found_in_the_graph_without_a_manifest(yolov8n_onnx_640_anyhw: Path,
                                                          yolov8n_onnx_320: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare.onnx"
    shutil.copyfile(yolov8n_onnx_640_anyhw, bare)      # no manifest beside it
    with open_backend(bare, device="cpu", warmup=False) as backend:
        info = backend.info
        assert info.source == "onnx-metadata"
        # Symbolic H and W in the graph; the size and stride from Ultralytics' metadata.
        assert (info.dynamic_hw, info.input_hw, info.stride) == (True, (640, 640), 32)
        assert backend.infer(np.zeros((1, 3, 384, 640), np.float32)).shape == (1, 84, anchors(384, 640))
    fixed = tmp_path / "fixed.onnx"
    shutil.copyfile(yolov8n_onnx_320, fixed)
    with open_backend(fixed, device="cpu", warmup=False) as backend:
        assert (backend.info.dynamic_hw, backend.info.input_hw) == (False, (320, 320))


@pytest.mark.slow
def test_manifest_claiming_any_size_for_a_fixed_graph_is_refused(yolov8n_onnx_320: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from streamd.errors import ManifestError

    model = tmp_path / yolov8n_onnx_320.name
    shutil.copyfile(yolov8n_onnx_320, model)
    replace(ModelManifest.read(yolov8n_onnx_320), dynamic_hw=True).write(model)
    with pytest.raises(ManifestError, match=r"manifest says the model takes any H x W up to 320x320, "
                                            r"but the graph's input is \['batch', 3, 320, 320\]"):
        open_backend(model, device="cpu", warmup=False)


@pytest.mark.slow
def test_in_graph_nms_with_any_size_agrees_with_the_raw_head(yolov8n_pt: Path, exported_model: Any,
                                                             sample_images: list[Path]) -> None:
    import cv2

    from streamd.pipeline.postprocess import PostprocessParams, postprocess
    from streamd.pipeline.preprocess import BatchBuffer, net_shape_for

    raw = exported_model(yolov8n_pt, 320, (1, 8), False, dynamic_hw=True)
    e2e = exported_model(yolov8n_pt, 320, 2, True, conf=0.2, iou=0.6, max_det=100, dynamic_hw=True)
    params = PostprocessParams(conf=0.2, iou=0.6, max_det=100)
    total = 0
    with open_backend(raw, device="cpu", warmup=False) as a, open_backend(e2e, device="cpu", warmup=False) as b:
        assert b.info.dynamic_hw and b.info.output_layout == LAYOUT_END2END
        for path in sample_images:
            img = cv2.imread(str(path))
            assert img is not None
            net_h, net_w = net_shape_for(img.shape[1], img.shape[0], (320, 320), 32)
            assert (net_h, net_w) != (320, 320)
            x, boxes = BatchBuffer(1, net_h, net_w, fit=(320, 320)).fill([img])
            (want,) = postprocess(a.infer(x), LAYOUT_RAW, boxes, a.info.names, params)
            y = b.infer(x)
            assert y.shape == (1, 100, 6)
            (got,) = postprocess(y, LAYOUT_END2END, boxes, b.info.names, params)
            assert [d.class_id for d in got] == [d.class_id for d in want]
            np.testing.assert_allclose([d.box for d in got], [d.box for d in want], atol=0.05)
            np.testing.assert_allclose([d.confidence for d in got], [d.confidence for d in want], atol=1e-4)
            total += len(want)
    assert total >= 4, "too few boxes for a meaningful comparison"


# ---------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------
def listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))}


@pytest.mark.slow
def test_cli_export_writes_only_the_model_and_its_manifest(yolov8n_pt: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "weights"
    src.mkdir()
    pt = src / "model.pt"
    shutil.copyfile(yolov8n_pt, pt)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = listing(src)

    rc = main([str(pt), "--imgsz", "320", "--batch", "2", "--nms", "--conf", "0.3", "--iou", "0.5",
               "--max-det", "50", "--out-dir", str(tmp_path / "out"), "--name", "n8"])
    out, err = capfd.readouterr()
    assert rc == 0, err
    assert listing(src) == before, "files appeared beside the weights"
    assert listing(cwd) == {}, "files appeared in the working directory"
    assert sorted(listing(tmp_path / "out")) == ["n8.onnx", "n8.onnx.json"]

    model = tmp_path / "out" / "n8.onnx"
    m = ModelManifest.read(model)
    assert m.nms == {"conf": 0.3, "iou": 0.5, "max_det": 50} and m.batch_min == m.batch_max == 2
    # The summary names the file, its size, the classes, the layout and the time taken.
    size_mb = f"{model.stat().st_size / 1e6:.1f} MB"
    assert str(model) in out and size_mb in out and "80 (" in out and LAYOUT_END2END in out
    assert " s\n" in out or " s " in out
    assert err.strip() == "" or "error" not in err.lower()


@pytest.mark.slow
def test_cli_defaults_to_engines_folder_and_weights_name(yolov8n_pt: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capfd: pytest.CaptureFixture[str]) -> None:
    pt = tmp_path / "tiny.pt"
    shutil.copyfile(yolov8n_pt, pt)
    monkeypatch.chdir(tmp_path)
    assert main([str(pt), "--imgsz", "64"]) == 0, capfd.readouterr().err
    model = tmp_path / "engines" / "tiny.onnx"
    m = ModelManifest.read(model)
    assert (m.imgsz, m.batch_min, m.batch_max, m.output_layout) == ((64, 64), 1, 1, LAYOUT_RAW)
    # A second export replaces the first cleanly (same names, no leftovers).
    assert main([str(pt), "--imgsz", "64", "--batch", "1-3"]) == 0
    assert sorted(listing(tmp_path / "engines")) == ["tiny.onnx", "tiny.onnx.json"]
    m2 = ModelManifest.read(model)
    assert (m2.batch_min, m2.batch_max) == (1, 3)
    m2.check_file(model)


# ---------------------------------------------------------------------------------------
# bad input: one line on stderr, exit status 2, nothing written
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory, yolov8n_pt: Path) -> dict[str, Path]:
    import torch
    from ultralytics import YOLO

    d = tmp_path_factory.mktemp("bad")
    files = {
        "missing": d / "missing.pt",
        "text": d / "notes.pt",
        "truncated": d / "truncated.pt",
        "empty": d / "empty.pt",
        "random": d / "random.pt",
        "directory": d / "folder.pt",
        "tensor": d / "tensor.pt",
        "classify": d / "cls.pt",
        "segment": d / "seg.pt",
    }
    files["text"].write_text("this is not a checkpoint\n")
    data = yolov8n_pt.read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["empty"].write_bytes(b"")
    files["random"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    files["directory"].mkdir()
    torch.save(torch.zeros(3), files["tensor"])
    YOLO("yolov8n-cls.yaml").save(str(files["classify"]))
    YOLO("yolov8n-seg.yaml").save(str(files["segment"]))
    return files


BAD_CASES = {
    "missing": "no such file",
    "text": "text file, not a PyTorch checkpoint",
    "truncated": "truncated or damaged",
    "empty": "is empty",
    "random": "not a PyTorch checkpoint",
    "directory": "is a directory",
    "tensor": "cannot be loaded as an Ultralytics YOLO checkpoint",
    "classify": "classification model",
    "segment": "segmentation model",
}


@pytest.mark.parametrize("kind", sorted(BAD_CASES))
def test_bad_input_is_one_clear_line_and_exit_2(kind: str, bad_inputs: dict[str, Path], tmp_path: Path,
                                                capfd: pytest.CaptureFixture[str]) -> None:
    path = bad_inputs[kind]
    out_dir = tmp_path / "out"
    rc = main([str(path), "--imgsz", "64", "--out-dir", str(out_dir)])
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2
    assert len(lines) == 1, err
    assert lines[0].startswith("streamd-export: error: ") and str(path) in lines[0]
    assert BAD_CASES[kind] in lines[0]
    assert "Traceback" not in err and out == ""
    assert not out_dir.exists()


def test_unimplemented_precisions_say_so(yolov8n_pt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capfd: pytest.CaptureFixture[str]) -> None:
    # Every precision has a plan now; a build without one must still answer clearly.
    precision = "fp16"
    monkeypatch.delitem(PLANS, precision)
    rc = main([str(yolov8n_pt), "--precision", precision, "--out-dir", str(tmp_path / "out")])
    err = capfd.readouterr().err.strip()
    assert rc == 2
    assert err.splitlines() == [f"streamd-export: error: --precision {precision} is not implemented "
                                f"yet in this version (available: fp32, int8)"]
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportNotImplemented):
        plan_for(ExportRequest(weights=yolov8n_pt, precision=precision))


@pytest.mark.parametrize(("args", "needle"), [
    (["--imgsz", "100"], "multiple of the model's stride 32"),
    (["--batch", "4-2"], "need 1 <= MIN <= MAX"),
    (["--batch", "two"], "expected N or MIN-MAX"),
    (["--conf", "0.3"], "only with --nms"),
    (["--nms", "--iou", "0"], "--iou 0.0"),
    (["--nms", "--opset", "10"], "--opset 10"),
    (["--name", "a/b"], "plain file name"),
    (["--imgsz", "1", "2", "3"], "N or H W"),
])
def test_bad_options_exit_2(args: list[str], needle: str, yolov8n_pt: Path, tmp_path: Path,
                            capfd: pytest.CaptureFixture[str]) -> None:
    rc = main([str(yolov8n_pt), *args, "--out-dir", str(tmp_path / "out")])
    err = capfd.readouterr().err
    assert rc == 2
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_plan_has_named_stages() -> None:
    stages = plan_for(ExportRequest(weights=Path("x.pt")))
    assert [s.name for s in stages] == ["preflight", "load", "onnx", "manifest", "verify", "install"]
    assert all(s.description for s in stages)


# ---------------------------------------------------------------------------------------
# import hygiene
# ---------------------------------------------------------------------------------------
def _fresh_python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=REPO_ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_help_and_daemon_modules_do_not_import_torch() -> None:
    code = (
        "import sys, contextlib, io\n"
        "import streamd.manifest, streamd.pipeline.preprocess, streamd.pipeline.postprocess, streamd.backends\n"
        "from streamd.backends import onnxruntime\n"
        "from streamd_export import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    rc = cli.main(['--help'])\n"
        "print(rc, sorted(m for m in ('torch', 'ultralytics', 'onnx') if m in sys.modules))\n"
    )
    assert _fresh_python(code).split("\n")[0] == "0 []"


def test_manifest_written_by_export_is_world_readable(yolov8n_onnx_320: Path) -> None:
    # The daemon may run as another user than the one who exported the model.
    for path in (yolov8n_onnx_320, sidecar_path(yolov8n_onnx_320)):
        assert path.stat().st_mode & 0o044 == 0o044, oct(path.stat().st_mode)
    json.loads(sidecar_path(yolov8n_onnx_320).read_text())
