"""Per-camera multi-object tracking after NMS: a track id and per-object fields on detections.

The tracker is ByteTrack from Roboflow's ``trackers`` (the optional ``tracking`` extra), not a
hand-written one. It is not the smallest install: ``edgefirst-tracker`` needs only numpy,
while ``trackers`` brings supervision, SciPy and PyAV. But that one's filter, measured here,
lags a person walking at 5 frames/s by a box width and loses the track, and ``trackers``
predicts by *elapsed time* (``update(..., timestamp=)``) and expires lost tracks by seconds.
Elapsed time is what this daemon needs, because frames are
dropped to stay fresh (a camera at 15 frames/s may be inferred at 4, unevenly), so the
tracker is given each frame's capture time, never a frame count. ``trackers`` counts its
lost-track buffer in frames at 30 frames/s and, with timestamps, turns it into
``buffer / 30`` seconds; ``track_buffer_s`` is converted to that unit below.

Every detection is kept: one that continues no track (too weak to start one, or a track not
yet confirmed) has ``track_id`` None. Track ids count up from 1 per camera and are never
reused while the daemon runs, also not after a camera's tracks were reset.

One thread (the output stage's) calls a :class:`Tracking`; it holds no lock.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..config import Config, TrackingConfig
from ..entities import Detection, FrameResult
from ..errors import StreamdError

log = logging.getLogger(__name__)

# ``trackers`` states its lost-track buffer in frames of a 30 frames/s video.
_LIBRARY_FPS = 30.0
# What one step of the Kalman filter stands for: with timestamps the library predicts
# ``elapsed x this`` steps. At its default (30 per second) the velocity follows every
# box's noise within a few frames: the boxes of a person being hidden, cut short by the one
# in front, then bend the predicted path so far that the person stepping out again gets a
# new id. On the ground-truth sequences (tools/make_tracking_media.py) 5 to 15 steps per
# second keep the ids through the crossing at 5 and at 15 frames/s; 20 and 30 do not.
_KALMAN_STEPS_PER_S = 10.0


class TrackingError(StreamdError):
    """The tracker library is missing or refused a frame's detections."""


@dataclass(frozen=True, slots=True)
class TrackedFrame:
    """One frame's result after tracking, with the tracks that ended at it."""

    result: FrameResult               # detections carry track_id, first_seen_ts, age_s
    ended: tuple[int, ...] = ()       # tracks dropped at this frame: not seen for track_buffer_s


@dataclass(slots=True)
class _Track:
    first_ts: float     # wall clock, for subscribers
    first_mono: float   # monotonic, for ages


TrackerFactory = Callable[[TrackingConfig], Any]


def bytetrack_factory(cfg: TrackingConfig) -> Any:
    """A ``trackers.ByteTrackTracker`` set up from ``cfg``."""
    try:
        from trackers import ByteTrackTracker
        # Centre, area and aspect (SORT's state): the aspect has no velocity, so a box cut
        # short by an occluder moves the predicted centre less than x1, y1, x2, y2 would.
        from trackers.utils.state_representations import XCYCSRStateEstimator
    except ImportError as exc:
        raise TrackingError(f"tracker 'bytetrack' needs the 'trackers' package "
                            f"(pip install 'streamd[tracking]'): {exc}") from None
    return ByteTrackTracker(
        lost_track_buffer=max(1, math.ceil(cfg.track_buffer_s * _LIBRARY_FPS)),
        frame_rate=_KALMAN_STEPS_PER_S,
        state_estimator_class=XCYCSRStateEstimator,
        track_activation_threshold=cfg.new_track_conf,
        high_conf_det_threshold=cfg.high_conf,
        minimum_iou_threshold=cfg.match_iou,
        minimum_consecutive_frames=cfg.confirm_frames,
    )


class CameraTracker:
    """One camera's tracker: track ids on its detections, in capture-time order."""

    def __init__(self, camera_id: str, cfg: TrackingConfig,
                 factory: TrackerFactory = bytetrack_factory, first_id: int = 1) -> None:
        self.camera_id = camera_id
        self.cfg = cfg
        self._factory = factory
        self._lib = factory(cfg)
        import supervision as sv   # comes with trackers; its detections record is the library's input
        self._sv = sv
        self._tracks: dict[int, _Track] = {}   # library id -> when first confirmed
        self._ids: dict[int, int] = {}         # library id -> our id (ours never repeat)
        self.next_id = first_id
        self._last_mono = -math.inf
        self.errors = 0

    def update(self, result: FrameResult) -> TrackedFrame:
        if result.capture_mono <= self._last_mono:
            # Results reach the output stage in capture order; a late one cannot be placed in
            # the tracks' history, so it goes out untracked rather than corrupting it.
            return TrackedFrame(result)
        self._last_mono = result.capture_mono
        try:
            lib_ids = self._associate(result.detections, result.capture_mono)
        except Exception as exc:  # noqa: BLE001 - a library failure must not take the camera down
            self.errors += 1
            log.warning("camera=%s tracking failed on frame %d, published untracked: %s",
                        self.camera_id, result.frame_no, exc)
            return TrackedFrame(result)
        dets = tuple(self._with_track(d, lid, result) for d, lid in zip(result.detections, lib_ids))
        return TrackedFrame(dataclasses.replace(result, detections=dets), self._expired())

    def reset(self, until_mono: float = -math.inf) -> tuple[int, ...]:
        """Forget every track (the camera went away); returns the ids that ended. Results
        captured at or before ``until_mono`` (still in flight when the camera went offline)
        then go out untracked: their objects have already ended."""
        ended = tuple(self._ids[lid] for lid in self._tracks)
        self._lib = self._factory(self.cfg)
        self._tracks.clear()
        self._ids.clear()
        self._last_mono = until_mono
        return ended

    def live(self) -> tuple[int, ...]:
        return tuple(self._ids[lid] for lid in self._tracks)

    def _associate(self, dets: tuple[Detection, ...], mono: float) -> list[int]:
        n = len(dets)
        # Flat fromiter calls, not np.array over a list of tuples: at 20 objects the
        # per-frame Python around the library's update is a tenth of its cost, and this is most of it.
        xyxy = np.fromiter((v for d in dets for v in d.box), np.float32, 4 * n).reshape(n, 4)
        if not np.isfinite(xyxy).all():
            raise TrackingError("a detection box is not finite")
        svd = self._sv.Detections(xyxy=xyxy, confidence=np.fromiter((d.confidence for d in dets), np.float32, n),
                                  class_id=np.fromiter((d.class_id for d in dets), np.int64, n),
                                  data={"row": np.arange(n)})
        out = self._lib.update(svd, timestamp=mono)
        ids = [-1] * n
        if n == 0:   # still an update: it ages the tracks (an empty result carries no "row")
            return ids
        for row, tid in zip(out.data["row"].tolist(), out.tracker_id.tolist()):
            ids[row] = tid
        return ids

    def _with_track(self, det: Detection, lid: int, result: FrameResult) -> Detection:
        if lid < 0:
            return det
        track = self._tracks.get(lid)
        if track is None:
            track = self._tracks[lid] = _Track(result.capture_ts, result.capture_mono)
            self._ids[lid] = self.next_id
            self.next_id += 1
        # The constructor, not dataclasses.replace: replace re-reads every field by name and
        # cost as much as the rest of this wrapper together (20 objects, every frame).
        return Detection(class_id=det.class_id, label=det.label, confidence=det.confidence, box=det.box,
                         track_id=self._ids[lid], first_seen_ts=track.first_ts,
                         age_s=round(result.capture_mono - track.first_mono, 3))

    def _expired(self) -> tuple[int, ...]:
        alive = {t.tracker_id for t in self._lib.tracks}
        gone = [lid for lid in self._tracks if lid not in alive]
        for lid in gone:
            del self._tracks[lid]
        return tuple(self._ids.pop(lid) for lid in gone)


class Tracking:
    """Every camera's tracker, built from the config and rebuilt for cameras a reload changes."""

    def __init__(self, cfg: Config, factory: TrackerFactory = bytetrack_factory) -> None:
        self._factory = factory
        self._cams: dict[str, CameraTracker] = {}
        self._next_ids: dict[str, int] = {}   # a camera tracked again goes on counting
        self.configure(cfg)

    def configure(self, cfg: Config) -> dict[str, tuple[int, ...]]:
        """Apply a (re)loaded config. Cameras removed, untracked now, or tracked with other
        settings lose their tracks: returns the ended ids per such camera."""
        ended: dict[str, tuple[int, ...]] = {}
        wanted = {cam.id: cfg.tracking_for(cam.id) for cam in cfg.cameras if cam.enabled}
        for cam_id in list(self._cams):
            if wanted.get(cam_id) != self._cams[cam_id].cfg:
                cam = self._cams.pop(cam_id)
                ended[cam_id] = cam.reset()
                self._next_ids[cam_id] = cam.next_id
        for cam_id, tcfg in wanted.items():
            if tcfg.tracker != "off" and cam_id not in self._cams:
                self._cams[cam_id] = CameraTracker(cam_id, tcfg, self._factory, self._next_ids.get(cam_id, 1))
        return {k: v for k, v in ended.items() if v}

    def tracked(self, camera_id: str) -> bool:
        return camera_id in self._cams

    def update(self, result: FrameResult) -> TrackedFrame:
        cam = self._cams.get(result.camera_id)
        return cam.update(result) if cam is not None else TrackedFrame(result)

    def reset(self, camera_id: str, until_mono: float = -math.inf) -> tuple[int, ...]:
        """The camera went offline: its tracks end (a new object when it is back)."""
        cam = self._cams.get(camera_id)
        return cam.reset(until_mono) if cam is not None else ()

    def counters(self) -> dict[str, dict[str, int]]:
        """Per tracked camera: objects alive now, ids handed out since the daemon started
        (counting on across a re-tracking, as the ids do) and frames published untracked
        because the library failed on them."""
        return {cid: {"live": len(c.live()), "total": c.next_id - 1, "errors": c.errors}
                for cid, c in self._cams.items()}


def check_tracker_available(cfg: Config) -> None:
    """Raise :class:`TrackingError` when a camera of ``cfg`` asks for a tracker this install
    lacks: a reload checks it before it changes anything."""
    wanted = any(cfg.tracking_for(cam.id).tracker == "bytetrack" for cam in cfg.cameras if cam.enabled)
    if wanted and importlib.util.find_spec("trackers") is None:
        raise TrackingError("tracker 'bytetrack' needs the 'trackers' package (pip install 'streamd[tracking]')")
