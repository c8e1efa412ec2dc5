"""Cross-camera batching onto a pool of inference workers, and one postprocess thread.

    worker threads     one per backend in the pool. A worker that is free closes its next
      (N of them)      batch right then (late binding) by the policy in ``batching``:
                       round-robin over the cameras' ring queues, newest frames, one frame
                       per camera per pass, frames of one input shape, and only as many as
                       can still be published inside the frame-age bound; then it
                       letterboxes into its own buffer and infers.
    post thread        decode + NMS, boxes back to frame pixels, the age bound checked once
                       more, results handed to the sink (the output stage) in the order
                       batches were closed: camera results and request results apart.

Two inputs: the cameras' ring queues and the on-demand ``RequestQueue``; a batch may hold
both (``batching`` decides the share).

Closing a batch only when a worker can run it at once means no frame waits in a prepared
batch behind another inference: what is inferred is as fresh as the cameras allow. A batch
never waits for every camera either: one slow or dead camera costs nothing but its own slot.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from ..backends.base import Backend
from ..backends.pool import BackendPool
from ..config import SchedulerConfig
from ..entities import Detection, Frame, FrameResult, Request, RequestResult
from .batching import BatchPolicy, Draft, InferenceTime, Item, Shape
from .postprocess import PostprocessParams, postprocess
from .preprocess import BatchBuffer, Letterbox
from .queues import QueueSet, RingQueue
from .requests import RequestQueue

log = logging.getLogger("streamd.scheduler")

_POLL_S = 0.1          # every wait in these threads wakes at least this often to see its stop Event
_MAX_SHAPES = 8        # letterbox buffers kept per worker (one per input shape in use)
_HANDOVER_S = 0.01     # kept from the age bound for the publisher's thread to send


@dataclass
class Batch:
    ticket: int                          # order in which batches were closed
    worker: int
    items: list[Item]                    # camera frames and requests
    shape: Shape
    t_closed: float                      # monotonic: batch closed (frames taken)
    letterboxes: list[Letterbox] = field(default_factory=list)
    t_preprocessed: float = 0.0
    t_infer_start: float = 0.0
    t_inferred: float = 0.0
    outputs: np.ndarray | None = None
    failed: bool = False


@dataclass
class SchedulerStats:
    batches: int = 0
    frames: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    worker_batches: dict[int, int] = field(default_factory=dict)   # worker index -> batches run
    infer_s_total: float = 0.0
    preprocess_s_total: float = 0.0
    post_s_total: float = 0.0
    too_old_at_take: int = 0
    too_old_at_publish: int = 0
    last_progress_mono: float = field(default_factory=time.monotonic)   # watchdog evidence
    queue_s: deque[float] = field(default_factory=lambda: deque(maxlen=2048))
    infer_s: deque[float] = field(default_factory=lambda: deque(maxlen=512))


class ResultSink(Protocol):
    """Where the post thread hands results (the output stage); called on the post thread only."""

    def results(self, results: list[FrameResult], frames: list[Frame]) -> None:
        """Camera results, with the frames they came from (for snapshots)."""

    def request_results(self, results: list[RequestResult]) -> None:
        """Results of on-demand requests."""


class _Worker(threading.Thread):
    """A named thread with a stop Event that records its first error instead of dying quietly."""

    def __init__(self, name: str, fn: Callable[[threading.Event], None]) -> None:
        super().__init__(name=name, daemon=True)
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self._fn = fn

    def run(self) -> None:
        try:
            self._fn(self.stop_event)
        except BaseException as exc:  # noqa: BLE001 - handed to the supervisor
            self.error = exc
            log.exception("%s thread failed", self.name)

    def stop(self) -> None:
        self.stop_event.set()


@dataclass
class _WorkerState:
    index: int
    backend: Backend
    buffers: dict[Shape, BatchBuffer] = field(default_factory=dict)
    alive_mono: float = field(default_factory=time.monotonic)
    infer_since: float = 0.0             # monotonic start of the inference in progress (0: none)


class Pipeline:
    """Owns the worker and post threads; the daemon adds/removes camera queues and reads stats."""

    def __init__(self, backend: Backend | BackendPool, cfg: SchedulerConfig, params: PostprocessParams,
                 sink: ResultSink, on_frame_dropped: Callable[[str, str], None] | None = None,
                 queues: QueueSet | None = None, requests: RequestQueue | None = None,
                 request_share: float = 0.25) -> None:
        self.pool = backend if isinstance(backend, BackendPool) else BackendPool.of(backend)
        self.cfg = cfg
        self.params = params
        self.sink = sink
        self.on_frame_dropped = on_frame_dropped or (lambda cam, cause: None)
        info = self.pool.info
        self.info = info
        self.max_batch = min(cfg.max_batch, info.batch_max)
        self.queues = queues or QueueSet()
        self.ready = self.queues.ready
        self._tickets = itertools.count()
        self._dynamic_hw = info.dynamic_hw
        h, w = info.input_hw
        self.timing = InferenceTime(self.pool.seconds_per_image, h * w)
        self.policy = BatchPolicy(self.queues, requests, request_share, self.max_batch, info, self.timing,
                                  self._dropped_at_take)
        self._bound_warned = False
        self.stats = SchedulerStats()
        self.inferred_per_camera: dict[str, int] = {}
        self._post_alive_mono = time.monotonic()
        self._workers = [_WorkerState(i, b) for i, b in enumerate(self.pool.backends)]
        self._to_post: queue.Queue[Batch] = queue.Queue(2 * len(self._workers) + 2)
        self.threads: list[_Worker] = [
            *(_Worker(f"infer-{w.index}", lambda stop, w=w: self._worker_loop(w, stop)) for w in self._workers),
            _Worker("postprocess", self._post_loop),
        ]

    # ---- cameras -------------------------------------------------------------------------
    def add_queue(self, camera_id: str, depth: int) -> RingQueue:
        return self.queues.add(camera_id, depth)

    def _dropped_at_take(self, camera_id: str, cause: str) -> None:
        self.stats.too_old_at_take += 1
        self.on_frame_dropped(camera_id, cause)

    # ---- the age bound ----------------------------------------------------------------------
    def age_bound_s(self) -> float:
        """Oldest a camera frame may be when its detections are published: the configured
        ``max_frame_age_ms``, unless this box cannot infer one picture in half of it; then
        twice one inference (said once in the log), so a slow box still publishes."""
        bound = self.cfg.max_frame_age_ms / 1000.0
        h, w = self.info.input_hw
        one = 2.0 * (self.timing.estimate(1, (h, w)) + self.policy.post_s)
        if one > bound:
            if not self._bound_warned:
                self._bound_warned = True
                log.warning("scheduler.max_frame_age_ms=%.0f is less than two inference times on this box "
                            "(%.0f ms): frames up to that age are published. Use a smaller imgsz, a faster "
                            "backend, or raise max_frame_age_ms.", self.cfg.max_frame_age_ms, 1000 * one)
            return one
        return bound

    # ---- liveness (systemd watchdog evidence) -------------------------------------------------
    def progress_ok(self, max_stall_s: float, now: float | None = None) -> tuple[bool, str]:
        """True while every stage thread is turning over: idle workers and the post thread
        wake at least every _POLL_S, and no single inference has been running for longer
        than ``max_stall_s``. Idle cameras are not a failure; a hung stage is."""
        now = time.monotonic() if now is None else now
        for w in self._workers:
            since = w.infer_since
            if since and now - since > max_stall_s:
                return False, f"inference running for {now - since:.0f}s on worker {w.index} (hung?)"
            if not since and now - w.alive_mono > max_stall_s:
                return False, f"worker {w.index} made no progress for {now - w.alive_mono:.0f}s"
        if now - self._post_alive_mono > max_stall_s:
            return False, f"postprocess thread made no progress for {now - self._post_alive_mono:.0f}s"
        dead = [t.name for t in self.threads if t.ident is not None and not t.is_alive()]
        if dead:
            return False, f"{', '.join(dead)} thread ended"
        return True, ""

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop in data-flow order, so every batch already closed is inferred and handed to
        the sink: nothing accepted is lost on stop or model swap."""
        deadline = time.monotonic() + timeout
        workers, post = self.threads[:-1], self.threads[-1]
        for t in workers:
            t.stop()
        self.queues.wake_all()
        for t in workers:
            if t.ident is not None:
                t.join(max(0.0, deadline - time.monotonic()))
        post.stop()
        if post.ident is not None:
            post.join(max(0.0, deadline - time.monotonic()))

    def first_error(self) -> BaseException | None:
        return next((t.error for t in self.threads if t.error is not None), None)

    # ---- closing a batch (caller holds self.ready) --------------------------------------------
    def _close_batch(self, stop: threading.Event, worker: int) -> Batch | None:
        """Wait for frames, then close a batch: when it is full, when the age budget admits
        no more, or ``max_wait_ms`` after its first frame. Runs when this worker is free."""
        d = Draft()
        deadline: float | None = None
        bound = self.age_bound_s()
        with self.ready:
            while not stop.is_set():
                now = time.monotonic()
                self.policy.take(d, now, bound)
                if len(d.items) >= self.max_batch or d.full:
                    break
                if d.items and deadline is None:
                    deadline = now + self.cfg.max_wait_ms / 1000.0
                if deadline is not None and now >= deadline:
                    break
                self.ready.wait(_POLL_S if deadline is None else min(_POLL_S, deadline - now))
            if not d.items:
                return None
            # Tickets are handed out under the lock, in the order batches close: the post
            # thread publishes in this order, so a camera's frames never overtake each other.
            ticket = next(self._tickets)
            self.policy.note_share(d)
        assert d.shape is not None
        return Batch(ticket, worker, d.items, d.shape, time.monotonic())

    # ---- worker threads -----------------------------------------------------------------------
    def _buffer(self, w: _WorkerState, shape: Shape) -> BatchBuffer:
        buf = w.buffers.get(shape)
        if buf is None:
            if len(w.buffers) >= _MAX_SHAPES:
                w.buffers.pop(next(iter(w.buffers)))
            fit = self.info.input_hw if self._dynamic_hw else None
            buf = w.buffers[shape] = BatchBuffer(self.max_batch, shape[0], shape[1], fit=fit,
                                                 contract=self.info.input_contract)
        return buf

    def _worker_loop(self, w: _WorkerState, stop: threading.Event) -> None:
        while not stop.is_set():
            w.alive_mono = time.monotonic()
            batch = self._close_batch(stop, w.index)
            if batch is None:
                continue
            try:
                tensor, batch.letterboxes = self._buffer(w, batch.shape).fill(
                    [it.image for it in batch.items],
                    [it.source_size if isinstance(it, Frame) else None for it in batch.items])
                batch.t_preprocessed = batch.t_infer_start = w.infer_since = time.monotonic()
                batch.outputs = w.backend.infer(tensor)
                batch.t_inferred = time.monotonic()
            except BaseException:
                batch.failed = True
                raise
            finally:
                w.infer_since = 0.0
                w.alive_mono = time.monotonic()
                # Always handed over, failed or not: the post thread publishes in ticket
                # order and must never wait for a ticket that will not come.
                self._hand_over(batch)
            self._count(w, batch)

    def _count(self, w: _WorkerState, batch: Batch) -> None:
        n = len(batch.items)
        dt = batch.t_inferred - batch.t_infer_start
        self.timing.observe(n, batch.shape, dt)
        st = self.stats
        st.batches += 1
        st.frames += n
        st.batch_sizes[n] = st.batch_sizes.get(n, 0) + 1
        st.worker_batches[w.index] = st.worker_batches.get(w.index, 0) + 1
        st.infer_s_total += dt
        st.preprocess_s_total += batch.t_preprocessed - batch.t_closed
        st.infer_s.append(dt)
        for it in batch.items:
            st.queue_s.append(batch.t_closed - _since(it))
        st.last_progress_mono = batch.t_inferred

    def _hand_over(self, batch: Batch) -> None:
        while True:
            try:
                self._to_post.put(batch, timeout=_POLL_S)
                return
            except queue.Full:
                if not self.threads[-1].is_alive():
                    raise RuntimeError("postprocess thread is gone; cannot hand over results") from None

    # ---- post thread ------------------------------------------------------------------------
    def _postprocess(self, batch: Batch) -> list[tuple[Detection, ...]]:
        """Decode the batch; requests with their own thresholds are decoded with those."""
        assert batch.outputs is not None
        info = self.info
        groups = _split_params(batch.items, self.params)
        if len(groups) == 1:
            (params,) = groups
            return postprocess(batch.outputs, info.output_layout, batch.letterboxes, info.names, params)
        out: list[tuple[Detection, ...]] = [()] * len(batch.items)
        for params, idx in groups.items():
            dets = postprocess(batch.outputs[idx], info.output_layout, [batch.letterboxes[i] for i in idx],
                               info.names, params)
            for i, d in zip(idx, dets):
                out[i] = d
        return out

    def _post_loop(self, stop: threading.Event) -> None:
        waiting: dict[int, Batch] = {}       # finished out of order, waiting for an earlier ticket
        next_ticket = 0
        while True:
            self._post_alive_mono = time.monotonic()
            try:
                batch = self._to_post.get(timeout=_POLL_S)
            except queue.Empty:
                if stop.is_set():
                    # The workers are done; a ticket still missing belongs to a worker that
                    # hung, so publish what is here rather than hold it back.
                    for t in sorted(waiting):
                        self._publish(waiting.pop(t))
                    return
                continue
            waiting[batch.ticket] = batch
            while next_ticket in waiting:
                self._publish(waiting.pop(next_ticket))
                next_ticket += 1

    def _publish(self, batch: Batch) -> None:
        if batch.failed or batch.outputs is None:
            return      # the worker recorded the error; the supervisor restarts the daemon
        t0 = time.monotonic()
        dets = self._postprocess(batch)
        t1 = time.monotonic()
        self.stats.post_s_total += t1 - t0
        p = self.policy
        p.post_s = (t1 - t0) if not p.post_s else 0.8 * p.post_s + 0.2 * (t1 - t0)
        # Judged as the results leave for the publisher, with a few ms kept for its thread
        # to put them on the wire.
        bound = self.age_bound_s() - _HANDOVER_S
        now = time.monotonic()
        infer_s = batch.t_inferred - batch.t_infer_start
        results: list[FrameResult] = []
        frames: list[Frame] = []
        answered: list[RequestResult] = []
        for item, d in zip(batch.items, dets):
            if isinstance(item, Request):
                answered.append(RequestResult(item, d, queue_s=max(0.0, batch.t_closed - item.received_mono),
                                              infer_s=infer_s, done_mono=t1))
                continue
            frame = item
            self.inferred_per_camera[frame.camera_id] = self.inferred_per_camera.get(frame.camera_id, 0) + 1
            # The bound holds end to end: a frame the estimate let through but that is
            # too old by now is not published as if it were fresh.
            if now - frame.capture_mono > bound:
                self.stats.too_old_at_publish += 1
                self.on_frame_dropped(frame.camera_id, "too_old")
                continue
            w, h = frame.camera_size
            frames.append(frame)
            results.append(FrameResult(
                frame.camera_id, frame.frame_no, frame.capture_ts, frame.capture_mono, w, h, d,
                timings={"queue": batch.t_closed - frame.capture_mono,
                         "preprocess": batch.t_preprocessed - batch.t_closed,
                         "infer_wait": batch.t_infer_start - batch.t_preprocessed,
                         "infer": infer_s,
                         "post": t1 - t0}))
        if answered:
            self.sink.request_results(answered)
        if results:
            self.sink.results(results, frames)


def _since(item: Item) -> float:
    """Monotonic time ``item`` entered the daemon: captured, or accepted."""
    return item.capture_mono if isinstance(item, Frame) else item.received_mono


def _split_params(items: list[Item], default: PostprocessParams) -> dict[PostprocessParams, list[int]]:
    groups: dict[PostprocessParams, list[int]] = {}
    for i, it in enumerate(items):
        p = it.params if isinstance(it, Request) and it.params is not None else default
        groups.setdefault(p, []).append(i)
    return groups
