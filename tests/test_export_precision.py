"""streamd-export --precision fp16 / int8 (both flavours), and --engine on a CPU machine.

Models are built from the real trained Normal/Fall checkpoint and from the random YOLOv8n
at 320, calibrated on a handful of pictures (Ultralytics' samples, their mirror images and
crops). Each result is checked from the outside:

* the file and its manifest (precision, sha256 of the file, of the checkpoint, the FP32
  ONNX it came from, the agreement the tool measured);
* the graph itself (FP16 weights with FP32 input/output; Q/DQ nodes of the flavour's types,
  per-channel weights, the head's decode left in float);
* detections: the converted model runs through streamd's own ONNX Runtime backend and is
  matched against the FP32 model here, with this file's own matching code;
* failures: agreement below --min-agreement exits 1 and installs nothing; --engine without
  TensorRT writes the ONNX and exits 3 with a message naming the step.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from streamd_export.cli import EXIT_NEEDS_GPU, main
from streamd_export.samples import write_sample_pictures

from streamd.backends import open_backend
from streamd.manifest import ModelManifest
from streamd.pipeline.postprocess import PostprocessParams, postprocess
from streamd.pipeline.preprocess import letterbox_batch
from tests.fixtures_daemon import free_tcp_port

IMGSZ = 320
CONF = 0.25
# What the real model must reach against FP32 on the sample pictures (measured: FP16 matches
# every box, INT8 24-27 of 27 with AP50 0.99).
FP16_MIN_MATCHED = 1.0
INT8_MIN_MATCHED = 0.8
FP16_MIN_AP, INT8_MIN_AP = 0.95, 0.85

CASES = {        # key -> extra CLI arguments (a calibration folder is added for int8)
    "fp16": ["--precision", "fp16"],
    "int8": ["--precision", "int8"],
    "int8-cpu": ["--precision", "int8", "--int8-flavour", "cpu"],
}


@dataclass
class Run:
    rc: int
    out: str
    err: str
    out_dir: Path

    def model(self) -> Path:
        (path,) = sorted(self.out_dir.glob("*.onnx"))
        return path

    def manifest(self) -> ModelManifest:
        return ModelManifest.read(self.model())


def export(pt: Path, out_dir: Path, *args: str) -> Run:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(pt), "--imgsz", str(IMGSZ), "--batch", "1-4", "--out-dir", str(out_dir), *args])
    return Run(rc, out.getvalue(), err.getvalue(), out_dir)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def calib_dir(tmp_path_factory: pytest.TempPathFactory, sample_images: list[Path]) -> Path:
    """12 pictures: the two samples, their mirror images, and two crops of each."""
    folder = tmp_path_factory.mktemp("calib")
    assert write_sample_pictures(folder, sample_images) == 12
    return folder


def _runs(pt: Path, tmp: pytest.TempPathFactory, calib: Path, *extra: str) -> dict[str, Run]:
    runs = {}
    for key, args in CASES.items():
        more = ["--calib", str(calib)] if "int8" in args else []
        runs[key] = export(pt, tmp.mktemp(key), *args, *more, *extra)
    return runs


@pytest.fixture(scope="module")
def fall_runs(fall_pt: Path, tmp_path_factory: pytest.TempPathFactory, calib_dir: Path) -> dict[str, Run]:
    return _runs(fall_pt, tmp_path_factory, calib_dir)


@pytest.fixture(scope="module")
def yolov8n_runs(yolov8n_pt: Path, tmp_path_factory: pytest.TempPathFactory, calib_dir: Path) -> dict[str, Run]:
    return _runs(yolov8n_pt, tmp_path_factory, calib_dir, "--min-agreement", "0")


# ---------------------------------------------------------------------------------------
# the installed file and its manifest
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("key", list(CASES))
def test_real_model_precisions_install_with_their_manifest(key: str, fall_runs: dict[str, Run],
                                                           fall_pt: Path, calib_dir: Path) -> None:
    run = fall_runs[key]
    assert run.rc == 0, run.err
    path = run.model()
    m = run.manifest()
    suffix = {"fp16": "-fp16", "int8": "-int8", "int8-cpu": "-int8-cpu"}[key]
    assert path.name == f"{fall_pt.stem}{suffix}.onnx" == m.model_file
    assert m.precision == ("fp16" if key == "fp16" else "int8") and m.model_format == "onnx"
    assert m.model_sha256 == sha256_of(path)
    assert m.source["sha256"] == sha256_of(fall_pt)
    fp32_sha = m.build["fp32_onnx_sha256"]
    assert re.fullmatch(r"[0-9a-f]{64}", fp32_sha) and fp32_sha != m.model_sha256
    assert m.input_dtype == "float32" and m.class_names == {0: "Normal", 1: "Fall"}
    assert (m.imgsz, m.batch_min, m.batch_max) == ((IMGSZ, IMGSZ), 1, 4)
    agreement = m.build["agreement"]
    assert agreement["ap50"] >= (FP16_MIN_AP if key == "fp16" else INT8_MIN_AP), agreement
    assert agreement["matched"] + agreement["missed"] == agreement["reference_boxes"] > 0
    # What the file is meant for: the symmetric flavour is made for TensorRT and OpenVINO, the
    # uint8 one for ONNX Runtime and OpenVINO, FP16 for any backend; OpenVINO is listed when it is
    # installed and its detections agreed as well as ONNX Runtime's had to (they do here).
    by_backend = agreement["ap50_by_backend"]
    assert by_backend["onnxruntime"] == agreement["ap50"]
    have_openvino = importlib.util.find_spec("openvino") is not None
    assert ("openvino" in by_backend) == (key != "fp16" and have_openvino)
    openvino = ["openvino"] if have_openvino else []
    meant = {"fp16": [], "int8": ["tensorrt"] + openvino, "int8-cpu": ["onnxruntime"] + openvino}[key]
    assert m.backends == meant
    assert (f"  for:     {', '.join(meant)} (the manifest's backends)\n" in run.out) == bool(meant)
    if key != "fp16":
        q = m.build["int8"]
        assert q["flavour"] == ("cpu" if key == "int8-cpu" else "tensorrt")
        assert q["calibration_images"] == 12 and q["calibration_source"] == f"folder {calib_dir.name}"
        assert "calibrating: 12/12 images" in run.err
    # The summary names the file and the agreement the tool measured, and tells the input
    # tensor's type (float32 whatever the precision) from how the model computes.
    assert f"wrote {path}" in run.out and "agreement with FP32" in run.out
    assert f"  input:   {m.input_name} float32, batch 1-4 x 3 x" in run.out
    compute = {"fp16": "fp16 (the head's decode in fp32)", "int8": "int8 (Q/DQ, tensorrt flavour)",
               "int8-cpu": "int8 (Q/DQ, cpu flavour)"}[key]
    assert f"  compute: {compute}\n" in run.out


# ---------------------------------------------------------------------------------------
# detections, compared here
# ---------------------------------------------------------------------------------------
def detections(model: Path, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    with open_backend(model, device="cpu", warmup=False) as b:
        x, boxes = letterbox_batch(images, *b.info.input_hw)
        y = b.infer(x)
        dets = postprocess(y, b.info.output_layout, boxes, b.info.names, PostprocessParams(conf=CONF))
    return [(np.array([d.box for d in ds]).reshape(-1, 4), np.array([d.confidence for d in ds]),
             np.array([d.class_id for d in ds])) for ds in dets]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def matched_fraction(ref: list[Any], got: list[Any]) -> tuple[int, int]:
    """FP32 boxes with a same-class partner at IoU >= 0.5 (each partner used once)."""
    found = total = 0
    for (rb, rs, rc), (gb, _, gc) in zip(ref, got):
        free = set(range(len(gb)))
        for i in np.argsort(-rs):
            total += 1
            best = max((j for j in free if gc[j] == rc[i]), key=lambda j: iou(rb[i], gb[j]), default=None)
            if best is not None and iou(rb[i], gb[best]) >= 0.5:
                free.discard(best)
                found += 1
    return found, total


@pytest.fixture(scope="module")
def pictures(sample_images: list[Path]) -> list[np.ndarray]:
    imgs = [cv2.imread(str(p)) for p in sample_images]
    return imgs + [cv2.flip(i, 1) for i in imgs]


@pytest.mark.slow
@pytest.mark.parametrize("key", list(CASES))
def test_real_model_precisions_find_what_fp32_finds(key: str, fall_runs: dict[str, Run], fall_onnx_320: Path,
                                                    pictures: list[np.ndarray]) -> None:
    ref = detections(fall_onnx_320, pictures)
    got = detections(fall_runs[key].model(), pictures)
    found, total = matched_fraction(ref, got)
    assert total >= 8, "the samples should hold enough people to compare"
    need = FP16_MIN_MATCHED if key == "fp16" else INT8_MIN_MATCHED
    assert found / total >= need, f"{key}: {found}/{total} FP32 boxes found"
    extra = sum(len(g[0]) for g in got) - found
    assert extra <= max(2, total // 4), f"{key}: {extra} boxes FP32 does not have"


def agreement_through(backend: str, model: Path, ref_model: Path, images: list[np.ndarray],
                      hw: tuple[int, int] | None = None) -> Any:
    """The export tool's agreement check (AP50 against FP32 as ground truth), with the
    candidate run through streamd's ``backend`` and FP32 through ONNX Runtime, on the
    pictures letterboxed to ``hw`` (default: the models' full input size)."""
    from streamd_export.verify_stage import AP_MIN_SCORE, Dets, agreement

    def dets(path: Path, name: str, conf: float) -> list[Dets]:
        with open_backend(path, name, device="cpu", warmup=False) as b:
            x, boxes = letterbox_batch(images, *(hw or b.info.input_hw))
            out = postprocess(b.infer(x), b.info.output_layout, boxes, b.info.names, PostprocessParams(conf=conf))
        return [Dets(np.array([d.box for d in ds], np.float64).reshape(-1, 4),
                     np.array([d.confidence for d in ds], np.float64),
                     np.array([d.class_id for d in ds], np.int64)) for ds in out]

    return agreement(dets(ref_model, "onnxruntime", CONF), dets(model, backend, AP_MIN_SCORE),
                     {0: "Normal", 1: "Fall"}, CONF)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("key", ["int8", "int8-cpu"])
def test_int8_agrees_with_fp32_on_the_backends_its_manifest_lists(key: str, backend: str,
                                                                  fall_runs: dict[str, Run], fall_onnx_320: Path,
                                                                  pictures: list[np.ndarray]) -> None:
    # Measured here through streamd's own backend, independently of the export's check: a
    # backend the manifest lists reaches the project's INT8 target (0.95), one it leaves out
    # of its flavour's does not reach the export's threshold.
    from streamd.manifest import INT8_FLAVOUR_BACKENDS

    if backend == "openvino":
        pytest.importorskip("openvino", reason="the openvino extra is not installed")
    m = fall_runs[key].manifest()
    flavour = m.build["int8"]["flavour"]
    # ONNX Runtime is the export's gate for every file, so it is held to the target too.
    checked = backend in m.backends or backend == "onnxruntime"
    if not checked and backend not in INT8_FLAVOUR_BACKENDS[flavour]:
        pytest.skip(f"the {flavour} flavour is not made for {backend}")
    a = agreement_through(backend, fall_runs[key].model(), fall_onnx_320, pictures)
    assert a.reference_boxes >= 8, "the samples should hold enough people to compare"
    if checked:
        assert a.ap50 is not None and a.ap50 >= 0.95, f"{key} on {backend}: {a.summary()}"
    else:
        assert a.ap50 is not None and a.ap50 < m.build["agreement"]["min_agreement"], \
            f"{key} on {backend}, left out of {m.backends}: {a.summary()}"


@pytest.mark.slow
@pytest.mark.parametrize("hw", [(256, 320), (320, 192)])
def test_symmetric_int8_of_any_hw_agrees_on_openvino_at_other_aspects(hw: tuple[int, int],
                                                                      fall_runs: dict[str, Run], fall_pt: Path,
                                                                      exported_model: Any,
                                                                      pictures: list[np.ndarray]) -> None:
    # The daemon feeds a model that takes any H x W each camera's own aspect; the export's
    # check sees only the full square size. The anchor grid OpenVINO once got wrong depends on
    # H x W, so the file is held to the target at two other sizes too, against FP32 of the
    # same kind, through streamd's own backends.
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    fp32 = exported_model(fall_pt, IMGSZ, (1, 8), False, dynamic_hw=True)
    for backend in ("openvino", "onnxruntime"):
        a = agreement_through(backend, fall_runs["int8"].model(), fp32, pictures, hw)
        assert a.reference_boxes >= 8 and a.ap50 is not None and a.ap50 >= 0.95, f"{backend} {hw}: {a.summary()}"


# The symmetric file as the export makes it, and with one of its two OpenVINO fixes undone
# (tools/export/int8_graph.py): key -> (extra CLI arguments, FLAVOURS["tensorrt"] change,
# whether the anchor grid is taken from the input's shape).
OPENVINO_CASES = {
    "fixed-size": (["--fixed-size"], {}, True),
    "fixed-size, Concat-fed convs quantized": (["--fixed-size"], {"float_concat_convs": False}, True),
    "any H x W, grid from the feature maps": ([], {}, False),
}


@pytest.fixture(scope="module")
def openvino_int8_runs(fall_pt: Path, tmp_path_factory: pytest.TempPathFactory, calib_dir: Path) -> dict[str, Run]:
    from dataclasses import replace

    from streamd_export import int8_stage

    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    runs = {}
    for key, (args, flavour_change, grid_from_input) in OPENVINO_CASES.items():
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(int8_stage.FLAVOURS, "tensorrt", replace(int8_stage.FLAVOURS["tensorrt"], **flavour_change))
            if not grid_from_input:
                mp.setattr(int8_stage, "anchor_grid_from_input", lambda *a, **k: 0)
            runs[key] = export(fall_pt, tmp_path_factory.mktemp("ov-int8"), "--precision", "int8",
                               "--calib", str(calib_dir), *args)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("key", list(OPENVINO_CASES))
def test_openvino_gate_admits_the_symmetric_file_and_refuses_it_unfixed(key: str, openvino_int8_runs: dict[str, Run],
                                                                        fall_onnx_320: Path,
                                                                        pictures: list[np.ndarray]) -> None:
    # The export's own check lists OpenVINO for the file it makes (the any-H x W file is
    # test_real_model_precisions_install_with_their_manifest's); with either fix undone the
    # file loses its boxes on OpenVINO, and the gate leaves OpenVINO out.
    run = openvino_int8_runs[key]
    assert run.rc == 0, run.err
    m = run.manifest()
    by_backend = m.build["agreement"]["ap50_by_backend"]
    assert m.build["int8"]["flavour"] == "tensorrt" and by_backend["onnxruntime"] >= 0.95, by_backend
    made = key == "fixed-size"
    assert m.backends == (["tensorrt", "openvino"] if made else ["tensorrt"]), (by_backend, run.err)
    assert (by_backend["openvino"] >= 0.95) if made else (by_backend["openvino"] < 0.7), by_backend
    assert ("through openvino: AP50" in run.out) != made
    # Independently of the export: streamd's own OpenVINO backend (dynamic batch, as the daemon
    # runs it) against FP32 on ONNX Runtime, on pictures the file was not calibrated on.
    if m.dynamic_hw:
        return      # fall_onnx_320 is the fixed-size FP32 model
    a = agreement_through("openvino", run.model(), fall_onnx_320, pictures)
    assert a.reference_boxes >= 8 and a.ap50 is not None, a.summary()
    assert (a.ap50 >= 0.95) if made else (a.ap50 < 0.7), a.summary()


# ---------------------------------------------------------------------------------------
# the graphs
# ---------------------------------------------------------------------------------------
DECODE_NODES = ("/model.22/dfl/Softmax", "/model.22/dfl/conv/Conv", "/model.22/Sigmoid", "/model.22/Concat_26")


def _graph(path: Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    import onnx

    g = onnx.load(str(path)).graph
    return g, {t.name: t for t in g.initializer}, {o: n for n in g.node for o in n.output}


@pytest.mark.slow
def test_fp16_graph_is_half_inside_float_at_the_edges(fall_runs: dict[str, Run]) -> None:
    from onnx import TensorProto

    g, inits, prod = _graph(fall_runs["fp16"].model())
    assert g.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert g.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    conv_w = [inits[n.input[1]] for n in g.node if n.op_type == "Conv" and n.input[1] in inits]
    half = [t for t in conv_w if t.data_type == TensorProto.FLOAT16]
    assert len(conv_w) == 64 and len(half) == 63, "all convs but the DFL's in FP16"
    dfl = next(n for n in g.node if n.name == "/model.22/dfl/conv/Conv")
    assert inits[dfl.input[1]].data_type == TensorProto.FLOAT
    # The decode is fed through Casts to float: none of its inputs is produced in FP16.
    types = {vi.name: vi.type.tensor_type.elem_type for vi in g.value_info}
    for name in DECODE_NODES:
        node = next(n for n in g.node if n.name == name)
        for i in node.input:
            if i in types:
                assert types[i] == TensorProto.FLOAT, f"{name} input {i} is not float32"


@pytest.mark.slow
@pytest.mark.parametrize("key", ["int8", "int8-cpu"])
def test_int8_graph_has_qdq_of_its_flavour(key: str, fall_runs: dict[str, Run]) -> None:
    from onnx import TensorProto, numpy_helper

    g, inits, prod = _graph(fall_runs[key].model())
    qs = [n for n in g.node if n.op_type == "QuantizeLinear"]
    dqs = [n for n in g.node if n.op_type == "DequantizeLinear"]
    assert len(qs) > 100 and len(dqs) >= len(qs)
    zero_points = [inits[n.input[2]] for n in qs]
    convs = [n for n in g.node if n.op_type == "Conv" and n.name != "/model.22/dfl/conv/Conv"]
    assert len(convs) == 63
    # The symmetric flavour leaves the convs that read a Concat in float (OpenVINO needs it):
    # the last conv of each C2f block and of the SPPF, the first after each neck concat.

    def source(tensor: str) -> str:      # the op behind a tensor, through any Q/DQ pair
        node = prod.get(tensor)
        while node is not None and node.op_type in ("DequantizeLinear", "QuantizeLinear"):
            node = prod.get(node.input[0])
        return "graph input" if node is None else node.op_type

    float_convs = {c.name for c in convs if source(c.input[0]) == "Concat"}
    assert len(float_convs) == 13
    for conv in convs:
        if conv.name in float_convs:
            if key == "int8":
                # float weights, no Q/DQ pair on them: the conv itself runs in float
                assert conv.input[1] in inits and inits[conv.input[1]].data_type == TensorProto.FLOAT, conv.name
                continue
        x_src, w_src = prod.get(conv.input[0]), prod.get(conv.input[1])
        assert x_src is not None and x_src.op_type == "DequantizeLinear", conv.name
        assert w_src is not None and w_src.op_type == "DequantizeLinear", conv.name
        w_scale = numpy_helper.to_array(inits[w_src.input[1]])
        assert w_scale.size > 1, f"{conv.name}: weights should be quantized per channel"
    if key == "int8":
        # TensorRT's form: symmetric int8 everywhere, float weights behind Q/DQ, float bias.
        assert {t.data_type for t in zero_points} == {TensorProto.INT8}
        assert all(not numpy_helper.to_array(t).any() for t in zero_points)
        assert all(n.input[0] not in inits for n in dqs), "weights stay float behind a Q/DQ pair"
        for conv in convs:
            if len(conv.input) > 2:
                assert conv.input[2] in inits and inits[conv.input[2]].data_type == TensorProto.FLOAT
    else:
        # ONNX Runtime CPU's fast form: uint8 activations, int8 weights stored quantized.
        assert {t.data_type for t in zero_points} == {TensorProto.UINT8}
        stored = {inits[n.input[0]].data_type for n in dqs if n.input[0] in inits}
        assert TensorProto.INT8 in stored
    # The head's decode is never fed by a dequantized tensor.
    for name in DECODE_NODES:
        node = next(n for n in g.node if n.name == name)
        assert all(prod[i].op_type != "DequantizeLinear" for i in node.input if i in prod), name


# ---------------------------------------------------------------------------------------
# the random YOLOv8n: it runs, and verification reports numbers
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("key", list(CASES))
def test_random_model_precisions_run_and_report(key: str, yolov8n_runs: dict[str, Run]) -> None:
    import onnxruntime as ort

    run = yolov8n_runs[key]
    assert run.rc == 0, run.err
    m = run.manifest()
    a = m.build["agreement"]
    assert a["images"] == (4 if key == "fp16" else 12)
    assert isinstance(a["ap50"], float) and 0.0 <= a["ap50"] <= 1.0
    assert a["reference_boxes"] > 0 and 0.0 <= a["mean_iou"] <= 1.0 and a["min_agreement"] == 0.0
    sess = ort.InferenceSession(str(run.model()), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).random((2, 3, IMGSZ, IMGSZ), dtype=np.float32)
    (y,) = sess.run(None, {"images": x})
    assert y.shape == (2, 84, 2100) and y.dtype == np.float32 and np.isfinite(y).all()
    assert "agreement with FP32 on" in run.err


# ---------------------------------------------------------------------------------------
# failures
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_agreement_below_the_threshold_fails_and_installs_nothing(fall_pt: Path, tmp_path: Path,
                                                                  calib_dir: Path) -> None:
    out_dir = tmp_path / "out"
    # One calibration picture, checked on all twelve: measured AP50 0.95, far from 0.999.
    run = export(fall_pt, out_dir, "--precision", "int8", "--calib", str(calib_dir), "--calib-count", "1",
                 "--verify-images", str(calib_dir), "--min-agreement", "0.999")
    assert run.rc == 1, run.err
    (line,) = [ln for ln in run.err.splitlines() if "error:" in ln]
    m = re.search(r"agreement with FP32 \(AP50\) is ([0-9.]+), below --min-agreement 0.999", line)
    assert m is not None, line
    assert float(m.group(1)) < 0.999
    assert "the model was not installed" in line and "calibration images" in line
    assert not out_dir.exists() or not any(out_dir.iterdir())


@pytest.mark.slow
def test_engine_without_tensorrt_writes_the_onnx_and_names_the_step(yolov8n_pt: Path, tmp_path: Path) -> None:
    from streamd.backends.tensorrt.probe import tensorrt_version

    if tensorrt_version() is not None:
        pytest.skip("TensorRT is installed here: --engine would build (tests/test_tensorrt_gpu.py)")
    out_dir = tmp_path / "out"
    run = export(yolov8n_pt, out_dir, "--precision", "fp16", "--engine", "--min-agreement", "0")
    assert run.rc == EXIT_NEEDS_GPU == 3
    (line,) = [ln for ln in run.err.splitlines() if "error:" in ln]
    onnx = out_dir / f"{yolov8n_pt.stem}-fp16.onnx"
    assert f"wrote {onnx} and its manifest" in line
    assert "the 'engine' step (TensorRT build) needs TensorRT, which is not installed here" in line
    assert "Traceback" not in run.err
    assert ModelManifest.read(onnx).precision == "fp16"
    assert sorted(p.name for p in out_dir.iterdir()) == [onnx.name, onnx.name + ".json"]


@pytest.mark.slow
def test_calibration_from_camera_config_hides_credentials(yolov8n_pt: Path, tmp_path: Path,
                                                          test_media: Any) -> None:
    secret = "Calib-S3cret!"
    port = free_tcp_port()      # nothing listens there: the camera is unreachable
    cfg = {"model": {"path": "unused.onnx"},
           "cameras": [{"id": "bus", "url": str(test_media["bus"].mp4)},
                       {"id": "pitch", "url": str(test_media["zidane"].mp4)},
                       {"id": "door", "url": f"rtsp://127.0.0.1:{port}/live", "username": "admin",
                        "password": secret}]}
    config = tmp_path / "streamd.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = export(yolov8n_pt, tmp_path / "out", "--precision", "int8", "--int8-flavour", "cpu",
                 "--calib-from", str(config), "--calib-count", "6", "--min-agreement", "0")
    assert run.rc == 0, run.err
    q = run.manifest().build["int8"]
    # Two frames from each of the two files; the unreachable camera gives none.
    assert q["calibration_images"] == 4 and q["calibration_source"] == "2 camera(s) of streamd.yaml"
    assert run.manifest().backends[0] == "onnxruntime"
    assert "camera door (rtsp://" in run.err and "could not be opened" in run.err
    everything = run.out + run.err + run.manifest().to_json()
    assert secret not in everything and "admin:" not in everything


@pytest.mark.parametrize(("args", "needle"), [
    (["--precision", "int8"], "needs calibration images"),
    (["--precision", "fp16", "--calib", "x"], "--calib only apply with --precision int8"),
    (["--precision", "int8", "--calib", "x", "--calib-from", "y"], "give one source"),
    (["--precision", "int8", "--calib", "x", "--int8-flavour", "cpu", "--engine"], "TensorRT does not take"),
    (["--precision", "fp16", "--min-agreement", "1.5"], "--min-agreement 1.5: must be in [0, 1]"),
    (["--precision", "int8", "--calib", "x", "--calib-count", "0"], "--calib-count 0"),
    (["--timing-cache", "t.cache"], "--timing-cache only applies with --engine"),
    (["--engine", "--workspace-mb", "8"], "--workspace-mb 8"),
    (["--precision", "int8", "--calib", "/nonexistent/calib"], "--calib /nonexistent/calib: no such folder"),
])
def test_bad_precision_options_exit_2(args: list[str], needle: str, yolov8n_pt: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    run = export(yolov8n_pt, out_dir, *args)
    assert run.rc == 2, run.err
    assert needle in run.err and "Traceback" not in run.err
    assert not out_dir.exists()


def test_empty_calibration_folder_exits_2(yolov8n_pt: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no pictures here")
    run = export(yolov8n_pt, tmp_path / "out", "--precision", "int8", "--calib", str(empty))
    assert run.rc == 2 and f"--calib {empty}: holds no images" in run.err
