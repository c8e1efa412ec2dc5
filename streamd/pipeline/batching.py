"""What goes into the next batch: the batch-closing policy a free worker applies.

Round-robin over the cameras' ring queues (one frame per camera per pass, so no camera can
crowd out the others), the on-demand requests' share, one input shape per batch, and the
age budget: a frame joins only if the batch, as predicted, still finishes inside the
frame-age bound. The caller holds the queues' shared condition for every call here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Union

from ..backends.base import ModelInfo
from ..entities import Frame, Request
from .preprocess import net_shape_for
from .queues import QueueSet
from .requests import RequestQueue

Shape = tuple[int, int]   # (net_h, net_w)
Item = Union[Frame, Request]   # what a batch holds: camera frames and on-demand pictures


class InferenceTime:
    """Predicts a batch's inference time as ``k * images * pixels``, with ``k`` smoothed over
    the batches seen plus twice its smoothed deviation (the way TCP sizes its retransmit
    timer), so the prediction is one a batch rarely exceeds: a batch that runs longer than
    predicted finishes past the age bound and its frames are inferred for nothing. Linear
    in the batch size, which is right on a CPU and errs on the long side on a GPU (where
    bigger batches cost less per image): batches then close a little early, never late."""

    def __init__(self, seconds_per_image: float | None = None, pixels: int = 0) -> None:
        self._k = seconds_per_image / pixels if seconds_per_image and pixels else 0.0
        self._dev = 0.25 * self._k          # until measured: a quarter either way
        self._lock = threading.Lock()

    def estimate(self, n: int, shape: Shape) -> float:
        return (self._k + 2.0 * self._dev) * n * shape[0] * shape[1]

    def observe(self, n: int, shape: Shape, seconds: float) -> None:
        k = seconds / max(1, n * shape[0] * shape[1])
        with self._lock:
            if not self._k:
                self._k, self._dev = k, 0.25 * k
            else:
                self._dev = 0.75 * self._dev + 0.25 * abs(k - self._k)
                self._k = 0.875 * self._k + 0.125 * k


@dataclass
class Draft:
    """A batch being closed: what it holds and the latest moment it may finish."""

    items: list[Item] = field(default_factory=list)
    shape: Shape | None = None
    finish_by: float = float("inf")      # monotonic; the tightest camera frame's age bound
    full: bool = False                   # the age budget admits no further frame


class BatchPolicy:
    """Fills a ``Draft`` from the camera queues and the request queue (caller holds the lock)."""

    def __init__(self, queues: QueueSet, requests: RequestQueue | None, request_share: float, max_batch: int,
                 info: ModelInfo, timing: InferenceTime, on_frame_dropped: Callable[[str, str], None]) -> None:
        self.queues = queues
        self.requests = requests
        self.request_share = request_share
        self.max_batch = max_batch
        self._info = info
        self._dynamic_hw = info.dynamic_hw
        self._stride = info.stride
        self.timing = timing
        self.on_frame_dropped = on_frame_dropped
        self.post_s = 0.0                    # smoothed postprocess time of one batch (the post thread sets it)
        self._rr_next = 0
        self._share_req = self._share_cam = 0.0   # recent slots of contended batches, by side

    def net_shape(self, item: Item) -> Shape:
        """The input shape ``item`` is inferred at: its own aspect on a model that takes any
        H x W, else the model's one size."""
        if not self._dynamic_hw:
            return self._info.input_hw
        w, h = item.size
        return net_shape_for(w, h, self._info.input_hw, self._stride)

    def _admit(self, d: Draft, item: Item, now: float, bound: float) -> str:
        """'take', 'drop' (too old to be published in time even alone), 'skip' (another
        shape: left for another batch) or 'full' (would make the batch finish too late).
        A request has no age bound of its own (its front door times it out)."""
        shape = self.net_shape(item)
        if d.shape is not None and shape != d.shape:
            return "skip"
        camera = isinstance(item, Frame)
        finish_by = min(d.finish_by, item.capture_mono + bound) if camera else d.finish_by
        done = now + self.timing.estimate(len(d.items) + 1, shape) + self.post_s
        if done <= finish_by:
            return "take"
        if camera and item.capture_mono + bound < now + self.timing.estimate(1, shape) + self.post_s:
            return "drop"
        if not d.items:
            return "take"        # a batch of one the estimate doubts: inferring beats waiting
        return "full"

    def _add(self, d: Draft, item: Item, bound: float) -> None:
        if d.shape is None:
            d.shape = self.net_shape(item)
        if isinstance(item, Frame):
            d.finish_by = min(d.finish_by, item.capture_mono + bound)
        d.items.append(item)

    def _take_round_robin(self, d: Draft, want: int, now: float, bound: float) -> None:
        """Take up to ``want`` frames, one per camera per pass, starting after the camera
        that went first last time, so no camera can crowd out the others."""
        order = self.queues.order
        if not order:
            return
        start = self._rr_next % len(order)
        taken = 0
        progressed = True
        while taken < want and progressed and not d.full:
            progressed = False
            for k in range(len(order)):
                if taken >= want or d.full:
                    break
                cam = order[(start + k) % len(order)]
                q = self.queues.get(cam)
                while q is not None:
                    frame = q.peek_locked()
                    if frame is None:
                        break
                    verdict = self._admit(d, frame, now, bound)
                    if verdict == "skip":
                        break
                    if verdict == "full":
                        d.full = True
                        break
                    q.pop_locked(now)
                    if verdict == "drop":
                        self.on_frame_dropped(cam, "too_old")
                        continue
                    self._add(d, frame, bound)
                    taken += 1
                    progressed = True
                    self._rr_next = (start + k + 1) % len(order)
                    break

    def _take_requests(self, d: Draft, want: int, now: float, bound: float) -> None:
        assert self.requests is not None
        while want > 0 and not d.full:
            req = self.requests.peek_locked()
            if req is None:
                return
            verdict = self._admit(d, req, now, bound)
            if verdict == "skip":
                return
            if verdict == "full":
                d.full = True
                return
            self.requests.pop_locked()
            self._add(d, req, bound)
            want -= 1

    def take(self, d: Draft, now: float, bound: float) -> None:
        """Fill the free slots. While both wait, requests get ``request_share`` of the slots
        (at least one per batch they lead) and cameras the rest, so neither can starve the
        other; whatever one side leaves unused, the other may take. A batch holds one input
        shape, so when a request's picture and the cameras differ in shape, whole batches
        alternate between them in the same proportion."""
        want = self.max_batch - len(d.items)
        reqs = self.requests
        if reqs is None or not len(reqs):
            self._take_round_robin(d, want, now, bound)
            return
        cameras_waiting = any(len(q) for q in (self.queues.get(c) for c in self.queues.order) if q)
        if not cameras_waiting:
            self._take_requests(d, want, now, bound)
            return
        reserve = max(1, round(self.request_share * self.max_batch))
        start = len(d.items)
        requests_lead = isinstance(d.items[0], Request) if d.items else \
            self._share_req <= self.request_share * (self._share_req + self._share_cam)
        if requests_lead:
            self._take_requests(d, min(want, reserve), now, bound)
            self._take_round_robin(d, want - (len(d.items) - start), now, bound)
        else:
            self._take_round_robin(d, max(1, want - reserve), now, bound)
            self._take_requests(d, want - (len(d.items) - start), now, bound)
            self._take_round_robin(d, want - (len(d.items) - start), now, bound)
        self._take_requests(d, want - (len(d.items) - start), now, bound)

    def note_share(self, d: Draft) -> None:
        """Remember (with a fading memory) how the slots of batches went while both sides waited."""
        n_req = sum(1 for it in d.items if isinstance(it, Request))
        if self.requests is None or (n_req == 0 and not len(self.requests)):
            return
        self._share_req = 0.9 * self._share_req + n_req
        self._share_cam = 0.9 * self._share_cam + len(d.items) - n_req
