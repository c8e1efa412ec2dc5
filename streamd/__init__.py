"""streamd: multi-stream YOLOv8 detections, published fresh on ZeroMQ."""

__version__ = "0.1.0"
