"""Ultralytics' sample pictures as a small picture set for checking exports.

Two pictures ship inside the ``ultralytics`` package (bus.jpg, zidane.jpg). They, with
their mirror images, are the default verification set of FP16/INT8 exports; with two crops
of each view added they make the 12-picture folder that benchmarks/precision.py and the
precision tests calibrate and compare on: enough to compare precisions, too few to
calibrate a model for real cameras.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SAMPLE_NAMES = ("bus.jpg", "zidane.jpg")


def sample_paths() -> list[Path]:
    """Ultralytics' sample pictures that are present (none when Ultralytics is not installed)."""
    # find_spec, not import: the paths are known without paying for importing Ultralytics.
    spec = importlib.util.find_spec("ultralytics")
    if spec is None or spec.origin is None:
        return []
    assets = Path(spec.origin).parent / "assets"
    return [p for p in (assets / n for n in SAMPLE_NAMES) if p.is_file()]


def write_sample_pictures(folder: Path, sources: Sequence[Path] | None = None, *,
                          crops: int = 2, seed: int = 0) -> int:
    """Write every picture of ``sources`` (default: :func:`sample_paths`), its mirror image,
    and ``crops`` square crops of each of the two (half to 0.8 of the short side, at seeded
    random places) into ``folder`` as 00.jpg, 01.png, ...; returns how many were written
    (12 from the two samples)."""
    import cv2

    rng = np.random.default_rng(seed)
    k = 0
    for path in sample_paths() if sources is None else sources:
        img = cv2.imread(str(path))
        if img is None:
            raise ValueError(f"{path}: not a readable picture")
        for view in (img, cv2.flip(img, 1)):
            cv2.imwrite(str(folder / f"{k:02d}.jpg"), view)
            k += 1
            h, w = view.shape[:2]
            for _ in range(crops):
                side = int(min(h, w) * rng.uniform(0.5, 0.8))
                y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
                cv2.imwrite(str(folder / f"{k:02d}.png"), view[y:y + side, x:x + side])
                k += 1
    return k
