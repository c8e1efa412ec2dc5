"""Runs streamd-export's FP16 or INT8 plan on an ONNX model, without torch: a script run by
tests/test_edge_venv.py with the Python of a venv that has only ``streamd[engine-tools]``.

``streamd-export MODEL.onnx --precision fp16`` is refused (stages.plan_for: FP16 and INT8 are
made from the ``.pt``), so this script takes the plan that precision has for a checkpoint and
runs it with the two stages that need torch and Ultralytics (``load``, ``onnx``) replaced by
what they leave in the context, read from the ONNX itself; every other stage is the tool's own
(``inputs``, ``calibrate``, ``fp16`` / ``int8``, ``agreement``, ``manifest``, ``verify``,
``install``, ``engine``).

    python -I edge_export_stages.py MODEL.onnx STREAMD-EXPORT-OPTIONS...

Prints one JSON line (the stages run, the installed model and its manifest) and exits like
streamd-export: 0, or 3 with its message when the ``engine`` step needs TensorRT.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

from streamd_export.cli import EXIT_NEEDS_GPU, PROG, build_parser, request_from_args
from streamd_export.engine_stage import EngineUnavailable
from streamd_export.onnx_input import onnx_manifest
from streamd_export.stages import ExportContext, plan_for

# The stages of a checkpoint's plan that load it with Ultralytics and export it with torch.
TORCH_STAGES = ("load", "onnx")
# A YOLOv8 detection head's levels (P3-P5). The verify stage counts the model's anchors with
# them, against the graph's own output, so a model with other strides fails there, not here.
YOLOV8_STRIDES = (8, 16, 32)


def main(argv: list[str]) -> int:
    parser = build_parser()
    request = request_from_args(parser.parse_args(argv), parser)
    onnx = request.weights
    manifest, _ = onnx_manifest(onnx)
    # The request as for the checkpoint this ONNX was exported from, with the ONNX's own size
    # and batch: the plan of its precision is then the one streamd-export runs for a .pt.
    request = dataclasses.replace(
        request, weights=onnx.with_suffix(".pt"), imgsz=manifest.imgsz, batch_min=manifest.batch_min,
        batch_max=manifest.batch_max, dynamic_batch=manifest.batch_max > manifest.batch_min,
        dynamic_hw=manifest.dynamic_hw)
    plan = plan_for(request)
    workdir = Path(tempfile.mkdtemp(prefix="streamd-export-"))
    ctx = ExportContext(request=request, workdir=workdir, precision="fp32")
    # What "load" and "onnx" leave in the context.
    ctx.class_names = dict(manifest.class_names)
    ctx.strides = YOLOV8_STRIDES
    ctx.source = {"onnx": onnx.name, "sha256": manifest.model_sha256}
    ctx.model_path, ctx.opset = onnx, manifest.opset
    ctx.input_name, ctx.output_names = manifest.input_name, list(manifest.output_names)
    done: list[str] = []
    code = 0
    try:
        for stage in plan:
            if stage.name not in TORCH_STAGES:
                stage.run(ctx)
                done.append(stage.name)
    except EngineUnavailable as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        code = EXIT_NEEDS_GPU
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({"plan": [s.name for s in plan], "ran": done,
                      "installed": str(ctx.installed_path), "manifest": str(ctx.manifest_path)}))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
