"""Which results carry a JPEG of their frame, and the encoding.

Per camera (``snapshot``: off, on_detection, always; at most one per
``snapshot_interval_s``; ``snapshot_quality``). Called on the post thread only.
"""

from __future__ import annotations

from typing import Callable

import cv2

from ...config import CameraConfig
from ...entities import Frame, FrameResult
from ..events import encode_jpeg

CameraSettings = Callable[[str], "CameraConfig | None"]   # camera id -> its config (None: gone)


class SnapshotPolicy:
    def __init__(self, settings: CameraSettings, max_bytes: int = 0) -> None:
        self._settings = settings
        self._max_bytes = max_bytes             # 0: any size; else re-encoded smaller to fit
        self._last: dict[str, float] = {}       # camera id -> capture_mono of its last snapshot

    def wants(self, cam: CameraConfig, r: FrameResult) -> bool:
        mode = cam.snapshot
        if mode == "off" or (mode == "on_detection" and not r.detections):
            return False
        last = self._last.get(r.camera_id)
        return last is None or r.capture_mono - last >= cam.snapshot_interval_s

    def take(self, r: FrameResult, frame: Frame) -> bytes | None:
        """JPEG bytes of ``frame`` when its camera wants a snapshot now, else None."""
        cam = self._settings(r.camera_id)
        if cam is None or not self.wants(cam, r):
            return None
        # A frame its decoder scaled down is scaled back: boxes are in the camera's pixels.
        image = frame.image if frame.source_size in (None, frame.size) else \
            cv2.resize(frame.image, frame.camera_size, interpolation=cv2.INTER_LINEAR)
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, cam.snapshot_quality])
        jpeg = buf.tobytes() if ok else None
        if jpeg is not None and self._max_bytes and len(jpeg) > self._max_bytes:
            # The publisher's bound on a subscriber's memory counts on this cap.
            jpeg = encode_jpeg(image, (0.0, 0.0, 0.0, 0.0), self._max_bytes)
        if jpeg is None:
            return None
        self._last[r.camera_id] = r.capture_mono
        return jpeg

    def forget(self, camera_id: str) -> None:
        """A camera removed or restarted starts its interval afresh."""
        self._last.pop(camera_id, None)
