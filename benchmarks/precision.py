#!/usr/bin/env python3
"""FP32 vs FP16 vs INT8 (both flavours) on the CPU, through ONNX Runtime.

    .venv/bin/python benchmarks/precision.py                 # the Normal/Fall model at 320
    .venv/bin/python benchmarks/precision.py --pt yolov8s.pt --imgsz 640 --calib frames/ --record

Each model is made by streamd-export (so the numbers are those of the files users get) and
compared with the FP32 model on the same pictures by the export tool's own agreement check:
AP50 treating FP32 as ground truth, boxes matched at IoU 0.5. Speed is ms per image with
ONNX Runtime's CPU provider at batch 1 and 4 (median of the timed runs, all cores).
``--record`` appends the table to benchmarks/RESULTS.md under "## CPU precision".
``--openvino`` also prints each INT8 model's AP50 through OpenVINO (CPU, as streamd's
OpenVINO backend runs it), on the same pictures, whichever backends its manifest lists.
Without ``--calib``, calibration and verification use Ultralytics' two sample pictures,
their mirror images and crops (12 pictures): enough to compare precisions, too few to
calibrate a model for real cameras.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "RESULTS.md"
HEADING = "## CPU precision"
TABLE_HEAD = ("| date | CPU | model | imgsz | precision | size MB | ms/img b1 | ms/img b4 | AP50 vs FP32 | "
              "boxes matched | mean IoU | verified on |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
VARIANTS = {            # label -> streamd-export options
    "fp32": {"precision": "fp32"},
    "fp16": {"precision": "fp16"},
    "int8 (tensorrt)": {"precision": "int8", "int8_flavour": "tensorrt"},
    "int8 (cpu)": {"precision": "int8", "int8_flavour": "cpu"},
}


@dataclass
class Row:
    label: str
    path: Path
    size_mb: float
    ms_b1: float
    ms_b4: float
    ap50: float | None
    matched: str
    mean_iou: float | None
    ap50_openvino: float | None = None


def sample_pictures(folder: Path) -> Path:
    """12 pictures from Ultralytics' samples: each, its mirror image, two crops of each."""
    from streamd_export.samples import write_sample_pictures

    if not write_sample_pictures(folder):
        raise SystemExit("give --calib DIR (Ultralytics' sample pictures are not installed)")
    return folder


def default_pt() -> Path:
    spec = importlib.util.spec_from_file_location("fetch_sample_model", REPO / "tools" / "fetch_sample_model.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return Path(mod.fetch(mod.DEFAULT_OUT))


def ms_per_image(model: Path, imgsz: int, batch: int, runs: int, threads: int) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).random((batch, 3, imgsz, imgsz), dtype=np.float32)
    for _ in range(2):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times) / batch


def ap50_through_openvino(model: Path, reference: Path, pictures: Path, imgsz: int) -> float | None:
    """AP50 of ``model`` through OpenVINO against ``reference`` (FP32) through ONNX Runtime,
    by the export tool's own detection and matching code."""
    from streamd.manifest import ModelManifest
    from streamd_export.int8_stage import samples_from_folder
    from streamd_export.stages import DEFAULT_CONF
    from streamd_export.verify_stage import AP_MIN_SCORE, agreement, detect

    m = ModelManifest.read(model)
    samples = samples_from_folder(pictures, 200, (imgsz, imgsz), "--calib")
    kw = {"layout": m.output_layout, "names": m.class_names, "batch_max": m.batch_max, "static_batch": False}
    refs = detect(reference, samples, min_score=DEFAULT_CONF, **kw)
    cands = detect(model, samples, min_score=AP_MIN_SCORE, backend="openvino", **kw)
    return agreement(refs, cands, m.class_names, DEFAULT_CONF).ap50


def build(pt: Path, label: str, imgsz: int, calib: Path, out_dir: Path) -> tuple[Path, dict[str, object]]:
    from streamd_export import ExportRequest, run_export

    opts = dict(VARIANTS[label])
    if opts["precision"] == "int8":
        opts.update(calib=calib, calib_count=64)
    if opts["precision"] != "fp32":
        # Agreement is measured on the same pictures for every precision.
        opts.update(verify_images=calib, min_agreement=0.0)
    name = f"{pt.stem}-{imgsz}-" + label.replace(" (", "-").replace(")", "")
    result = run_export(ExportRequest(weights=pt, imgsz=(imgsz, imgsz), batch_min=1, batch_max=4,
                                      dynamic_batch=True, out_dir=out_dir, name=name, **opts))  # type: ignore[arg-type]
    return result.model_path, dict(result.manifest.build.get("agreement", {}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pt", type=Path, help="YOLOv8 checkpoint (default: the Normal/Fall sample model)")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--calib", type=Path, help="calibration and verification pictures (default: samples)")
    ap.add_argument("--runs", type=int, default=20, help="timed runs per batch size")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: all cores)")
    ap.add_argument("--record", action="store_true", help=f"append the table to {RESULTS.relative_to(REPO)}")
    ap.add_argument("--openvino", action="store_true", help="also the INT8 models' AP50 through OpenVINO")
    args = ap.parse_args()

    pt = args.pt or default_pt()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="streamd-precision-") as tmp:
        work = Path(tmp)
        calib = args.calib or sample_pictures(Path(tempfile.mkdtemp(dir=work)))
        where = args.calib.name if args.calib else "12 sample pictures"
        for label in VARIANTS:
            print(f"[{label}] exporting …", file=sys.stderr, flush=True)
            path, agreement = build(pt, label, args.imgsz, calib, work / "models")
            print(f"[{label}] timing …", file=sys.stderr, flush=True)
            b1 = ms_per_image(path, args.imgsz, 1, args.runs, args.threads)
            b4 = ms_per_image(path, args.imgsz, 4, max(args.runs // 2, 3), args.threads)
            ref = agreement.get("reference_boxes")
            rows.append(Row(label, path, path.stat().st_size / 1e6, b1, b4,
                            agreement.get("ap50") if agreement else None,  # type: ignore[arg-type]
                            f"{agreement['matched']}/{ref}" if agreement else "-",
                            agreement.get("mean_iou") if agreement else None))  # type: ignore[arg-type]
            if args.openvino and label.startswith("int8"):
                print(f"[{label}] through OpenVINO …", file=sys.stderr, flush=True)
                rows[-1].ap50_openvino = ap50_through_openvino(path, rows[0].path, calib, args.imgsz)

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    import onnxruntime as ort
    print(f"\n{pt.name} at {args.imgsz}, ONNX Runtime {ort.__version__} CPU, {os.cpu_count()} x {cpu}")
    print(f"{'precision':<16} {'MB':>6} {'ms/img b1':>10} {'ms/img b4':>10} {'AP50':>6} {'matched':>8} {'IoU':>6}")
    base = rows[0]
    for r in rows:
        ap50 = "ref" if r is base else (f"{r.ap50:.3f}" if r.ap50 is not None else "n/a")
        iou = "ref" if r is base else (f"{r.mean_iou:.3f}" if r.mean_iou is not None else "n/a")
        ov = f"   AP50 through OpenVINO {r.ap50_openvino:.3f}" if r.ap50_openvino is not None else ""
        print(f"{r.label:<16} {r.size_mb:>6.1f} {r.ms_b1:>10.1f} {r.ms_b4:>10.1f} {ap50:>6} "
              f"{'ref' if r is base else r.matched:>8} {iou:>6}{ov}")
    if args.record:
        text = RESULTS.read_text() if RESULTS.exists() else ""
        headings = [ln for ln in text.splitlines() if ln.startswith("## ")]
        block = ""
        if not headings or headings[-1].strip() != HEADING:
            block += ("\n" if text and not text.endswith("\n\n") else "") + f"{HEADING}\n\n" \
                     "Made by `benchmarks/precision.py --record`: ONNX Runtime CPU, agreement with the " \
                     "FP32 model by streamd-export's verify step.\n\n" + TABLE_HEAD
        date = time.strftime("%Y-%m-%d")
        for r in rows:
            ap50 = "ref" if r is base else (f"{r.ap50:.3f}" if r.ap50 is not None else "n/a")
            iou = "ref" if r is base else (f"{r.mean_iou:.3f}" if r.mean_iou is not None else "n/a")
            block += (f"| {date} | {os.cpu_count()} x {cpu} | {pt.name} | {args.imgsz} | {r.label} | "
                      f"{r.size_mb:.1f} | {r.ms_b1:.1f} | {r.ms_b4:.1f} | {ap50} | "
                      f"{'ref' if r is base else r.matched} | {iou} | {where} |\n")
        with open(RESULTS, "a") as f:
            f.write(block)
        print(f"recorded in {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
