"""Ring queues and the batching pipeline, run on a real ONNX model through ONNX Runtime."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from streamd.backends import open_backend
from streamd.config import SchedulerConfig
from streamd.entities import Frame, FrameResult
from streamd.pipeline.postprocess import PostprocessParams
from streamd.pipeline.queues import RingQueue
from streamd.pipeline.scheduler import Pipeline
from tests.fixtures_daemon import wait_until


def frame(cam: str, n: int, age_s: float = 0.0, size: tuple[int, int] = (64, 48)) -> Frame:
    img = np.full((size[1], size[0], 3), n % 255, np.uint8)
    return Frame(cam, n, time.time() - age_s, time.monotonic() - age_s, img)


def test_ring_queue_drops_oldest_and_counts() -> None:
    q = RingQueue(3, threading.Condition())
    for i in range(1, 8):
        q.put(frame("a", i))
    assert q.dropped_full == 4
    assert [q.pop().frame_no for _ in range(3)] == [5, 6, 7]   # the newest survive, in order
    assert q.pop() is None


class Sink:
    def __init__(self) -> None:
        self.batches: list[list[FrameResult]] = []
        self.lock = threading.Lock()

    def __call__(self, results: list[FrameResult], frames: list[Frame]) -> None:
        assert [r.frame_no for r in results] == [f.frame_no for f in frames]
        with self.lock:
            self.batches.append(results)

    def frames(self) -> list[FrameResult]:
        with self.lock:
            return [r for b in self.batches for r in b]


@pytest.fixture
def backend(yolov8n_onnx_320: Path):
    with open_backend(yolov8n_onnx_320, device="cpu") as b:
        yield b


def make_pipeline(backend, sink: Sink, dropped: list[tuple[str, str]] | None = None, **cfg: float) -> Pipeline:
    sc = SchedulerConfig(**cfg)  # type: ignore[arg-type]
    return Pipeline(backend, sc, PostprocessParams(conf=0.25),
                    sink, on_frame_dropped=(lambda c, why: dropped.append((c, why))) if dropped is not None else None)


def test_round_robin_gives_every_camera_a_slot(backend) -> None:
    sink = Sink()
    p = make_pipeline(backend, sink, max_batch=4, max_wait_ms=50)
    qs = {c: p.add_queue(c, 16) for c in ("busy", "also_busy", "quiet")}
    for i in range(16):
        qs["busy"].put(frame("busy", i))
        qs["also_busy"].put(frame("also_busy", i))
    qs["quiet"].put(frame("quiet", 0))
    p.start()
    try:
        wait_until(lambda: len(sink.frames()) >= 33, 60, what="all 33 frames inferred")
    finally:
        p.stop()
    first = [r.camera_id for r in sink.batches[0]]
    assert set(first) == {"busy", "also_busy", "quiet"}, first   # the quiet camera is not starved
    per_cam = {c: [r.frame_no for r in sink.frames() if r.camera_id == c] for c in qs}
    assert per_cam["busy"] == list(range(16))        # FIFO within a camera
    assert per_cam["quiet"] == [0]
    assert all(len(b) <= 4 for b in sink.batches)
    assert p.stats.frames == 33 and sum(p.stats.batch_sizes.values()) == p.stats.batches


def test_partial_batch_goes_after_max_wait_without_waiting_for_all_cameras(backend) -> None:
    sink = Sink()
    p = make_pipeline(backend, sink, max_batch=8, max_wait_ms=30)
    for c in ("a", "b", "c", "dead"):
        p.add_queue(c, 2)
    p.start()
    try:
        t0 = time.monotonic()
        p.queues.get("a").put(frame("a", 1))
        wait_until(lambda: sink.frames(), 30, what="a lone frame to be inferred")
        took = time.monotonic() - t0
    finally:
        p.stop()
    assert [r.camera_id for r in sink.frames()] == ["a"]
    assert took < 10          # generous: the point is that it did not wait for b, c or dead


def test_frames_older_than_max_age_are_dropped_and_counted(backend) -> None:
    sink = Sink()
    dropped: list[tuple[str, str]] = []
    p = make_pipeline(backend, sink, dropped, max_batch=4, max_wait_ms=10, max_frame_age_ms=500)
    q = p.add_queue("a", 8)
    q.put(frame("a", 1, age_s=5.0))
    q.put(frame("a", 2, age_s=2.0))
    q.put(frame("a", 3))
    p.start()
    try:
        wait_until(lambda: sink.frames(), 30, what="the fresh frame")
    finally:
        p.stop()
    assert [r.frame_no for r in sink.frames()] == [3]
    assert dropped == [("a", "too_old"), ("a", "too_old")]


def test_results_map_boxes_to_each_frames_own_size(backend) -> None:
    sink = Sink()
    p = make_pipeline(backend, sink, max_batch=4, max_wait_ms=50)
    q = p.add_queue("a", 4)
    q.put(frame("a", 1, size=(1920, 1080)))
    q.put(frame("a", 2, size=(320, 640)))
    p.start()
    try:
        wait_until(lambda: len(sink.frames()) == 2, 30, what="two frames")
    finally:
        p.stop()
    sizes = [(r.width, r.height) for r in sink.frames()]
    assert sizes == [(1920, 1080), (320, 640)]
    for r in sink.frames():
        for d in r.detections:
            assert 0 <= d.box[0] <= d.box[2] <= r.width and 0 <= d.box[1] <= d.box[3] <= r.height
        assert set(r.timings) >= {"queue", "preprocess", "infer", "post"}


def test_stop_joins_every_thread(backend) -> None:
    p = make_pipeline(backend, Sink())
    p.start()
    p.stop(timeout=5)
    assert not any(t.is_alive() for t in p.threads)
