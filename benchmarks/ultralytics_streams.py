#!/usr/bin/env python3
"""Ultralytics' own multi-stream loop, the reference ``bench.py`` compares streamd with.

``bench.py`` runs this file as a separate process, so that torch, its threads and its memory
never share a process with the other measurements:

    python benchmarks/ultralytics_streams.py export --pt fall-yolov8s.pt --imgsz 320 --out m.onnx
    python benchmarks/ultralytics_streams.py predict --model m.onnx --streams cams.streams \\
        --imgsz 320 --warmup 10 --seconds 40 --deadline 200 --out steps.jsonl

``export`` is Ultralytics' own ``export(format="onnx", dynamic=True, simplify=True)``: batch,
height and width dynamic, which its stream loader needs (it letterboxes 4:3 frames to a
rectangle such as 320x256, which a model with a fixed square input refuses).

``predict`` iterates ``YOLO(model).predict(source=FILE.streams, stream=True)`` and appends one
JSON line per item the loop yields to ``--out`` as it goes: ``{"t": wall time, "n": results
in the item, "img_ms": inference time per image}``, plus a line with the network input size
Ultralytics chose. It stops ``--seconds`` after the warm-up that follows the first
result, or at ``--deadline`` seconds after start whatever happens, or when its standard input
closes (the parent went away). Exit status: 0 done, 2 ultralytics missing, 3 stopped by the
deadline, 4 stdin closed, 1 other failures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streamd.manifest import sha256_file  # noqa: E402  (the daemon's own; no torch needed)

EXIT_NO_ULTRALYTICS = 2
EXIT_DEADLINE = 3
EXIT_PARENT_GONE = 4


def export(pt: Path, imgsz: int, out: Path) -> int:
    from ultralytics import YOLO, __version__

    out.parent.mkdir(parents=True, exist_ok=True)
    # The exporter writes beside the weights; a private copy keeps two sizes (or two
    # benchmark runs) from writing the same file.
    with tempfile.TemporaryDirectory(prefix="ultralytics-export-", dir=out.parent) as tmp:
        work = Path(tmp) / pt.name
        shutil.copyfile(pt, work)
        produced = Path(YOLO(str(work)).export(format="onnx", dynamic=True, simplify=True,
                                               imgsz=imgsz, device="cpu"))
        os.replace(produced, out)
    # What the file was made from, so a cached copy is only reused for the same weights.
    out.with_name(out.name + ".json").write_text(json.dumps(
        {"weights_sha256": sha256_file(pt), "imgsz": imgsz, "ultralytics": __version__}, indent=1) + "\n")
    print(out)
    return 0


def _exit_when(event: str, code: int, out: IO[str] | None) -> None:
    """Leave at once: Ultralytics' stream threads and captures may be blocked in a read,
    and a clean close can then take seconds per camera."""
    if out is not None:
        try:
            out.write(json.dumps({"event": event}) + "\n")
            out.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _watch_parent(out: IO[str]) -> None:
    # The parent never writes; end of file (or an error) means it is gone.
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except (OSError, ValueError):
        pass
    _exit_when("stdin closed", EXIT_PARENT_GONE, out)


def predict(model: Path, streams: Path, imgsz: int, warmup: float, seconds: float,
            deadline: float, out_path: Path) -> int:
    started = time.monotonic()
    out = open(out_path, "a", buffering=1)
    timer = threading.Timer(deadline, _exit_when, args=("deadline", EXIT_DEADLINE, out))
    timer.daemon = True
    timer.start()
    threading.Thread(target=_watch_parent, args=(out,), daemon=True).start()

    from ultralytics import YOLO

    yolo = YOLO(str(model), task="detect")
    stop_at: float | None = None
    first = True
    for item in yolo.predict(source=str(streams), stream=True, imgsz=imgsz, verbose=False):
        now = time.time()
        # Ultralytics 8.x yields one Results per stream in turn (``yield from``); older
        # releases yielded the step's list. Both are counted as results.
        results = item if isinstance(item, list) else [item]
        step: dict[str, Any] = {"t": now, "n": len(results)}
        if results:
            # Ultralytics stores per-image times: the batch's time divided by its size.
            step["img_ms"] = sum(r.speed.get("inference", 0.0) for r in results) / len(results)
        if first:
            first = False
            predictor = yolo.predictor
            if predictor is not None and results:
                # Its own pre-transform on a real frame: the input size it infers at.
                shape = predictor.pre_transform([results[0].orig_img])[0].shape
                out.write(json.dumps({"event": "input", "hw": [int(shape[0]), int(shape[1])],
                                      "startup_s": round(time.monotonic() - started, 2)}) + "\n")
            stop_at = time.monotonic() + warmup + seconds
        out.write(json.dumps(step) + "\n")
        if stop_at is not None and time.monotonic() >= stop_at:
            break
    _exit_when("done", 0, out)
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="Ultralytics' own dynamic ONNX export of a .pt")
    ex.add_argument("--pt", type=Path, required=True)
    ex.add_argument("--imgsz", type=int, required=True)
    ex.add_argument("--out", type=Path, required=True)
    pr = sub.add_parser("predict", help="time Ultralytics' multi-stream predict loop")
    pr.add_argument("--model", type=Path, required=True)
    pr.add_argument("--streams", type=Path, required=True, help="a .streams file, one URL a line")
    pr.add_argument("--imgsz", type=int, required=True)
    pr.add_argument("--warmup", type=float, required=True)
    pr.add_argument("--seconds", type=float, required=True)
    pr.add_argument("--deadline", type=float, required=True, help="hard limit in seconds from start")
    pr.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        import ultralytics  # noqa: F401
    except ImportError as exc:
        print(f"ultralytics is not importable: {exc}", file=sys.stderr)
        return EXIT_NO_ULTRALYTICS
    if args.cmd == "export":
        return export(args.pt.resolve(), args.imgsz, args.out.resolve())
    return predict(args.model, args.streams, args.imgsz, args.warmup, args.seconds, args.deadline, args.out)


if __name__ == "__main__":
    sys.exit(main())
