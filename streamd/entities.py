"""Small typed records shared by every stage.

Stages only exchange these: sources know nothing of models, backends nothing of
cameras, the publisher nothing of backends. The scheduler takes two inputs: camera
``Frame``s and on-demand ``Request``s; it hands back ``FrameResult``s and ``RequestResult``s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .thresholds import PostprocessParams



@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded picture from one camera."""

    camera_id: str
    frame_no: int           # per-camera counter of frames decoded since start
    capture_ts: float       # wall clock (time.time()) when the decoder returned it
    capture_mono: float     # time.monotonic() at the same instant; ages use this
    image: np.ndarray       # HxWx3 uint8, BGR (OpenCV's order)
    # (width, height) of the camera's own pictures when the decoder scaled ``image`` down to the
    # model's size; boxes are reported in these pixels. None: ``image`` is the camera's size.
    source_size: tuple[int, int] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of ``image`` in pixels."""
        return int(self.image.shape[1]), int(self.image.shape[0])

    @property
    def camera_size(self) -> tuple[int, int]:
        """(width, height) in the camera's own pixels: what detections are reported in."""
        return self.source_size or self.size


class ReplyChannel(Protocol):
    """The front door a request came through (the ZeroMQ ROUTER, the fleet's Redis stream): it
    answers its own clients. Every accepted request is answered exactly once, so both
    calls are ignored (``answer`` returns False) for a request already answered."""

    def answer(self, result: RequestResult, body: dict[str, Any]) -> bool:
        """Send ``body`` (the protocol's ``result`` message) to the client that asked."""

    def fail(self, request: Request, reason: str) -> None:
        """Answer with an error instead (timeout, shutdown, failure)."""


@dataclass(frozen=True, slots=True, eq=False)
class Request:
    """One on-demand picture, accepted by a front door and waiting for the scheduler."""

    task_id: str
    image: np.ndarray                   # HxWx3 uint8, BGR
    received_ts: float                  # wall clock when accepted
    received_mono: float                # time.monotonic() at the same instant
    reply_to: ReplyChannel
    route: Any = None                   # the front door's return address (opaque to the pipeline)
    params: PostprocessParams | None = None   # thresholds of its own; None: the daemon's
    priority: int = 0                   # higher is served first
    client_id: str | None = None        # names the client in metrics and the published topic
    request_id: str | int | None = None   # the client's own id, echoed in every reply

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return int(self.image.shape[1]), int(self.image.shape[0])


@dataclass(frozen=True, slots=True)
class RequestResult:
    """Detections for one request, in its picture's pixels."""

    request: Request
    detections: tuple[Detection, ...]
    queue_s: float                      # accepted -> taken into a batch
    infer_s: float                      # the inference of the batch that carried it
    done_mono: float                    # monotonic: detections ready


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
