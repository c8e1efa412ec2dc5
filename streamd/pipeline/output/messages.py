"""Results -> protocol message bodies (docs/PROTOCOL.md), as ``Outbound`` records.

The body is what every transport carries; each adds its own envelope (sequence numbers,
origin, topic spelling) when it sends.
"""

from __future__ import annotations

import math
from typing import Any

from ... import protocol
from ...entities import Detection, FrameResult, RequestResult
from ...outputs.base import Outbound
from ...redact import scrub

ANONYMOUS_CLIENT = "anonymous"   # a request without a client id is published under this name


def detection_json(d: Detection) -> dict[str, Any]:
    """One detection as the protocol spells it (the only place this happens); the tracking
    fields only when the camera tracks objects and the detection has a track."""
    out: dict[str, Any] = {"class_id": d.class_id, "label": d.label, "confidence": round(d.confidence, 4),
                           "box": [round(v, 1) for v in d.box]}
    if d.track_id is not None:
        out["track_id"] = d.track_id
        out["first_seen_ts"] = d.first_seen_ts
        out["age_s"] = d.age_s
    return out


def detections_message(r: FrameResult, max_age_s: float | None = None,
                       snapshot: bytes | None = None) -> Outbound:
    """A camera's ``detections`` message; with ``max_age_s``, not worth sending once the
    frame is older than that (each transport judges it just before sending)."""
    body: dict[str, Any] = {
        "type": protocol.TYPE_DETECTIONS,
        "camera": r.camera_id,
        "frame": r.frame_no,
        "capture_ts": round(r.capture_ts, 6),
        "width": r.width,
        "height": r.height,
        "detections": [detection_json(d) for d in r.detections],
        "timings_ms": {k: round(v * 1000, 2) for k, v in r.timings.items()},
    }
    deadline = r.capture_mono + max_age_s if max_age_s is not None else math.inf
    return Outbound("detections", r.camera_id, body, attachment=snapshot, deadline=deadline)


def health_message(camera_id: str, state: str, previous: str, reason: str,
                   decoder: int | None = None) -> Outbound:
    # The reason may quote an error that held a camera URL: credentials never leave.
    body = {"type": protocol.TYPE_HEALTH, "camera": camera_id, "state": state, "previous": previous,
            "reason": scrub(reason)}
    if decoder is not None:     # which decoder instance of the camera speaks (see docs/PROTOCOL.md)
        body["decoder"] = decoder
    return Outbound("health", camera_id, body)


def stats_message(stats: dict[str, Any]) -> Outbound:
    """The daemon's periodic ``stats`` message (the same counters ``streamd status`` reads)."""
    return Outbound("stats", "", {"type": protocol.TYPE_STATS, **stats})


def request_result_body(rr: RequestResult) -> dict[str, Any]:
    """The ``result`` answer to an on-demand request (the reply and the published copy)."""
    req = rr.request
    w, h = req.size
    return {"type": "result", "task_id": req.task_id, "request_id": req.request_id,
            "client_id": req.client_id, "width": w, "height": h,
            "detections": [detection_json(d) for d in rr.detections],
            "timings_ms": {"queue": round(1000 * rr.queue_s, 2), "infer": round(1000 * rr.infer_s, 2),
                           "total": round(1000 * (rr.done_mono - req.received_mono), 2)}}


def request_result_message(rr: RequestResult, body: dict[str, Any]) -> Outbound:
    return Outbound("result", rr.request.client_id or ANONYMOUS_CLIENT, body)
