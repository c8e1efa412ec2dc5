"""Drawing detections, for the clients: the code lives in ``streamd.annotate`` so the daemon's
live view draws with it too (clients and the service stay apart)."""

from ..annotate import draw

__all__ = ["draw"]
