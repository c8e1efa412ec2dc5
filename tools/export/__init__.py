"""streamd-export: turn Ultralytics YOLOv8 detection checkpoints into streamd model files.

The daemon never imports this package (it needs torch and Ultralytics, the daemon does not).
Use the ``streamd-export`` command, or from Python::

    from streamd_export import ExportRequest, run_export
    result = run_export(ExportRequest(weights="yolov8s.pt", imgsz=(640, 640),
                                      batch_min=1, batch_max=8, dynamic_batch=True))
"""

from __future__ import annotations

from .stages import (
    PLANS,
    PRECISIONS,
    ExportContext,
    ExportInputError,
    ExportNotImplemented,
    ExportRequest,
    ExportResult,
    Stage,
    plan_for,
    register,
    run_export,
)

__all__ = [
    "PLANS",
    "PRECISIONS",
    "ExportContext",
    "ExportInputError",
    "ExportNotImplemented",
    "ExportRequest",
    "ExportResult",
    "Stage",
    "plan_for",
    "register",
    "run_export",
]
