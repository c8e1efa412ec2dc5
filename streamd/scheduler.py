"""Cross-camera batching, inference and postprocessing as three overlapping threads.

    scheduler thread   round-robin over the cameras' ring queues, drop frames that are too
                       old, close the batch when full or ``max_wait`` after its first frame,
                       letterbox into one of ``pipeline_depth`` reusable buffers
    inference thread   backend.infer(batch) while the next batch is being prepared
    post thread        decode + NMS, boxes back to frame pixels, hand to the publisher

A batch never waits for every camera: one slow or dead camera costs nothing but its own
slot. Buffers circulate through a free-list, so memory is fixed after start-up.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .backends.base import Backend
from .config import SchedulerConfig
from .entities import Frame, FrameResult
from .postprocess import PostprocessParams, postprocess
from .preprocess import BatchBuffer, Letterbox
from .queues import QueueSet, RingQueue

log = logging.getLogger("streamd.scheduler")

_POLL_S = 0.1   # every wait in these threads wakes at least this often to see its stop Event


@dataclass
class Batch:
    buffer_index: int
    frames: list[Frame]
    tensor: np.ndarray
    letterboxes: list[Letterbox]
    t_closed: float                      # monotonic: batch assembled
    t_preprocessed: float = 0.0
    t_infer_start: float = 0.0
    t_inferred: float = 0.0
    outputs: np.ndarray | None = None


@dataclass
class SchedulerStats:
    batches: int = 0
    frames: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    infer_s_total: float = 0.0
    preprocess_s_total: float = 0.0
    post_s_total: float = 0.0
    last_progress_mono: float = field(default_factory=time.monotonic)   # watchdog evidence
    queue_s: deque[float] = field(default_factory=lambda: deque(maxlen=2048))
    infer_s: deque[float] = field(default_factory=lambda: deque(maxlen=512))


ResultSink = Callable[[list[FrameResult], list[Frame]], None]   # results and their frames


class _Worker(threading.Thread):
    """A named thread with a stop Event that records its first error instead of dying quietly."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.loop()
        except BaseException as exc:  # noqa: BLE001 - handed to the supervisor
            self.error = exc
            log.exception("%s thread failed", self.name)

    def loop(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self.stop_event.set()


class Pipeline:
    """Owns the three threads; the daemon adds/removes camera queues and reads stats."""

    def __init__(self, backend: Backend, cfg: SchedulerConfig, params: PostprocessParams,
                 sink: ResultSink, on_frame_dropped: Callable[[str, str], None] | None = None,
                 queues: QueueSet | None = None, requests: Any = None, request_share: float = 0.25) -> None:
        self.backend = backend
        self.cfg = cfg
        self.params = params
        self.sink = sink
        self.on_frame_dropped = on_frame_dropped or (lambda cam, cause: None)
        info = backend.info
        self.max_batch = min(cfg.max_batch, info.batch_max)
        self.queues = queues or QueueSet()
        self.requests = requests            # streamd.requests.RequestQueue, or None
        self.request_share = request_share
        self.ready = self.queues.ready
        self._rr_next = 0
        self._alive_mono = {"scheduler": time.monotonic(), "postprocess": time.monotonic()}
        self._infer_since = 0.0        # monotonic start of the inference in progress (0: none)
        self.stats = SchedulerStats()
        self.inferred_per_camera: dict[str, int] = {}
        h, w = info.input_hw
        self._buffers = [BatchBuffer(self.max_batch, h, w) for _ in range(cfg.pipeline_depth)]
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(len(self._buffers)):
            self._free.put(i)
        self._to_infer: queue.Queue[Batch] = queue.Queue(cfg.pipeline_depth)
        self._to_post: queue.Queue[Batch] = queue.Queue(cfg.pipeline_depth + 1)
        self.threads: list[_Worker] = [
            _FnWorker("scheduler", self._schedule_loop),
            _FnWorker("inference", self._infer_loop),
            _FnWorker("postprocess", self._post_loop),
        ]

    # ---- cameras -------------------------------------------------------------------------
    def add_queue(self, camera_id: str, depth: int) -> RingQueue:
        return self.queues.add(camera_id, depth)

    def remove_queue(self, camera_id: str) -> None:
        self.queues.remove(camera_id)

    def queue_depths(self) -> dict[str, int]:
        return self.queues.depths()

    # ---- liveness (systemd watchdog evidence) -------------------------------------------------
    def progress_ok(self, max_stall_s: float, now: float | None = None) -> tuple[bool, str]:
        """True while every stage thread is turning over: the scheduler and post threads
        wake at least every _POLL_S even when idle, and no single inference has been running
        for longer than ``max_stall_s``. Idle cameras are not a failure; a hung stage is."""
        now = time.monotonic() if now is None else now
        for name, t in self._alive_mono.items():
            if now - t > max_stall_s:
                return False, f"{name} thread made no progress for {now - t:.0f}s"
        since = self._infer_since
        if since and now - since > max_stall_s:
            return False, f"inference running for {now - since:.0f}s (hung?)"
        dead = [t.name for t in self.threads if t.ident is not None and not t.is_alive()]
        if dead:
            return False, f"{', '.join(dead)} thread ended"
        return True, ""

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop stage by stage, in data-flow order, so every batch already assembled is
        inferred and handed to the sink: nothing accepted is lost on stop or model swap."""
        deadline = time.monotonic() + timeout
        for t in self.threads:      # scheduler, inference, postprocess
            t.stop()
            if t is self.threads[0]:
                self.queues.wake_all()
            if t.ident is not None:
                t.join(max(0.0, deadline - time.monotonic()))

    def first_error(self) -> BaseException | None:
        return next((t.error for t in self.threads if t.error is not None), None)

    # ---- scheduler thread -----------------------------------------------------------------
    def _take_round_robin(self, want: int, now: float, out: list[Frame]) -> None:
        """Take up to ``want`` frames, one per camera per pass, starting after the camera
        that went first last time, so no camera can crowd out the others. Caller holds
        ``self.ready``."""
        order = self.queues.order
        if not order:
            return
        max_age = self.cfg.max_frame_age_ms / 1000.0
        start = self._rr_next % len(order)
        progressed = True
        while len(out) < want and progressed:
            progressed = False
            for k in range(len(order)):
                if len(out) >= want:
                    break
                cam = order[(start + k) % len(order)]
                q = self.queues.get(cam)
                while q is not None:
                    frame = q.pop_locked()
                    if frame is None:
                        break
                    if now - frame.capture_mono > max_age:
                        self.on_frame_dropped(cam, "too_old")
                        continue
                    out.append(frame)
                    progressed = True
                    self._rr_next = (start + k + 1) % len(order)
                    break

    def _take_requests(self, want: int, out: list[Frame]) -> None:
        from .requests import as_frame
        now = time.monotonic()
        while want > 0:
            req = self.requests.pop_locked()
            if req is None:
                return
            req.started_mono = now
            out.append(as_frame(req))
            want -= 1

    def _take(self, want: int, now: float, out: list[Frame]) -> None:
        """Fill up to ``want`` slots. While both wait, requests get ``request_share`` of the
        batch (at least one slot) and cameras the rest, so neither can starve the other;
        whatever one side leaves unused, the other may take."""
        reqs = self.requests
        if reqs is None or not len(reqs):
            self._take_round_robin(want, now, out)
            return
        cameras_waiting = any(len(q) for q in (self.queues.get(c) for c in self.queues.order) if q)
        reserve = max(1, round(self.request_share * self.max_batch)) if cameras_waiting else want
        start = len(out)
        self._take_requests(min(want, reserve), out)
        self._take_round_robin(want - (len(out) - start), now, out)
        self._take_requests(want - (len(out) - start), out)

    def _collect(self, stop: threading.Event) -> list[Frame]:
        frames: list[Frame] = []
        deadline: float | None = None
        with self.ready:
            while not stop.is_set():
                self._take(self.max_batch - len(frames), time.monotonic(), frames)
                if len(frames) >= self.max_batch:
                    break
                now = time.monotonic()
                if frames and deadline is None:
                    deadline = now + self.cfg.max_wait_ms / 1000.0
                if deadline is not None and now >= deadline:
                    break
                self.ready.wait(_POLL_S if deadline is None else min(_POLL_S, deadline - now))
        return frames

    def _schedule_loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._alive_mono["scheduler"] = time.monotonic()
            try:
                idx = self._free.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            frames = self._collect(stop)
            if not frames:
                self._free.put(idx)
                continue
            t_closed = time.monotonic()
            tensor, boxes = self._buffers[idx].fill([f.image for f in frames])
            batch = Batch(idx, frames, tensor, boxes, t_closed, t_preprocessed=time.monotonic())
            for f in frames:
                self.stats.queue_s.append(t_closed - f.capture_mono)
            # Never full: the queue holds as many batches as there are buffers.
            self._to_infer.put_nowait(batch)

    # ---- inference thread ---------------------------------------------------------------------
    def _infer_loop(self, stop: threading.Event) -> None:
        while True:
            try:
                batch = self._to_infer.get(timeout=_POLL_S)
            except queue.Empty:
                if stop.is_set():
                    return      # drained: the scheduler stopped first
                continue
            t0 = batch.t_infer_start = self._infer_since = time.monotonic()
            try:
                batch.outputs = self.backend.infer(batch.tensor)
            finally:
                self._infer_since = 0.0
                # The tensor is consumed: its buffer can take the next batch right away.
                self._free.put(batch.buffer_index)
            batch.t_inferred = time.monotonic()
            dt = batch.t_inferred - t0
            st = self.stats
            st.batches += 1
            st.frames += len(batch.frames)
            st.batch_sizes[len(batch.frames)] = st.batch_sizes.get(len(batch.frames), 0) + 1
            st.infer_s_total += dt
            st.preprocess_s_total += batch.t_preprocessed - batch.t_closed
            st.infer_s.append(dt)
            st.last_progress_mono = batch.t_inferred
            # The post thread only stops after this one, so this put lands unless that
            # thread died; then fail loudly instead of waiting forever.
            while True:
                try:
                    self._to_post.put(batch, timeout=_POLL_S)
                    break
                except queue.Full:
                    if not self.threads[2].is_alive():
                        raise RuntimeError("postprocess thread is gone; cannot hand over results") from None

    # ---- post thread ------------------------------------------------------------------------
    def _postprocess(self, batch: Batch, info: Any) -> list[tuple]:
        """Decode the batch; requests with their own thresholds are decoded with those."""
        assert batch.outputs is not None
        groups = _split_params(batch.frames, self.params)
        if len(groups) == 1:
            (params,) = groups
            return postprocess(batch.outputs, info.output_layout, batch.letterboxes, info.names, params)
        out: list[tuple] = [()] * len(batch.frames)
        for params, idx in groups.items():
            dets = postprocess(batch.outputs[idx], info.output_layout, [batch.letterboxes[i] for i in idx],
                               info.names, params)
            for i, d in zip(idx, dets):
                out[i] = d
        return out

    def _post_loop(self, stop: threading.Event) -> None:
        info = self.backend.info
        while True:
            self._alive_mono["postprocess"] = time.monotonic()
            try:
                batch = self._to_post.get(timeout=_POLL_S)
            except queue.Empty:
                if stop.is_set():
                    return
                continue
            assert batch.outputs is not None
            t0 = time.monotonic()
            dets = self._postprocess(batch, info)
            t1 = time.monotonic()
            self.stats.post_s_total += t1 - t0
            results = []
            for frame, d in zip(batch.frames, dets):
                w, h = frame.size
                if frame.request is None:
                    self.inferred_per_camera[frame.camera_id] = self.inferred_per_camera.get(frame.camera_id, 0) + 1
                results.append(FrameResult(
                    frame.camera_id, frame.frame_no, frame.capture_ts, frame.capture_mono, w, h, d,
                    timings={"queue": batch.t_closed - frame.capture_mono,
                             "preprocess": batch.t_preprocessed - batch.t_closed,
                             "infer_wait": batch.t_infer_start - batch.t_preprocessed,
                             "infer": batch.t_inferred - batch.t_infer_start,
                             "post": t1 - t0}))
            self.sink(results, batch.frames)


def _split_params(frames: list[Frame], default: PostprocessParams) -> dict[PostprocessParams, list[int]]:
    groups: dict[PostprocessParams, list[int]] = {}
    for i, f in enumerate(frames):
        p = f.request.params if f.request is not None and f.request.params is not None else default
        groups.setdefault(p, []).append(i)
    return groups


class _FnWorker(_Worker):
    def __init__(self, name: str, fn: Callable[[threading.Event], None]) -> None:
        super().__init__(name)
        self._fn = fn

    def loop(self) -> None:
        self._fn(self.stop_event)
