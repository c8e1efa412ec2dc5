"""Objects in the output stage: each tracked camera's results through its tracker, and the
objects' lifecycle events as ``event`` messages.

The post thread calls :meth:`TrackedObjects.frame` for every camera result; the cameras'
health callbacks (decoder threads, the supervisor) end a camera's objects when it goes
offline, a reload ends those of cameras it removes or changes, and shutdown ends the rest.
Those callers run on other threads, so one lock guards the tracker and the event state; it
is held for one frame's tracking (about a millisecond) or one camera's ends, never across I/O.
"""

from __future__ import annotations

import threading
import time
from typing import Iterable

from ...config import Config
from ...entities import Frame, FrameResult
from ...outputs.base import Outbound
from ..events import CAMERA_OFFLINE, SHUTDOWN, ObjectEvent, ObjectEvents
from ..tracking import Tracking, TrackerFactory, bytetrack_factory, check_tracker_available

__all__ = ["TrackedObjects", "check_tracker_available", "event_message"]

# A reload changed the camera's own settings (its URL, say): it restarts, and so do its objects.
CAMERA_CHANGED = "camera_changed"
# Health states in which a camera delivers no frames: its objects cannot be followed across
# the gap, so they end now rather than linger until it is back.
OFFLINE_STATES = frozenset({"lost", "stalled", "reconnecting", "ended", "stopped"})


def event_message(ev: ObjectEvent) -> Outbound:
    """An object event as the ``cam/<id>/event`` message; an ``end``'s best frame as part 2."""
    return Outbound("event", ev.camera_id, ev.body(), attachment=ev.jpeg)


class TrackedObjects:
    def __init__(self, cfg: Config, factory: TrackerFactory = bytetrack_factory) -> None:
        self._lock = threading.Lock()
        self._tracking = Tracking(cfg, factory)
        self._events = ObjectEvents(cfg)
        self._closed = False
        self._stopping = False

    def frame(self, result: FrameResult, frame: Frame | None) -> tuple[FrameResult, list[Outbound]]:
        """The result with track fields on its detections, and the events it caused."""
        with self._lock:
            if self._closed or not self._tracking.tracked(result.camera_id):
                return result, []
            tracked = self._tracking.update(result)
            events = self._events.on_frame(tracked, frame.image if frame is not None else None)
        return tracked.result, _messages(events)

    def camera_state(self, camera_id: str, state: str) -> list[Outbound]:
        """A camera's health changed: offline ends its objects (``camera_offline``)."""
        if state not in OFFLINE_STATES:
            return []
        with self._lock:
            if self._closed or self._stopping:
                return []
            # Frames captured before now are from before the outage: their objects ended here.
            self._tracking.reset(camera_id, time.monotonic())
            return _messages(self._events.end_camera(camera_id, CAMERA_OFFLINE))

    def reconfigure(self, cfg: Config, restarted: Iterable[str]) -> list[Outbound]:
        """A reload: new tracking settings and zones; cameras removed, re-tracked or
        ``restarted`` (their own settings changed) end their objects with the reason."""
        with self._lock:
            ended = self._tracking.configure(cfg)
            events = self._events.reconfigure(cfg, ended)
            now = time.monotonic()
            for cam_id in restarted:
                self._tracking.reset(cam_id, now)   # its frames still in flight are from before
                events += self._events.end_camera(cam_id, CAMERA_CHANGED)
        return _messages(events)

    def shutting_down(self) -> None:
        """Cameras are about to stop for shutdown: their objects end at :meth:`close` with
        ``shutdown`` once the results in flight are out, not as ``camera_offline``."""
        with self._lock:
            self._stopping = True

    def close(self) -> list[Outbound]:
        """Shutdown: every object still alive ends (``shutdown``); nothing is tracked after."""
        with self._lock:
            self._closed = True
            return _messages(self._events.close(SHUTDOWN))

    def counters(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return self._tracking.counters()


def _messages(events: list[ObjectEvent]) -> list[Outbound]:
    return [event_message(ev) for ev in events]
