"""Protocol bodies (docs/PROTOCOL.md) built once from the pipeline's records, for every
transport: the ZeroMQ publisher and the broker outputs send the same fields."""

from __future__ import annotations

import math
from typing import Any

from .. import protocol
from ..entities import FrameResult
from ..redact import scrub
from .base import Outbound


def detections_body(r: FrameResult, snapshot: bytes | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": protocol.TYPE_DETECTIONS,
        "camera": r.camera_id,
        "frame": r.frame_no,
        "capture_ts": round(r.capture_ts, 6),
        "width": r.width,
        "height": r.height,
        "detections": [
            {"class_id": d.class_id, "label": d.label, "confidence": round(d.confidence, 4),
             "box": [round(v, 1) for v in d.box]}
            for d in r.detections],
        "timings_ms": {k: round(v * 1000, 2) for k, v in r.timings.items()},
    }
    if snapshot is not None:
        body["snapshot"] = {"format": "jpeg", "part": 2, "bytes": len(snapshot)}
    return body


def health_body(camera_id: str, state: str, previous: str, reason: str) -> dict[str, Any]:
    return {"type": protocol.TYPE_HEALTH, "camera": camera_id, "state": state, "previous": previous,
            "reason": scrub(reason)}


def detections_outbound(r: FrameResult, snapshot: bytes | None, max_age_s: float | None) -> Outbound:
    """The record each output is offered; its deadline is the frame's age bound."""
    deadline = r.capture_mono + max_age_s if max_age_s is not None else math.inf
    return Outbound("detections", r.camera_id, detections_body(r, snapshot), snapshot, deadline)
