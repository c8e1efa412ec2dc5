"""The default detection thresholds, in one place.

The config's ``model.conf`` / ``iou`` / ``max_det``, the postprocess stage's parameters and
the export tool's ``--conf`` / ``--iou`` / ``--max-det`` (baked into a graph with NMS) all
read these, so an exported graph and the daemon agree unless told otherwise. They are
Ultralytics' own predict defaults, so streamd's detections match its predict.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_CONF = 0.25       # minimum confidence of a published detection
DEFAULT_IOU = 0.7         # NMS IoU threshold (class-aware)
DEFAULT_MAX_DET = 300     # detections kept per picture


@dataclass(frozen=True, slots=True)
class PostprocessParams:
    """The thresholds one picture is judged by: the daemon's, or a request's own."""
    conf: float = DEFAULT_CONF
    iou: float = DEFAULT_IOU
    max_det: int = DEFAULT_MAX_DET
    classes: frozenset[int] | None = None   # keep only these class ids (None: all)
