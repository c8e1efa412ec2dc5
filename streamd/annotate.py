"""Draw detections on a picture (snapshots, the demo, ``streamd sub --save-snapshots``)."""

from __future__ import annotations

from typing import Any, Iterable

import cv2
import numpy as np


def _colour(class_id: int) -> tuple[int, int, int]:
    # A fixed, well-spread colour per class so the same class looks the same everywhere.
    hue = (class_id * 47) % 180
    hsv = np.uint8([[[hue, 200, 255]]])
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def draw(image: np.ndarray, detections: Iterable[dict[str, Any]], title: str = "") -> np.ndarray:
    """Return a copy of ``image`` (BGR) with boxes and 'label 0.87' tags; detections are
    protocol dicts (class_id, label, confidence, box; a tracked one's id as '#12')."""
    out = image.copy()
    thick = max(1, round(min(out.shape[:2]) / 300))
    for d in detections:
        x1, y1, x2, y2 = (int(round(v)) for v in d["box"])
        colour = _colour(int(d["class_id"]))
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thick)
        tag = f"{d['label']} {d['confidence']:.2f}" + (f" #{d['track_id']}" if d.get("track_id") is not None else "")
        (tw, th), base = cv2.getTextSize(tag, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        ty = max(y1, th + base + 2)
        cv2.rectangle(out, (x1, ty - th - base - 2), (x1 + tw + 4, ty), colour, -1)
        cv2.putText(out, tag, (x1 + 2, ty - base - 1), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    if title:
        (tw, th), base = cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, 0.6, 1)
        cv2.rectangle(out, (0, 0), (tw + 12, th + base + 10), (0, 0, 0), -1)
        cv2.putText(out, title, (6, th + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
    return out
