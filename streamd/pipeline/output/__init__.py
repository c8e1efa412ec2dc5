"""The output stage: results become protocol messages and leave through every transport.

``messages`` builds the message bodies (the one place detections become JSON),
``snapshots`` decides which frames carry a JPEG and encodes it, ``stage`` is what the
scheduler's post thread hands results to; it fans messages out through
``streamd.outputs.base.Output``. Results only flow forward from here.
"""

from .stage import OutputStage

__all__ = ["OutputStage"]
