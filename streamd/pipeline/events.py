"""Object lifecycle events from tracked frames: ``start``, throttled ``update``, ``end``.

Each tracked object (camera, track id) gets one ``start`` when its id first appears and
exactly one ``end``: when the tracker drops it (``lost``: not seen for ``track_buffer_s``),
when its camera goes offline, is removed or re-tracked by a reload, or at shutdown. An event
carries the object's class, first/last seen, duration, its most confident box, the zones its
bottom-centre visited with the seconds spent in each, and for ``end`` a JPEG of its best
frame (scaled down to ``snapshot_max_bytes``).

Times are capture times, so an object's duration and zone times do not depend on how many
of its frames were dropped to stay fresh. Zone time accrues between two sightings in the
zones the object was in at both: an object seen outside, then inside, gets none for that gap.

One thread (the output stage's) calls an :class:`ObjectEvents`. Frames are read-only once
decoded, so the best frame is kept by reference (no copy) until its object ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np

from .. import protocol
from ..config import Config, TrackingConfig
from ..entities import Detection
from ..geometry import Point, bottom_center, point_in_polygon
from .tracking import TrackedFrame

EventKind = Literal["start", "update", "end"]
# Why an object ended.
LOST = "lost"                        # not seen for track_buffer_s
CAMERA_OFFLINE = "camera_offline"
CAMERA_REMOVED = "camera_removed"    # a reload removed or disabled the camera
TRACKING_CHANGED = "tracking_changed"  # a reload changed the camera's tracking settings
SHUTDOWN = "shutdown"

# (image, box, max_bytes) -> JPEG bytes, or None when it cannot be made small enough.
JpegEncoder = Callable[[np.ndarray, tuple[float, float, float, float], int], "bytes | None"]


def encode_jpeg(image: np.ndarray, box: tuple[float, float, float, float], max_bytes: int) -> bytes | None:
    """The frame as a JPEG of at most ``max_bytes``: lower quality first, then smaller sizes."""
    import cv2
    img = image
    for _ in range(8):
        for quality in (85, 70, 50):
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
            if ok and len(buf) <= max_bytes:
                return buf.tobytes()
        h, w = img.shape[:2]
        if min(h, w) < 32:
            return None
        img = cv2.resize(img, (w * 7 // 10, h * 7 // 10), interpolation=cv2.INTER_AREA)
    return None


@dataclass(frozen=True, slots=True)
class Sighting:
    """The object's most confident detection."""

    confidence: float
    box: tuple[float, float, float, float]
    class_id: int
    label: str
    capture_ts: float


@dataclass(frozen=True, slots=True)
class ObjectEvent:
    kind: EventKind
    camera_id: str
    track_id: int
    class_id: int                      # of its latest detection
    label: str
    first_seen_ts: float
    last_seen_ts: float
    duration_s: float
    best: Sighting
    zones: dict[str, float]            # zone name -> seconds spent in it (every zone visited)
    in_zones: tuple[str, ...]          # where it is (was, for end) at its last sighting
    reason: str | None = None          # end only
    jpeg: bytes | None = None          # end only: the best frame

    def body(self) -> dict[str, Any]:
        """The ``cam/<id>/event`` body before the publisher adds its envelope (docs/PROTOCOL.md)."""
        out: dict[str, Any] = {
            "type": protocol.TYPE_EVENT, "event": self.kind, "camera": self.camera_id,
            "track_id": self.track_id, "class_id": self.class_id, "label": self.label,
            "first_seen_ts": self.first_seen_ts, "last_seen_ts": self.last_seen_ts,
            "duration_s": round(self.duration_s, 3),
            "best": {"confidence": round(self.best.confidence, 4), "box": [round(v, 1) for v in self.best.box],
                     "class_id": self.best.class_id, "label": self.best.label,
                     "capture_ts": self.best.capture_ts},
            "zones": {name: round(s, 3) for name, s in self.zones.items()},
            "in_zones": list(self.in_zones),
        }
        if self.reason is not None:
            out["reason"] = self.reason
        if self.jpeg is not None:
            out["snapshot"] = {"format": "jpeg", "part": 2, "bytes": len(self.jpeg)}
        return out


@dataclass(slots=True)
class _Object:
    track_id: int
    first_ts: float
    first_mono: float
    last_ts: float
    last_mono: float
    last: Detection
    best: Sighting
    best_image: np.ndarray | None
    in_zones: frozenset[str]
    zones: dict[str, float] = field(default_factory=dict)
    last_update_mono: float = 0.0


class ObjectEvents:
    """Lifecycle events of every tracked camera's objects."""

    def __init__(self, cfg: Config, encode: JpegEncoder = encode_jpeg) -> None:
        self._encode = encode
        self._objects: dict[str, dict[int, _Object]] = {}
        self._zones: dict[str, dict[str, list[Point]]] = {}
        self._settings: dict[str, TrackingConfig] = {}
        self.configure(cfg)

    def reconfigure(self, cfg: Config, ended: dict[str, tuple[int, ...]]) -> list[ObjectEvent]:
        """A reload: end the objects whose tracks :meth:`Tracking.configure` ended (``ended``),
        naming why, then take the new zones and settings."""
        enabled = {cam.id for cam in cfg.cameras if cam.enabled}
        events: list[ObjectEvent] = []
        for cam_id, ids in ended.items():
            events += self.end(cam_id, ids, TRACKING_CHANGED if cam_id in enabled else CAMERA_REMOVED)
        for cam_id in [c for c in self._objects if c not in enabled]:   # untracked before, too
            events += self.end_camera(cam_id, CAMERA_REMOVED)
        self.configure(cfg)
        return events

    def configure(self, cfg: Config) -> None:
        self._zones = {cam.id: {n: list(p) for n, p in cam.zones.items()} for cam in cfg.cameras}
        self._settings = {cam.id: cfg.tracking_for(cam.id) for cam in cfg.cameras}

    def live(self, camera_id: str) -> tuple[int, ...]:
        return tuple(self._objects.get(camera_id, {}))

    def on_frame(self, tracked: TrackedFrame, image: np.ndarray | None = None) -> list[ObjectEvent]:
        """Events of one tracked frame; ``image`` is that frame's picture (for the end JPEG)."""
        res = tracked.result
        objs = self._objects.setdefault(res.camera_id, {})
        zones = self._zones.get(res.camera_id, {})
        settings = self._settings.get(res.camera_id)
        interval = settings.update_interval_s if settings else 0.0
        events: list[ObjectEvent] = []
        for det in res.detections:
            if det.track_id is None:
                continue
            here = frozenset(n for n, poly in zones.items() if point_in_polygon(bottom_center(det.box), poly))
            obj = objs.get(det.track_id)
            if obj is None:
                first_ts = det.first_seen_ts if det.first_seen_ts is not None else res.capture_ts
                first_mono = res.capture_mono - (det.age_s or 0.0)
                obj = objs[det.track_id] = _Object(
                    det.track_id, first_ts, first_mono, res.capture_ts, res.capture_mono, det,
                    self._sighting(det, res.capture_ts), image, here, {n: 0.0 for n in here}, res.capture_mono)
                events.append(self._event("start", res.camera_id, obj))
                continue
            for name in obj.in_zones & here:
                obj.zones[name] += res.capture_mono - obj.last_mono
            for name in here - obj.zones.keys():
                obj.zones[name] = 0.0
            obj.in_zones, obj.last, obj.last_ts, obj.last_mono = here, det, res.capture_ts, res.capture_mono
            if det.confidence > obj.best.confidence:
                obj.best, obj.best_image = self._sighting(det, res.capture_ts), image
            if interval > 0 and res.capture_mono - obj.last_update_mono >= interval:
                obj.last_update_mono = res.capture_mono
                events.append(self._event("update", res.camera_id, obj))
        events += self.end(res.camera_id, tracked.ended, LOST)
        return events

    def end(self, camera_id: str, track_ids: tuple[int, ...] | list[int], reason: str) -> list[ObjectEvent]:
        """End these objects of one camera (ids it does not know are ignored)."""
        objs = self._objects.get(camera_id, {})
        out = []
        for tid in track_ids:
            obj = objs.pop(tid, None)
            if obj is not None:
                out.append(self._event("end", camera_id, obj, reason))
        if not objs:
            self._objects.pop(camera_id, None)
        return out

    def end_camera(self, camera_id: str, reason: str) -> list[ObjectEvent]:
        """Every object of the camera ends: it went offline, was removed, or tracks anew."""
        return self.end(camera_id, list(self._objects.get(camera_id, {})), reason)

    def close(self, reason: str = SHUTDOWN) -> list[ObjectEvent]:
        out: list[ObjectEvent] = []
        for cam in list(self._objects):
            out += self.end_camera(cam, reason)
        return out

    @staticmethod
    def _sighting(det: Detection, ts: float) -> Sighting:
        return Sighting(det.confidence, det.box, det.class_id, det.label, ts)

    def _event(self, kind: EventKind, camera_id: str, obj: _Object, reason: str | None = None) -> ObjectEvent:
        jpeg = None
        if kind == "end" and obj.best_image is not None:
            settings = self._settings.get(camera_id)
            limit = settings.snapshot_max_bytes if settings else 0
            if limit > 0:
                jpeg = self._encode(obj.best_image, obj.best.box, limit)
            obj.best_image = None
        return ObjectEvent(kind, camera_id, obj.track_id, obj.last.class_id, obj.last.label, obj.first_ts,
                           obj.last_ts, obj.last_mono - obj.first_mono, obj.best, dict(obj.zones),
                           tuple(sorted(obj.in_zones)), reason, jpeg)
