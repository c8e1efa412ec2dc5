"""Per-camera bounded ring queues that drop the oldest frame when full.

A live camera is only worth its newest frames: when inference falls behind, the oldest
frame is thrown away (and counted) so what reaches the model stays fresh. All queues of
one daemon share a ``Condition`` so the scheduler sleeps until *any* camera has a frame.

Each queue also learns how often the scheduler takes from it, so its decoder can tell
whether a new frame is worth converting at all (``wants_frame``): at 640 on a small CPU a
camera is served perhaps one frame in six, and converting and copying the other five only
takes CPU from inference.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from ..entities import Frame


class RingQueue:
    def __init__(self, depth: int, ready: threading.Condition) -> None:
        if depth < 1:
            raise ValueError("queue depth must be at least 1")
        self._frames: deque[Frame] = deque()
        self._depth = depth
        self._ready = ready
        self.dropped_full = 0      # frames thrown away because the queue was full
        self.taken = 0             # frames the scheduler took
        self.last_take_mono = 0.0
        self.serve_interval_s = 0.0   # smoothed time between two takes (0: not known yet)

    @property
    def depth(self) -> int:
        return self._depth

    def put(self, frame: Frame) -> Frame | None:
        """Append ``frame``; return the frame it pushed out, if any."""
        with self._ready:
            dropped = None
            if len(self._frames) >= self._depth:
                dropped = self._frames.popleft()
                self.dropped_full += 1
            self._frames.append(frame)
            self._ready.notify()
        return dropped

    def pop(self) -> Frame | None:
        """The oldest frame, or None. Caller holds no lock; this takes the shared one."""
        with self._ready:
            return self._frames.popleft() if self._frames else None

    def pop_locked(self, now: float | None = None) -> Frame | None:
        """Like ``pop`` for a caller already holding the shared condition; a frame taken
        this way counts as served (it teaches ``wants_frame`` the camera's serve rate)."""
        if not self._frames:
            return None
        now = time.monotonic() if now is None else now
        if self.last_take_mono:
            gap = now - self.last_take_mono
            # Smoothed, but quick to follow a change of load (cameras added, model swapped).
            self.serve_interval_s = gap if not self.serve_interval_s else 0.7 * self.serve_interval_s + 0.3 * gap
        self.last_take_mono = now
        self.taken += 1
        return self._frames.popleft()

    def peek_locked(self) -> Frame | None:
        """The frame ``pop_locked`` would return, left in place."""
        return self._frames[0] if self._frames else None

    def wants_frame(self, now: float, frame_interval_s: float) -> bool:
        """Should the decoder convert and queue the frame it just decoded?

        Yes while the queue is empty (a frame is always ready for the next batch), while the
        serve rate is not known yet, and when the next take is due within about two frames
        (so the frame taken is the newest one). No when the queue already holds a frame and
        the next take is far off, or when nobody has taken anything for a long while (an
        idle pipeline costs decoding only). Lock-free: a stale answer costs one frame."""
        if not self._frames or not self.serve_interval_s:
            return True
        since = now - self.last_take_mono
        if since > 4 * self.serve_interval_s + 1.0:
            return False
        return since >= 0.75 * self.serve_interval_s - 2.0 * frame_interval_s

    def clear(self) -> int:
        with self._ready:
            n = len(self._frames)
            self._frames.clear()
            return n

    def __len__(self) -> int:
        return len(self._frames)


class QueueSet:
    """All cameras' queues plus the one Condition they share.

    Owned by the daemon, not by the pipeline, so the pipeline can be rebuilt (new model,
    new batch size) while cameras keep filling their queues.
    """

    def __init__(self) -> None:
        self.ready = threading.Condition()
        self._queues: dict[str, RingQueue] = {}
        self.order: list[str] = []     # round-robin order; rebuilt when cameras change

    def add(self, camera_id: str, depth: int) -> RingQueue:
        with self.ready:
            q = RingQueue(depth, self.ready)
            self._queues[camera_id] = q
            self.order = list(self._queues)
            return q

    def remove(self, camera_id: str) -> None:
        with self.ready:
            self._queues.pop(camera_id, None)
            self.order = list(self._queues)

    def get(self, camera_id: str) -> RingQueue | None:
        return self._queues.get(camera_id)

    def depths(self) -> dict[str, int]:
        with self.ready:
            return {k: len(q) for k, q in self._queues.items()}

    def wake_all(self) -> None:
        with self.ready:
            self.ready.notify_all()
