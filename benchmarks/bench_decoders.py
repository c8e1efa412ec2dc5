#!/usr/bin/env python3
"""CPU cost of one 1080p25 H.264 camera: OpenCV's decoder in the daemon's process vs an FFmpeg
child process that scales in the decoder.

Both decode the same clip as fast as they can on one decoder thread (``sources.decoder_threads``'s
default) and deliver what the scheduler letterboxes: OpenCV a 1920x1080 BGR frame that preprocess
then resizes to 640x360, the child a 640x360 BGR frame read from its pipe (no resize left).
CPU is user + system time of this process and its children (getrusage), per frame and as the
share of one core a 25 frames/s camera costs. A third row decodes the clip with FFmpeg to
nothing: the most any software decoder could save is the gap between it and the first row.

    .venv/bin/python benchmarks/bench_decoders.py [--seconds 8] [--record]

``--preprocess`` measures the next step instead, on the host: letterboxing a batch of 4 decoded
1080p frames for the model, into the 640x384 input of the default export (any H x W) and the
640x640 of ``--fixed-size``. The float path (``BatchBuffer.fill`` for a float model: resize into
the uint8 staging buffer, then one pass to float32 NCHW RGB / 255) against the uint8 path (a
model exported with ``--input uint8``: the staging buffer is the batch), in CPU ms per batch and
the bytes per batch handed to the backend (with TensorRT: uploaded to the GPU).

    .venv/bin/python benchmarks/bench_decoders.py --preprocess [--batches 200] [--record]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamd.config import CameraConfig, SourceDefaults  # noqa: E402
from streamd.pipeline.sources.child import ChildCapture  # noqa: E402
from streamd.pipeline.sources.presets import DecoderChoice  # noqa: E402

FIT = (640, 640)


def cpu_now() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def make_clip(seconds: int) -> Path:
    out = ROOT / ".cache" / "bench" / f"cam-1080p25-{seconds}s.mp4"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        # A moving test pattern with noise: frames that change like a real scene's do.
        subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-f", "lavfi", "-i",
                        f"testsrc2=size=1920x1080:rate=25:duration={seconds},noise=alls=12:allf=t",
                        "-c:v", "libx264", "-preset", "veryfast", "-g", "50", "-b:v", "4M", "-pix_fmt", "yuv420p",
                        str(out)], check=True, timeout=600)
    return out


def run_opencv(clip: Path) -> tuple[int, float, float]:
    cap = cv2.VideoCapture(str(clip), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    cpu0, t0, n = cpu_now(), time.monotonic(), 0
    while cap.grab():
        ok, img = cap.retrieve()
        h, w = img.shape[:2]
        g = min(FIT[0] / w, FIT[1] / h)
        cv2.resize(img, (round(w * g), round(h * g)), interpolation=cv2.INTER_LINEAR)   # preprocess's resize
        n += 1
    cap.release()
    return n, cpu_now() - cpu0, time.monotonic() - t0


def run_child(clip: Path) -> tuple[int, float, float]:
    cam = CameraConfig(id="bench", url=str(clip), realtime=False)
    cpu0, t0, n = cpu_now(), time.monotonic(), 0
    child = ChildCapture(cam, SourceDefaults(decoder_threads=1), DecoderChoice("ffmpeg", "none", FIT))
    if not child.open(30):
        raise SystemExit(f"ffmpeg did not start: {child.error}")
    while child.grab():
        child.retrieve()
        n += 1
    child.release()
    return n, cpu_now() - cpu0, time.monotonic() - t0


def run_decode_only(clip: Path) -> tuple[int, float, float]:
    """The floor under both: FFmpeg decoding the clip to nothing on one thread (no colour
    conversion, no scaling, no pipe). No software decoder delivering frames can cost less."""
    probe = cv2.VideoCapture(str(clip), cv2.CAP_FFMPEG)
    n = int(probe.get(cv2.CAP_PROP_FRAME_COUNT))
    probe.release()
    cpu0, t0 = cpu_now(), time.monotonic()
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-threads", "1", "-i", str(clip),
                    "-map", "0:v:0", "-f", "null", "-"], check=True, timeout=600)
    return n, cpu_now() - cpu0, time.monotonic() - t0


def run_preprocess(batches: int) -> list[str]:
    """CPU ms per batch of 4 x 1080p letterboxed, float path vs uint8 path; table rows."""
    import numpy as np

    from streamd.manifest import FLOAT_INPUT, RAW_UINT8
    from streamd.pipeline.preprocess import BatchBuffer

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (1080, 1920, 3), np.uint8) for _ in range(4)]
    rows = []
    for net in ((384, 640), (640, 640)):
        for name, contract in (("float32 NCHW RGB (host /255 pass)", FLOAT_INPUT),
                               ("uint8 NHWC BGR (--input uint8)", RAW_UINT8)):
            buf = BatchBuffer(4, *net, fit=FIT, contract=contract)
            buf.fill(frames)                    # first touch of the buffers, not counted
            cpu0, t0 = time.process_time(), time.monotonic()
            for _ in range(batches):
                x, _ = buf.fill(frames)
            cpu = (time.process_time() - cpu0) / batches * 1000
            wall = (time.monotonic() - t0) / batches * 1000
            rows.append((f"{net[1]}x{net[0]}", name, cpu, wall, x.nbytes))
    lines = []
    for i, (size, name, cpu, wall, nbytes) in enumerate(rows):
        ref = rows[i - i % 2]
        vs = "ref" if i % 2 == 0 else f"{(cpu / ref[2] - 1) * 100:+.0f}% CPU, {nbytes / ref[4]:.2f}x bytes"
        lines.append(f"| {datetime.date.today().isoformat()} | {size} | {name} | {cpu:.2f} | {wall:.2f} | "
                     f"{nbytes / 1e6:.2f} MB | {vs} |")
    print("| date | input | batch handed to the backend | CPU ms/batch | wall ms/batch | bytes/batch | vs float |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=8, help="clip length (25 frames/s)")
    ap.add_argument("--record", action="store_true", help="append the table row to benchmarks/RESULTS.md")
    ap.add_argument("--preprocess", action="store_true",
                    help="letterbox 4 x 1080p into a batch instead: float path vs uint8 path")
    ap.add_argument("--batches", type=int, default=200, help="with --preprocess: batches timed per case")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    if args.preprocess:
        lines = run_preprocess(args.batches)
        if args.record:
            with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
                f.write("\n".join(lines) + "\n")
        return 0
    clip = make_clip(args.seconds)
    rows = []
    for name, fn in (("OpenCV in process + resize", run_opencv), ("FFmpeg child, scaled in decoder", run_child),
                     ("decode only, no frames delivered (floor)", run_decode_only)):
        n, cpu, wall = fn(clip)
        rows.append((name, n, cpu / n * 1000, cpu / n * 25 * 100, n / wall))
    base = rows[0][2]
    date = datetime.date.today().isoformat()
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else ""
    cpu_name = f"{os.cpu_count()} x {model or platform.machine()}"
    lines = [f"| {date} | {cpu_name} | {name} | {n} | {ms:.2f} | {pct:.0f}% | {fps:.0f} | "
             f"{'ref' if i == 0 else f'{(ms / base - 1) * 100:+.0f}% CPU'} |"
             for i, (name, n, ms, pct, fps) in enumerate(rows)]
    print("| date | machine | decoder | frames | CPU ms/frame | CPU of one core at 25 fps | frames/s | vs OpenCV |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    if args.record:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
