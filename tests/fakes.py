"""A deterministic backend for scheduler tests: no exported model, no torch, no ONNX.

``BrightBoxBackend`` finds the white pixels of each letterboxed input and answers, in
YOLOv8's raw layout, one box around them (class ``bright``). A test draws a white rectangle
on a camera frame and can then check that the box comes back in that frame's pixels, so
letterboxing, decode and the mapping back are all exercised for real; a frame with no white
pixels gets no detection. It stands in for a real model only where a test is about the
scheduler, not about the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from streamd.backends.base import Backend, ModelInfo
from streamd.manifest import LAYOUT_RAW

WHITE = 0.95        # a channel value (after /255) counted as white; the letterbox pad is 114/255


class BrightBoxBackend(Backend):
    name = "bright-box"
    suffixes = (".fake",)

    def __init__(self, input_hw: tuple[int, int] = (320, 320), batch_max: int = 8, dynamic_hw: bool = False,
                 confidence: float = 0.9) -> None:
        self.info = ModelInfo(path=Path("bright-box.fake"), names={0: "bright", 1: "dark"}, input_name="images",
                              input_hw=input_hw, input_dtype=np.dtype(np.float32), batch_min=1,
                              batch_max=batch_max, output_layout=LAYOUT_RAW, source="test", dynamic_hw=dynamic_hw)
        self.confidence = confidence
        self.calls = 0
        self.shapes: list[tuple[int, int]] = []     # (H, W) of each batch, in the order run

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.check_batch(batch)
        self.calls += 1
        self.shapes.append((int(batch.shape[2]), int(batch.shape[3])))
        # (n, 4 + classes, anchors): one anchor per image is all a single box needs.
        out = np.zeros((batch.shape[0], 4 + len(self.info.names), 1), np.float32)
        for i, img in enumerate(batch):
            ys, xs = np.nonzero(img.min(axis=0) >= WHITE)
            if not xs.size:
                continue
            x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            out[i, :4, 0] = ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)
            out[i, 4, 0] = self.confidence
        return out

    def close(self) -> None:
        pass


def with_white_box(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """``image`` with the pixels ``x1 <= x < x2, y1 <= y < y2`` painted white."""
    x1, y1, x2, y2 = box
    out = image.copy()
    out[y1:y2, x1:x2] = 255
    return out
