"""Per-camera bounded ring queues that drop the oldest frame when full.

A live camera is only worth its newest frames: when inference falls behind, the oldest
frame is thrown away (and counted) so what reaches the model stays fresh. All queues of
one daemon share a ``Condition`` so the scheduler sleeps until *any* camera has a frame.
"""

from __future__ import annotations

import threading
from collections import deque

from .entities import Frame


class RingQueue:
    def __init__(self, depth: int, ready: threading.Condition) -> None:
        if depth < 1:
            raise ValueError("queue depth must be at least 1")
        self._frames: deque[Frame] = deque()
        self._depth = depth
        self._ready = ready
        self.dropped_full = 0      # frames thrown away because the queue was full

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

    def pop_locked(self) -> Frame | None:
        """Like ``pop`` for a caller already holding the shared condition."""
        return self._frames.popleft() if self._frames else None

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
