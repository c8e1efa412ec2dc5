"""Small typed records shared by every stage.

Stages only exchange these: sources know nothing of models, backends nothing of
cameras, the publisher nothing of backends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded picture from one camera."""

    camera_id: str
    frame_no: int           # per-camera counter of frames decoded since start
    capture_ts: float       # wall clock (time.time()) when the decoder returned it
    capture_mono: float     # time.monotonic() at the same instant; ages use this
    image: np.ndarray       # HxWx3 uint8, BGR (OpenCV's order)
    request: Any = None     # an on-demand request (streamd.service.requests.Request) instead of a camera frame

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return int(self.image.shape[1]), int(self.image.shape[0])


def as_frame(req: Any) -> Frame:
    """An on-demand request (``streamd.service.requests.Request``) as a frame the scheduler can
    batch beside the cameras'."""
    return Frame("", 0, req.received_ts, req.received_mono, req.image, request=req)


@dataclass(frozen=True, slots=True)
class Detection:
    class_id: int
    label: str
    confidence: float
    box: tuple[float, float, float, float]   # x1, y1, x2, y2 in frame pixels
    # Set by the tracker (streamd.pipeline.tracking) when the camera tracks objects; None for
    # an untracked camera, or a weak detection that continued no track.
    track_id: int | None = None
    first_seen_ts: float | None = None   # wall clock of the frame the track was first seen in
    age_s: float | None = None           # seconds from first seen to this frame (capture times)


@dataclass(frozen=True, slots=True)
class FrameResult:
    """Detections for one frame, ready to publish."""

    camera_id: str
    frame_no: int
    capture_ts: float
    capture_mono: float
    width: int
    height: int
    detections: tuple[Detection, ...]
    timings: dict[str, float] = field(default_factory=dict)   # seconds per stage
