"""Turn raw network outputs into detections in frame pixels.

Two layouts (see ``manifest.LAYOUTS``):
- YOLOv8's raw head ``(batch, 4 + nc, anchors)``: decoded and NMS'd here, class-aware,
  with the same rules as Ultralytics' ``non_max_suppression`` (best class per anchor,
  score > conf, IoU threshold, at most ``max_det`` kept) so results match its predict.
- End-to-end ``(batch, max_det, 6)`` with NMS already in the graph: only thresholded.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from ..config import ModelConfig
from ..entities import Detection
from ..errors import ConfigError
from ..manifest import LAYOUT_END2END, LAYOUT_RAW
# PostprocessParams lives with the defaults so requests (entities) can carry it without importing
# the pipeline; it is imported from here by the stages.
from ..thresholds import PostprocessParams  # noqa: F401
from .preprocess import Letterbox

if TYPE_CHECKING:
    from ..backends.base import ModelInfo

log = logging.getLogger("streamd.postprocess")

MAX_NMS_CANDIDATES = 30000   # Ultralytics' max_nms: cap the sort on pathological outputs
CLASS_OFFSET = 7680.0        # Ultralytics' max_wh: shifts boxes per class for class-aware NMS


def postprocess_params(model: ModelConfig, names: dict[int, str]) -> PostprocessParams:
    """The daemon's thresholds from its config; class names resolved against the model's."""
    classes: frozenset[int] | None = None
    if model.classes:
        by_name = {v.lower(): k for k, v in names.items()}
        ids = set()
        for i, c in enumerate(model.classes):
            if isinstance(c, int):
                if c not in names:
                    raise ConfigError(f"class id {c} is not in the model (0-{max(names)})",
                                      field=f"model.classes[{i}]")
                ids.add(c)
            else:
                if c.lower() not in by_name:
                    raise ConfigError(f"class '{c}' is not in the model ({', '.join(names.values())})",
                                      field=f"model.classes[{i}]")
                ids.add(by_name[c.lower()])
        classes = frozenset(ids)
    return PostprocessParams(conf=model.conf, iou=model.iou, max_det=model.max_det, classes=classes)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_thr: float, max_keep: int) -> np.ndarray:
    """Greedy NMS over (N, 4) xyxy boxes; returns kept indices, best score first.

    Each step is vectorised over the remaining boxes, so the Python loop runs once per
    *kept* box (a few dozen), not once per pair.
    """
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1).clip(0) * (y2 - y1).clip(0)
    keep: list[int] = []
    while order.size and len(keep) < max_keep:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        w = (np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest])).clip(0)
        h = (np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest])).clip(0)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter + 1e-9)
        order = rest[iou <= iou_thr]
    return np.asarray(keep, dtype=np.int64)


def _raw_one(pred: np.ndarray, p: PostprocessParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pred: (4 + nc, anchors) for one image -> boxes (N,4) xyxy, scores (N,), classes (N,)."""
    scores_all = pred[4:]
    cls = scores_all.argmax(0)
    score = scores_all[cls, np.arange(scores_all.shape[1])]
    keep = score > p.conf
    if p.classes is not None:
        keep &= np.isin(cls, list(p.classes))
    if not keep.any():
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    xywh = pred[:4, keep].T.astype(np.float32)
    score, cls = score[keep].astype(np.float32), cls[keep]
    if score.size > MAX_NMS_CANDIDATES:
        top = np.argsort(-score, kind="stable")[:MAX_NMS_CANDIDATES]
        xywh, score, cls = xywh[top], score[top], cls[top]
    boxes = np.empty_like(xywh)
    boxes[:, :2] = xywh[:, :2] - xywh[:, 2:] / 2
    boxes[:, 2:] = xywh[:, :2] + xywh[:, 2:] / 2
    idx = nms(boxes + (cls[:, None] * CLASS_OFFSET), score, p.iou, p.max_det)
    return boxes[idx], score[idx], cls[idx]


def _end2end_one(pred: np.ndarray, p: PostprocessParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pred: (max_det, 6) rows x1, y1, x2, y2, score, class."""
    keep = pred[:, 4] > p.conf
    cls = pred[:, 5].astype(np.int64)
    if p.classes is not None:
        keep &= np.isin(cls, list(p.classes))
    rows = pred[keep][: p.max_det]
    return rows[:, :4].astype(np.float32), rows[:, 4].astype(np.float32), cls[keep][: p.max_det]


def postprocess(output: np.ndarray, layout: str, letterboxes: list[Letterbox],
                names: dict[int, str], params: PostprocessParams) -> list[tuple[Detection, ...]]:
    """Decode a batch output; one tuple of detections per letterboxed frame, in order."""
    if layout == LAYOUT_RAW:
        one = _raw_one
        if output.ndim != 3 or output.shape[1] != 4 + len(names):
            raise ValueError(f"raw YOLOv8 output should be (batch, {4 + len(names)}, anchors), "
                             f"got {tuple(output.shape)}")
    elif layout == LAYOUT_END2END:
        one = _end2end_one
        if output.ndim != 3 or output.shape[2] != 6:
            raise ValueError(f"end-to-end output should be (batch, max_det, 6), got {tuple(output.shape)}")
    else:
        raise ValueError(f"unknown output layout {layout!r}")
    if output.shape[0] < len(letterboxes):
        raise ValueError(f"output holds {output.shape[0]} images, expected {len(letterboxes)}")
    results: list[tuple[Detection, ...]] = []
    for i, lb in enumerate(letterboxes):
        boxes, scores, classes = one(output[i].astype(np.float32, copy=False), params)
        boxes = lb.boxes_to_frame(boxes)
        results.append(tuple(
            Detection(int(c), names.get(int(c), str(int(c))), float(s),
                      (float(b[0]), float(b[1]), float(b[2]), float(b[3])))
            for b, s, c in zip(boxes, scores, classes)))
    return results


def conf_below_graph(info: ModelInfo, conf: float) -> str | None:
    """What to tell the user when ``conf`` cannot take effect: a graph with NMS inside never
    outputs a box scoring below the threshold it was exported with. None when it can."""
    if info.nms_conf is None or conf >= info.nms_conf:
        return None
    return (f"model.conf {conf:g} is below the confidence threshold {info.nms_conf:g} baked into "
            f"{info.path} (exported with NMS in the graph): no box under {info.nms_conf:g} is ever "
            f"published; export it again with --conf {conf:g}, or export without --nms")


def warn_if_conf_below_graph(info: ModelInfo, conf: float) -> None:
    """Log :func:`conf_below_graph`'s warning, if any; called once per model load."""
    message = conf_below_graph(info, conf)
    if message is not None:
        log.warning(message)
