#!/usr/bin/env python3
"""Tracker cost per frame: one camera's ByteTrack (streamd.pipeline.tracking) with N objects.

N people walk straight lines at different speeds through a 1920x1080 frame, some crossing;
each frame's detections (jittered by a pixel, as a detector's are) go through
``CameraTracker.update`` at 10 frames/s of capture time. Prints the cost per frame
(p50/p90/mean) and how many ids were handed out (N when no track broke). With ``--stage``
it measures what the output stage pays per frame instead: the tracker and the object events
(zones, best frame kept), through ``streamd.pipeline.output.objects.TrackedObjects``.

    .venv/bin/python benchmarks/bench_tracking.py [--objects 20] [--frames 600] [--stage]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamd.config import parse_config  # noqa: E402
from streamd.entities import Detection, Frame, FrameResult  # noqa: E402
from streamd.pipeline.output.objects import TrackedObjects  # noqa: E402
from streamd.pipeline.tracking import CameraTracker  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=20)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--fps", type=float, default=10.0)
    ap.add_argument("--stage", action="store_true", help="tracker + object events, as the output stage runs them")
    args = ap.parse_args(argv)
    cfg = parse_config("model: {path: m.onnx}\ntracking: {tracker: bytetrack}\n"
                       "cameras: [{id: bench, url: rtsp://127.0.0.1/b,"
                       " zones: {left: [[0, 0], [960, 0], [960, 1080], [0, 1080]]}}]\n", check_files=False)
    tracker = CameraTracker("bench", cfg.tracking_for("bench"))
    objects = TrackedObjects(cfg)
    image = np.zeros((1080, 1920, 3), np.uint8)
    rng = np.random.default_rng(0)
    n = args.objects
    start = np.column_stack([rng.uniform(100, 1700, n), rng.uniform(100, 800, n)])
    speed = rng.uniform(-60, 60, (n, 2)) * [1.0, 0.3]          # pixels per second; some cross
    costs: list[float] = []
    ids: set[int] = set()
    for k in range(args.frames):
        t = k / args.fps
        pos = start + speed * t
        jitter = rng.normal(0, 1.0, (n, 4))
        dets = tuple(Detection(0, "person", float(rng.uniform(0.6, 0.9)),
                               (float(x + j[0]), float(y + j[1]), float(x + 60 + j[2]), float(y + 160 + j[3])))
                     for (x, y), j in zip(pos, jitter))
        result = FrameResult("bench", k, 1_764_000_000 + t, t, 1920, 1080, dets)
        t0 = time.perf_counter()
        if args.stage:
            out, _ = objects.frame(result, Frame("bench", k, result.capture_ts, t, image))
        else:
            out = tracker.update(result).result
        costs.append(time.perf_counter() - t0)
        ids.update(d.track_id for d in out.detections if d.track_id is not None)
    ms = sorted(c * 1000 for c in costs[len(costs) // 10:])     # the first 10% of frames: warm-up
    print(f"objects {n}, frames {args.frames}: per frame p50 {statistics.median(ms):.3f} ms, "
          f"p90 {ms[int(len(ms) * 0.9)]:.3f} ms, mean {statistics.fmean(ms):.3f} ms; "
          f"ids handed out {len(ids)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
