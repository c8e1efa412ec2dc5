"""The scheduler's second input: on-demand requests waiting for a batch.

Transport-agnostic: every front door (the ZeroMQ ROUTER in ``streamd.service.requests``, the
Redis stream a fleet shares in ``streamd.service.redis_requests``) offers ``Request`` records
here, and the batch policy takes them beside the cameras' ring queues. The queue shares the
cameras' Condition, so a free worker wakes for a request as it does for a frame.
"""

from __future__ import annotations

import heapq
import itertools
import threading

from ..entities import Request


class RequestQueue:
    """Bounded priority queue: highest priority first, then oldest."""

    def __init__(self, size: int, ready: threading.Condition) -> None:
        self._heap: list[tuple[int, int, Request]] = []
        self.size = size
        self._ready = ready
        self._seq = itertools.count()

    def offer(self, req: Request) -> bool:
        """Queue ``req``; False (not taken) when the queue is full."""
        with self._ready:
            if len(self._heap) >= self.size:
                return False
            heapq.heappush(self._heap, (-req.priority, next(self._seq), req))
            self._ready.notify()
            return True

    def pop_locked(self) -> Request | None:
        return heapq.heappop(self._heap)[2] if self._heap else None

    def peek_locked(self) -> Request | None:
        """The request ``pop_locked`` would return, left in place."""
        return self._heap[0][2] if self._heap else None

    def holds(self, req: Request) -> bool:
        """Whether ``req`` is still waiting (not yet taken into a batch)."""
        with self._ready:
            return any(r is req for _, _, r in self._heap)

    def take_expired(self, older_than_mono: float) -> list[Request]:
        """Remove and return the requests accepted before ``older_than_mono``."""
        with self._ready:
            expired = [r for _, _, r in self._heap if r.received_mono < older_than_mono]
            if expired:
                self._heap = [e for e in self._heap if e[2].received_mono >= older_than_mono]
                heapq.heapify(self._heap)
            return expired

    def drain(self) -> list[Request]:
        with self._ready:
            out = [r for _, _, r in self._heap]
            self._heap.clear()
            return out

    def __len__(self) -> int:
        return len(self._heap)
