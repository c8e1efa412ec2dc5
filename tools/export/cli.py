"""``streamd-export``: turn a YOLOv8 ``.pt`` into a model file plus manifest for streamd.

Exit status: 0 on success; 2 for a problem with the input or options (bad weights file,
wrong model kind, impossible size, a precision not implemented yet); 1 when an export that
should have worked failed on the way (exporter or verification failure, FP16/INT8 agreement
below --min-agreement); 3 when --engine was asked on a machine without TensorRT or an
NVIDIA GPU (the ONNX model was still written).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from streamd.errors import ExportError, StreamdError
from streamd.manifest import ModelManifest
from streamd.thresholds import DEFAULT_CONF, DEFAULT_IOU, DEFAULT_MAX_DET

from .engine_stage import EngineUnavailable, add_precision_arguments, precision_options
from .stages import ExportInputError, ExportRequest, ExportResult, run_export

PROG = "streamd-export"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_NEEDS_GPU = 3    # --engine on a machine without TensorRT or an NVIDIA GPU (ONNX written)


def _imgsz(values: list[str], parser: argparse.ArgumentParser) -> tuple[int, int]:
    if len(values) not in (1, 2):
        parser.error(f"--imgsz takes N or H W, got {len(values)} values")
    try:
        sizes = [int(v) for v in values]
    except ValueError:
        parser.error(f"--imgsz {' '.join(values)}: sizes must be integers")
    if min(sizes) <= 0:
        parser.error(f"--imgsz {' '.join(values)}: sizes must be positive")
    return (sizes[0], sizes[-1])


def parse_batch(text: str) -> tuple[int, int, bool]:
    """``"4"`` -> static 4; ``"1-16"`` -> dynamic 1..16. Returns (min, max, dynamic)."""
    parts = text.split("-")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--batch {text}: expected N or MIN-MAX (e.g. 4 or 1-16)") from None
    if len(values) == 1:
        lo = hi = values[0]
    elif len(values) == 2:
        lo, hi = values
    else:
        raise ValueError(f"--batch {text}: expected N or MIN-MAX (e.g. 4 or 1-16)")
    if lo < 1 or hi < lo:
        raise ValueError(f"--batch {text}: need 1 <= MIN <= MAX")
    # "4-4" is a static batch of 4: a dynamic axis that can only be 4 buys nothing.
    return lo, hi, hi > lo


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Export a YOLOv8 detection checkpoint (.pt) for streamd: writes "
                    "OUT_DIR/NAME.onnx and its manifest OUT_DIR/NAME.onnx.json.",
        epilog="examples:\n"
               "  streamd-export yolov8s.pt --imgsz 640 --batch 1-8\n"
               "  streamd-export fall.pt --imgsz 384 640 --batch 4 --fixed-size --nms --conf 0.3 "
               "--name fall-nms",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", metavar="MODEL.pt", type=Path, nargs="?",
                   help="Ultralytics YOLOv8 detection checkpoint, or an ONNX of one (MODEL.onnx: taken as it "
                        "is, with its manifest or one derived from the graph, or converted by --precision "
                        "fp16/int8; no torch needed)")
    p.add_argument("--adopt-engine", type=Path, metavar="ENGINE",
                   help="write the manifest of an engine built elsewhere (trtexec) from the ONNX it was "
                        "built from (--onnx); needs TensorRT and the GPU it was built for")
    p.add_argument("--onnx", type=Path, metavar="MODEL.onnx", help="with --adopt-engine: the engine's ONNX")
    p.add_argument("--imgsz", nargs="+", metavar="N", default=None,
                   help="network input: N for N x N, or H W (multiples of the stride, 32); the "
                        "largest input unless --fixed-size; default 640")
    p.add_argument("--fixed-size", action="store_true",
                   help="pin the input to exactly --imgsz (default: any H x W that are multiples "
                        "of the stride up to --imgsz, so a 16:9 camera runs at 640x384)")
    p.add_argument("--batch", default=None, metavar="N|MIN-MAX",
                   help="N for a static batch of N, MIN-MAX for a dynamic batch axis; default 1")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: Ultralytics' choice)")
    p.add_argument("--simplify", action=argparse.BooleanOptionalAction, default=True,
                   help="simplify the graph with onnxslim (default: on)")
    p.add_argument("--nms", action="store_true",
                   help="put NMS in the graph: output (batch, max_det, 6) instead of the raw head")
    p.add_argument("--conf", type=float, default=None,
                   help=f"with --nms: score threshold baked into the graph (default {DEFAULT_CONF}); a "
                        f"lower model.conf in the daemon's config has no effect")
    p.add_argument("--iou", type=float, default=None, help=f"with --nms: NMS IoU threshold (default {DEFAULT_IOU})")
    p.add_argument("--max-det", type=int, default=None,
                   help=f"with --nms: detections kept per image (default {DEFAULT_MAX_DET})")
    p.add_argument("--out-dir", type=Path, default=Path("engines"), help="output folder (default: engines/)")
    p.add_argument("--name", default=None, help="output base name (default: the weights' file stem)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8"),
                   help="numeric precision; fp16/int8 are checked against fp32 before install "
                        "and named NAME-fp16 / NAME-int8 unless --name is given")
    p.add_argument("--input", default="float", choices=("float", "uint8"),
                   help="what the model takes: float (N x 3 x H x W RGB in [0, 1], made on the host; "
                        "default) or uint8 (the letterboxed N x H x W x 3 BGR bytes as they are: the "
                        "channel swap, transpose and /255 run as the graph's first nodes, so the daemon "
                        "skips its float pass and a GPU gets 1 byte per pixel instead of 4); named "
                        "NAME-uint8 unless --name is given; works with every precision and MODEL.onnx")
    add_precision_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show the exporter's own log, and tracebacks on failure")
    return p


def request_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ExportRequest:
    if args.weights is None:
        parser.error("give MODEL.pt (or MODEL.onnx), or --adopt-engine ENGINE --onnx MODEL.onnx")
    imgsz = _imgsz(args.imgsz or ["640"], parser)
    try:
        bmin, bmax, dynamic = parse_batch(args.batch or "1")
    except ValueError as exc:
        parser.error(str(exc))
    nms_opts = {k: v for k, v in (("conf", args.conf), ("iou", args.iou), ("max_det", args.max_det))
                if v is not None}
    if nms_opts and not args.nms:
        flags = ", ".join("--" + k.replace("_", "-") for k in nms_opts)
        verb = "applies" if len(nms_opts) == 1 else "apply"
        parser.error(f"{flags} {verb} only with --nms (without it, thresholds are set in the "
                     f"streamd config at run time)")
    return ExportRequest(weights=args.weights, imgsz=imgsz, batch_min=bmin, batch_max=bmax,
                         dynamic_batch=dynamic, dynamic_hw=not args.fixed_size, opset=args.opset, simplify=args.simplify,
                         nms=args.nms, out_dir=args.out_dir, name=args.name,
                         precision=args.precision, input=args.input, verbose=args.verbose, **nms_opts,
                         imgsz_given=args.imgsz is not None, batch_given=args.batch is not None,
                         **precision_options(args))


def _precision(m: ModelManifest) -> str:
    if m.precision == "fp16":
        return "fp16 (the head's decode in fp32)"
    if m.precision == "int8":
        flavour = m.build.get("int8", {}).get("flavour")
        return f"int8 (Q/DQ, {flavour} flavour)" if flavour else "int8 (Q/DQ)"
    return m.precision


def _summary(result: ExportResult) -> str:
    m = result.manifest
    h, w = m.imgsz
    batch = f"{m.batch_min}-{m.batch_max}" if m.batch_min != m.batch_max else str(m.batch_max)
    names = ", ".join(m.class_names[k] for k in sorted(m.class_names)[:6])
    if len(m.class_names) > 6:
        names += ", …"
    size = (f"any H x W up to {h} x {w} (multiples of {m.stride})" if m.dynamic_hw
            else f"{h} x {w}")
    channels_size = f"{size} x 3" if m.input_contract().raw else f"3 x {size}"
    nms = ""
    if m.nms:
        nms = f" (conf {m.nms['conf']}, iou {m.nms['iou']}, max_det {m.nms['max_det']})"
    lines = [
        f"{PROG}: wrote {result.model_path} ({result.size_bytes / 1e6:.1f} MB) "
        f"and {result.manifest_path.name} in {result.seconds:.1f} s",
        f"  classes: {len(m.class_names)} ({names})",
        # The input tensor's own type (verify checked it against the graph): an FP16 or
        # INT8 model still takes float32 pictures, its precision is how it computes inside.
        f"  input:   {m.input_name} {m.input_contract().describe() if m.input_contract().raw else m.input_dtype}, batch {batch} x {channels_size}, "
        f"opset {m.opset}",
        f"  compute: {_precision(m)}",
        f"  output:  {', '.join(m.output_names)}, layout {m.output_layout}{nms}",
    ]
    if m.backends:
        lines.append(f"  for:     {', '.join(m.backends)} (the manifest's backends)")
    lines += [f"  note:    {n}" for n in result.notes]
    return "\n".join(lines)


def _adopt_engine(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .adopt_engine import adopt_engine

    if args.onnx is None or args.weights is not None:
        parser.error("--adopt-engine ENGINE takes --onnx MODEL.onnx (the ONNX it was built from) and no MODEL")
    path = adopt_engine(args.adopt_engine, args.onnx)
    print(f"{PROG}: wrote {path}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    verbose = False
    try:
        # argparse reports usage errors (and --help) by raising SystemExit; it becomes the
        # return value so callers always get an exit status back.
        args = parser.parse_args(argv)
        verbose = bool(args.verbose)
        if args.adopt_engine is not None:
            return _adopt_engine(args, parser)
        request = request_from_args(args, parser)
        result = run_export(request)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except ExportInputError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except EngineUnavailable as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_NEEDS_GPU
    except (ExportError, StreamdError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug here or in a dependency: say so in one line
        if verbose:
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        hint = "" if verbose else " (run with --verbose for the traceback)"
        print(f"{PROG}: error: unexpected {type(exc).__name__}: {first[:300]}{hint}", file=sys.stderr)
        return EXIT_FAILED
    print(_summary(result))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
