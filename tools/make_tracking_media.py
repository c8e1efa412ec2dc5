#!/usr/bin/env python3
"""Ground-truth tracking sequences: people cut from the sample photos walking known paths.

One scene, rendered at each requested frame rate into ``tracks-<fps>fps/``:

* ``frame000.jpg`` ...: 640x480 frames (and ``clip.mp4``, H.264, when ffmpeg is present);
* ``gt.txt``: the ground truth in the MOTChallenge layout, one line per visible object per
  frame: ``frame,id,x,y,w,h,1,-1,-1,-1`` (frame numbers from 1, boxes in pixels);
* ``seq.json``: fps, size, frame count, and the crossings the scene contains.

The scene (12 s): person 1 walks left to right in front while person 2 walks right to left
a little behind, so they cross and 2 is partly hidden by 1; person 3, smaller (further
away), walks out of view on the right, and the same picture walks back in 2 s later as
object 4: an object that left the view is a new object to a tracker without appearance
features, and to the events the daemon publishes. Boxes are the pasted crops' rectangles,
cut tight around the people the model finds in ``bus.jpg``; an object is in the ground truth
while at least 60% of its width is in the frame.

Used by tests/test_tracking_media.py and benchmarks/bench_tracking.py (loaded by path), and
by ``tools/make_test_media.py --tracks``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

SIZE = (640, 480)
DURATION_S = 12.0
RECIPE = 4
Box = tuple[float, float, float, float]
# People in Ultralytics' bus.jpg (x1, y1, x2, y2), as the Normal/Fall model boxes them.
BUS_PEOPLE = ((34, 385, 218, 910), (217, 394, 349, 889), (687, 346, 810, 881))


@dataclass(frozen=True)
class Walker:
    """One object: a crop moving at constant speed between two times, bottom at ``y``."""

    gt_id: int
    crop: int           # index into BUS_PEOPLE; 3: the first one mirrored
    scale: float
    t0: float
    t1: float
    x0: float           # left edge at t0
    x1: float           # left edge at t1
    y: float            # bottom edge

    def box(self, t: float, crops: list[np.ndarray]) -> tuple[float, float, float, float] | None:
        if not self.t0 <= t <= self.t1:
            return None
        h, w = crops[self.crop].shape[:2]
        x = self.x0 + (self.x1 - self.x0) * (t - self.t0) / (self.t1 - self.t0)
        return (x, self.y - h * self.scale, x + w * self.scale, self.y)


# Drawn in this order: later ones are in front.
WALKERS = (
    Walker(3, 3, 0.34, 0.5, 6.0, 40, 700, 260),
    Walker(4, 3, 0.34, 8.0, 11.8, 660, 200, 260),
    Walker(2, 1, 0.42, 0.5, 8.5, 600, -20, 400),
    Walker(1, 0, 0.45, 0.5, 8.5, -30, 610, 450),
)
CROSSINGS = 1   # persons 1 and 2, at about t = 4.5 s


@dataclass(frozen=True)
class Sequence:
    folder: Path
    fps: int
    frame_count: int
    size: tuple[int, int]

    def frame_paths(self) -> list[Path]:
        return [self.folder / f"frame{i:03d}.jpg" for i in range(self.frame_count)]

    def ground_truth(self) -> dict[int, list[tuple[int, tuple[float, float, float, float]]]]:
        """frame index (from 0) -> [(object id, (x1, y1, x2, y2)), ...]"""
        out: dict[int, list[tuple[int, tuple[float, float, float, float]]]] = {}
        for line in (self.folder / "gt.txt").read_text().splitlines():
            f, i, x, y, w, h = (float(v) for v in line.split(",")[:6])
            out.setdefault(int(f) - 1, []).append((int(i), (x, y, x + w, y + h)))
        return out


def _media_module() -> Any:
    """tools/make_test_media.py, for the sample photo, ffmpeg and publishing a folder whole."""
    name = "streamd_tools_make_test_media"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / "make_test_media.py")
        assert spec is not None and spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def _background(size: tuple[int, int]) -> np.ndarray:
    """A pavement-like backdrop without people: smooth gradients and seeded texture."""
    w, h = size
    rng = np.random.default_rng(14)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = 90 + 60 * (yy / h) + 15 * np.sin(xx / 47.0)
    texture = cv2.GaussianBlur(rng.normal(0, 18, (h, w)).astype(np.float32), (0, 0), 3)
    img = np.stack([base + texture, base * 1.05 + texture, base * 0.95 + texture], axis=2)
    cv2.rectangle(img, (0, int(h * 0.42)), (w, int(h * 0.44)), (60, 60, 60), -1)   # a kerb line
    return np.clip(img, 0, 255).astype(np.uint8)


def _paste(frame: np.ndarray, crop: np.ndarray, box: tuple[float, float, float, float]) -> None:
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    patch = cv2.resize(crop, (x2 - x1, y2 - y1), interpolation=cv2.INTER_AREA)
    h, w = frame.shape[:2]
    fx1, fy1, fx2, fy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if fx2 > fx1 and fy2 > fy1:
        frame[fy1:fy2, fx1:fx2] = patch[fy1 - y1:fy2 - y1, fx1 - x1:fx2 - x1]


def render(fps: int, crops: list[np.ndarray], size: tuple[int, int] = SIZE) -> Iterator[tuple[np.ndarray, list]]:
    """Yield (frame, [(gt id, clipped box), ...]) for each frame of the scene at ``fps``."""
    back = _background(size)
    w, h = size
    for k in range(int(round(DURATION_S * fps))):
        t = k / fps
        frame = back.copy()
        truth = []
        for walker in WALKERS:
            box = walker.box(t, crops)
            if box is None:
                continue
            _paste(frame, crops[walker.crop], box)
            x1, y1, x2, y2 = box
            cx1, cx2 = max(x1, 0.0), min(x2, float(w))
            if cx2 - cx1 >= 0.6 * (x2 - x1):
                truth.append((walker.gt_id, (cx1, max(y1, 0.0), cx2, min(y2, float(h)))))
        yield frame, truth


def make_sequences(out_dir: str | Path, rates: tuple[int, ...] = (5, 15), bus_jpg: Path | None = None,
                   h264: bool = True, log: bool = False) -> dict[int, Sequence]:
    """Make (or keep, when made by the same recipe) one sequence per frame rate."""
    media = _media_module()
    source = bus_jpg or next(p for p in media.default_images() if p.name == "bus.jpg")
    photo = cv2.imread(str(source), cv2.IMREAD_COLOR)
    if photo is None:
        raise ValueError(f"cannot read image {source}")
    crops = [photo[y1:y2, x1:x2] for x1, y1, x2, y2 in BUS_PEOPLE]
    crops.append(crops[0][:, ::-1])
    out: dict[int, Sequence] = {}
    for fps in rates:
        folder = Path(out_dir) / f"tracks-{fps}fps"
        frames = int(round(DURATION_S * fps))
        params = {"recipe": RECIPE, "fps": fps, "frames": frames, "size": list(SIZE),
                  "source_bytes": source.stat().st_size, "crossings": CROSSINGS}
        try:
            current = json.loads((folder / "seq.json").read_text()) == params
        except (OSError, ValueError):
            current = False
        if not current:
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
            tmp.chmod(0o755)
            try:
                lines = []
                for k, (frame, truth) in enumerate(render(fps, crops)):
                    if not cv2.imwrite(str(tmp / f"frame{k:03d}.jpg"), frame, [cv2.IMWRITE_JPEG_QUALITY, 92]):
                        raise OSError(f"cannot write a frame in {tmp}")
                    lines += [f"{k + 1},{i},{b[0]:.1f},{b[1]:.1f},{b[2] - b[0]:.1f},{b[3] - b[1]:.1f},1,-1,-1,-1"
                              for i, b in truth]
                (tmp / "gt.txt").write_text("\n".join(lines) + "\n")
                if h264 and shutil.which("ffmpeg"):
                    media._run_ffmpeg(["-framerate", str(fps), "-i", str(tmp / "frame%03d.jpg"), "-c:v", "libx264",
                                       "-g", str(fps), "-bf", "0", "-pix_fmt", "yuv420p", "-preset", "veryfast",
                                       str(tmp / "clip.mp4")])
                (tmp / "seq.json").write_text(json.dumps(params, indent=1) + "\n")
                media._publish_dir(tmp, folder)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        if log:
            print(f"{'made' if not current else 'kept'}   {folder} ({frames} frames at {fps} fps)")
        out[fps] = Sequence(folder, fps, frames, SIZE)
    return out


def _iou_distance(a: np.ndarray, b: np.ndarray, min_iou: float = 0.5) -> np.ndarray:
    """1 - IoU of x1y1x2y2 boxes, NaN (no match) below ``min_iou``: what
    ``motmetrics.distances.iou_matrix`` computes, which calls ``np.asfarray``, gone in NumPy 2."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])   # noqa: E731
    iou = inter / (area(a)[:, None] + area(b)[None, :] - inter)
    return np.where(iou >= min_iou, 1.0 - iou, np.nan)


def score(truth: dict[int, list[tuple[int, tuple[float, float, float, float]]]],
          tracks: dict[int, list[tuple[int, tuple[float, float, float, float]]]], frames: int) -> dict[str, float]:
    """IDF1, MOTA, id switches and counts of a tracker's output against the ground truth
    (boxes matched at IoU >= 0.5), measured with ``motmetrics``."""
    import motmetrics as mm

    acc = mm.MOTAccumulator(auto_id=True)
    for k in range(frames):
        gt, hyp = truth.get(k, []), tracks.get(k, [])
        dist = _iou_distance(np.array([b for _, b in gt]).reshape(-1, 4), np.array([b for _, b in hyp]).reshape(-1, 4))
        acc.update([i for i, _ in gt], [i for i, _ in hyp], dist)
    summary = mm.metrics.create().compute(acc, metrics=["idf1", "mota", "num_switches", "num_false_positives",
                                                        "num_misses", "num_unique_objects"], name="seq")
    row = summary.loc["seq"]
    return {k: (float(v) if not math.isnan(float(v)) else 0.0) for k, v in row.items()}
