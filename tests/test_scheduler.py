"""Ring queues and the batching pipeline, with both inputs (camera frames and on-demand
requests), on the deterministic ``BrightBoxBackend`` (tests/fakes.py): no exported model
needed, and every box it returns can be checked against the white rectangle that caused it."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from streamd.config import SchedulerConfig
from streamd.entities import Frame, FrameResult, Request, RequestResult
from streamd.pipeline.postprocess import PostprocessParams
from streamd.pipeline.queues import QueueSet, RingQueue
from streamd.pipeline.requests import RequestQueue
from streamd.pipeline.scheduler import Pipeline
from tests.fakes import BrightBoxBackend, with_white_box
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
    """The scheduler's ResultSink, keeping what it was handed."""

    def __init__(self) -> None:
        self.batches: list[list[FrameResult]] = []
        self.answered: list[RequestResult] = []
        self.order: list[str] = []            # "cam" / "req", one per result, as handed over
        self.lock = threading.Lock()

    def results(self, results: list[FrameResult], frames: list[Frame]) -> None:
        assert [r.frame_no for r in results] == [f.frame_no for f in frames]
        with self.lock:
            self.batches.append(results)
            self.order += ["cam"] * len(results)

    def request_results(self, results: list[RequestResult]) -> None:
        with self.lock:
            self.answered.extend(results)
            self.order += ["req"] * len(results)

    def frames(self) -> list[FrameResult]:
        with self.lock:
            return [r for b in self.batches for r in b]

    def requests(self) -> list[RequestResult]:
        with self.lock:
            return list(self.answered)


class NoReply:
    """A front door for requests built by hand: the scheduler never answers; the output stage does."""

    def answer(self, result: RequestResult, body: dict[str, Any]) -> bool:
        raise AssertionError("the scheduler answered a request itself")

    def fail(self, request: Request, reason: str) -> None:
        raise AssertionError(f"the scheduler failed a request itself: {reason}")


def request(task: str, image: np.ndarray, priority: int = 0, params: PostprocessParams | None = None) -> Request:
    return Request(task, image, time.time(), time.monotonic(), reply_to=NoReply(), params=params, priority=priority)


@pytest.fixture
def backend() -> BrightBoxBackend:
    return BrightBoxBackend()


def make_pipeline(backend, sink: Sink, dropped: list[tuple[str, str]] | None = None,
                  requests: RequestQueue | None = None, request_share: float = 0.25, **cfg: float) -> Pipeline:
    sc = SchedulerConfig(**cfg)  # type: ignore[arg-type]
    return Pipeline(backend, sc, PostprocessParams(conf=0.25), sink,
                    on_frame_dropped=(lambda c, why: dropped.append((c, why))) if dropped is not None else None,
                    requests=requests, request_share=request_share)


def assert_box_near(got: tuple[float, ...], want: tuple[int, int, int, int], w: int, h: int, net: int = 320) -> None:
    """``got`` matches ``want`` within two network pixels (resizing blurs the rectangle's edge)."""
    tol = 2.0 / min(net / w, net / h)
    assert all(abs(g - x) <= tol for g, x in zip(got, want)), (got, want, tol)


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
    boxes = {1: (600, 300, 1500, 900), 2: (20, 400, 200, 620), 3: (0, 0, 0, 0)}
    for n, size in ((1, (1920, 1080)), (2, (320, 640)), (3, (640, 480))):
        f = frame("a", n, size=size)
        q.put(Frame(f.camera_id, n, f.capture_ts, f.capture_mono, with_white_box(f.image, boxes[n])))
    p.start()
    try:
        wait_until(lambda: len(sink.frames()) == 3, 30, what="three frames")
    finally:
        p.stop()
    sizes = [(r.width, r.height) for r in sink.frames()]
    assert sizes == [(1920, 1080), (320, 640), (640, 480)]
    for r in sink.frames():
        if r.frame_no == 3:
            assert r.detections == ()         # nothing white: nothing found
            continue
        (d,) = r.detections
        assert d.label == "bright" and d.confidence == pytest.approx(0.9)
        assert 0 <= d.box[0] <= d.box[2] <= r.width and 0 <= d.box[1] <= d.box[3] <= r.height
        assert_box_near(d.box, boxes[r.frame_no], r.width, r.height)
        assert set(r.timings) >= {"queue", "preprocess", "infer", "post"}


def test_requests_are_a_second_input_answered_in_their_own_pixels(backend) -> None:
    """Requests ride beside camera frames, each decoded with its own thresholds, and come
    back as request results (never as camera results), highest priority first."""
    sink = Sink()
    queues = QueueSet()
    reqs = RequestQueue(8, queues.ready)
    p = Pipeline(backend, SchedulerConfig(max_batch=1, max_wait_ms=0), PostprocessParams(conf=0.25), sink,
                 queues=queues, requests=reqs, request_share=0.5)
    cam = p.add_queue("cam", 4)
    grey = np.full((600, 800, 3), 40, np.uint8)
    box = (100, 50, 400, 300)
    assert reqs.offer(request("low", with_white_box(grey, box)))
    assert reqs.offer(request("high", with_white_box(grey, box), priority=5))
    # 0.9 is the backend's confidence: with its own threshold above it, this one finds nothing.
    assert reqs.offer(request("strict", with_white_box(grey, box), params=PostprocessParams(conf=0.95)))
    for n in range(3):
        cam.put(frame("cam", n))
    p.start()
    try:
        wait_until(lambda: len(sink.requests()) == 3 and len(sink.frames()) >= 1, 30,
                   what="three request results and a camera result")
    finally:
        p.stop()
    order = [rr.request.task_id for rr in sink.requests()]
    assert order.index("high") < order.index("low")
    got = {rr.request.task_id: rr for rr in sink.requests()}
    for task in ("low", "high"):
        (d,) = got[task].detections
        assert_box_near(d.box, box, 800, 600)
        assert got[task].queue_s >= 0 and got[task].infer_s > 0
    assert got["strict"].detections == ()
    assert all(r.camera_id == "cam" for r in sink.frames())       # no request leaks as a camera result


def test_stop_joins_every_thread(backend) -> None:
    p = make_pipeline(backend, Sink())
    p.start()
    p.stop(timeout=5)
    assert not any(t.is_alive() for t in p.threads)


def test_requests_of_another_shape_alternate_with_the_cameras_whole_batches(backend) -> None:
    """On a model that takes any H x W, portrait requests and landscape cameras cannot share a
    batch: whole batches alternate, so neither side waits for the other to run dry."""
    dyn = BrightBoxBackend(input_hw=(320, 320), dynamic_hw=True)
    sink = Sink()
    queues = QueueSet()
    reqs = RequestQueue(16, queues.ready)
    p = Pipeline(dyn, SchedulerConfig(max_batch=2, max_wait_ms=0, max_frame_age_ms=60000),
                 PostprocessParams(conf=0.25), sink, queues=queues, requests=reqs, request_share=0.5)
    portrait = with_white_box(np.full((640, 360, 3), 40, np.uint8), (60, 100, 300, 500))
    for i in range(8):
        assert reqs.offer(request(f"r{i}", portrait))
    for c in ("a", "b"):
        q = p.add_queue(c, 8)
        for n in range(4):
            q.put(frame(c, n, size=(640, 360)))
    p.start()
    try:
        wait_until(lambda: len(sink.requests()) == 8 and len(sink.frames()) == 8, 30, what="every result")
    finally:
        p.stop()
    assert set(dyn.shapes) == {(320, 192), (192, 320)}      # each batch one shape, both shapes run
    order = sink.order
    # interleaved, not one side first and the other after it ran dry
    assert order.index("cam") < len(order) - 1 - order[::-1].index("req")
    assert order.index("req") < len(order) - 1 - order[::-1].index("cam")
    for rr in sink.requests():
        (d,) = rr.detections
        assert_box_near(d.box, (60, 100, 300, 500), 360, 640)
