"""Late binding, the end-to-end age bound, the worker pool and decoder pacing, on a real
ONNX model through ONNX Runtime.

Inference is made to wait where a test needs to know what was in flight: ``GatedBackend``
wraps the real backend and holds ``infer`` until the test opens its gate. Nothing here
waits a fixed time for something to happen; every wait is on a condition with a deadline.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from streamd.backends import open_backend
from streamd.backends.base import Backend
from streamd.backends.pool import BackendPool, Layout, build_pool, candidate_layouts, default_layout
from streamd.config import SchedulerConfig
from streamd.pipeline.postprocess import PostprocessParams
from streamd.pipeline.queues import RingQueue
from streamd.pipeline.scheduler import InferenceTime, Pipeline
from tests.fixtures_daemon import wait_until
from tests.test_scheduler import Sink, frame


class GatedBackend(Backend):
    """A real backend whose ``infer`` waits for the test to open the gate (and says when
    it has been entered), so a test knows exactly which batch is in flight."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.info = inner.info
        self.name = inner.name  # type: ignore[misc]
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls = 0
        self.shapes: list[tuple[int, ...]] = []

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.shapes.append(tuple(batch.shape))
        self.entered.set()
        if not self.gate.wait(60):
            raise TimeoutError("the test never opened the gate")
        return self.inner.infer(batch)

    def close(self) -> None:
        self.gate.set()


@pytest.fixture
def backends(yolov8n_onnx_320: Path):
    opened = [open_backend(yolov8n_onnx_320, device="cpu", threads=1) for _ in range(2)]
    yield opened
    for b in opened:
        b.close()


def pipeline(pool: Backend | BackendPool, sink: Sink, dropped: list | None = None, **cfg: float) -> Pipeline:
    on_drop = (lambda c, why: dropped.append((c, why))) if dropped is not None else None
    return Pipeline(pool, SchedulerConfig(**cfg), PostprocessParams(conf=0.25), sink,  # type: ignore[arg-type]
                    on_frame_dropped=on_drop)


def test_a_free_worker_takes_the_newest_frame_not_one_queued_behind_a_running_batch(backends) -> None:
    gated = GatedBackend(backends[0])
    sink = Sink()
    p = pipeline(gated, sink, max_batch=4, max_wait_ms=0)
    q = p.add_queue("a", 1)
    p.start()
    try:
        q.put(frame("a", 1))
        assert gated.entered.wait(30), "the first frame never reached inference"
        # The only worker is busy: frames arriving now wait in the camera's queue, where a
        # newer one replaces an older one; no batch is closed ahead of time.
        q.put(frame("a", 2))
        q.put(frame("a", 3))
        assert len(q) == 1 and q.dropped_full == 1
        gated.gate.set()
        wait_until(lambda: len(sink.frames()) >= 2, 30, what="two results")
    finally:
        gated.gate.set()
        p.stop()
    assert [r.frame_no for r in sink.frames()] == [1, 3]


def test_frames_that_would_be_published_too_old_are_dropped_at_take(backends) -> None:
    """The budget is judged when the batch closes: age now + the predicted inference."""
    sink = Sink()
    dropped: list[tuple[str, str]] = []
    h, w = backends[0].info.input_hw
    # As if one image took 1 s; the prediction adds a margin of half of that until measured.
    pool = BackendPool([backends[0]], Layout(1, 1), seconds_per_image=1.0)
    p = pipeline(pool, sink, dropped, max_batch=4, max_wait_ms=0, max_frame_age_ms=5000)
    p.add_queue("old", 1).put(frame("old", 1, age_s=4.0))       # 4 s + 1.5 s > 5 s: cannot make it
    p.add_queue("young", 1).put(frame("young", 1, age_s=3.0))   # 3 s + 1.5 s: can
    p.start()
    try:
        wait_until(lambda: sink.frames(), 30, what="the young frame")
    finally:
        p.stop()
    assert [r.camera_id for r in sink.frames()] == ["young"]
    assert dropped == [("old", "too_old")] and p.stats.too_old_at_take == 1


def test_the_age_budget_limits_the_batch_and_leaves_the_rest_for_the_next(backends) -> None:
    sink = Sink()
    pool = BackendPool([backends[0]], Layout(1, 1), seconds_per_image=1.0)   # 1.5 s with the margin
    p = pipeline(pool, sink, max_batch=8, max_wait_ms=0, max_frame_age_ms=6000)
    for c in "abcd":
        p.add_queue(c, 1).put(frame(c, 1, age_s=1.4))   # 1.4 s + n x 1.5 s fits for n <= 3
    p.start()
    try:
        wait_until(lambda: len(sink.frames()) == 4, 30, what="all four frames")
    finally:
        p.stop()
    assert [len(b) for b in sink.batches][:1] == [3]
    assert sorted(r.camera_id for r in sink.frames()) == list("abcd")


def test_a_result_older_than_the_bound_at_publish_is_not_published(backends) -> None:
    gated = GatedBackend(backends[0])
    sink = Sink()
    dropped: list[tuple[str, str]] = []
    p = pipeline(gated, sink, dropped, max_batch=2, max_wait_ms=0, max_frame_age_ms=5000)
    q = p.add_queue("a", 1)
    p.start()
    try:
        f = frame("a", 1, age_s=4.9)
        q.put(f)
        assert gated.entered.wait(30)
        wait_until(lambda: time.monotonic() - f.capture_mono > 5.1, 10, what="the frame to pass the bound")
        gated.gate.set()
        wait_until(lambda: dropped, 30, what="the stale result to be dropped")
        q.put(frame("a", 2))
        wait_until(lambda: sink.frames(), 30, what="a fresh result")
    finally:
        gated.gate.set()
        p.stop()
    assert dropped == [("a", "too_old")] and p.stats.too_old_at_publish == 1
    assert [r.frame_no for r in sink.frames()] == [2]


def test_every_worker_of_the_pool_runs_batches_and_camera_order_holds(backends) -> None:
    slow = GatedBackend(backends[0])
    pool = BackendPool([slow, backends[1]], Layout(2, 1))
    sink = Sink()
    p = pipeline(pool, sink, max_batch=1, max_wait_ms=0)
    q = p.add_queue("a", 1)
    p.start()
    try:
        q.put(frame("a", 1))
        assert slow.entered.wait(30)                 # worker 0 holds frame 1
        q.put(frame("a", 2))                         # worker 1 takes and finishes frame 2 ...
        wait_until(lambda: p.stats.worker_batches.get(1), 30, what="worker 1 to run a batch")
        assert sink.frames() == []                   # ... but it is not published before frame 1
        slow.gate.set()
        wait_until(lambda: len(sink.frames()) == 2, 30, what="both results")
    finally:
        slow.gate.set()
        p.stop()
    assert [r.frame_no for r in sink.frames()] == [1, 2]
    assert p.stats.worker_batches == {0: 1, 1: 1}
    assert {t.name for t in p.threads} == {"infer-0", "infer-1", "postprocess"}


def test_a_model_taking_any_size_infers_each_camera_at_its_own_aspect(yolov8n_onnx_640_anyhw: Path) -> None:
    """16:9 and 4:3 cameras never share a batch: each is letterboxed to its own
    stride-padded shape (Ultralytics' default), and boxes come back in its own pixels."""
    with open_backend(yolov8n_onnx_640_anyhw, device="cpu") as real:
        assert real.info.dynamic_hw
        recorder = GatedBackend(real)
        recorder.gate.set()
        sink = Sink()
        p = pipeline(recorder, sink, max_batch=4, max_wait_ms=50)
        for c, size in (("wide", (1280, 720)), ("classic", (640, 480)), ("wide2", (1920, 1080))):
            p.add_queue(c, 1).put(frame(c, 1, size=size))
        p.start()
        try:
            wait_until(lambda: len(sink.frames()) == 3, 60, what="three results")
        finally:
            p.stop()
    assert sorted(recorder.shapes) == [(1, 3, 480, 640), (2, 3, 384, 640)]
    sizes = {r.camera_id: (r.width, r.height) for r in sink.frames()}
    assert sizes == {"wide": (1280, 720), "classic": (640, 480), "wide2": (1920, 1080)}


def test_inference_time_model_scales_with_batch_and_pixels_and_keeps_a_margin() -> None:
    t = InferenceTime(seconds_per_image=0.2, pixels=320 * 320)
    one = t.estimate(1, (320, 320))
    assert one > 0.2                                # the seed plus a margin
    assert t.estimate(4, (320, 320)) == pytest.approx(4 * one)
    assert t.estimate(1, (256, 320)) == pytest.approx(0.8 * one)
    for _ in range(50):                             # steady batches: the margin shrinks to nothing
        t.observe(2, (320, 320), 0.5)
    assert t.estimate(2, (320, 320)) == pytest.approx(0.5, rel=0.02)
    for seconds in (0.3, 0.7) * 25:                 # jittery batches: predicted above the mean
        t.observe(2, (320, 320), seconds)
    assert t.estimate(2, (320, 320)) > 0.6
    assert InferenceTime().estimate(8, (640, 640)) == 0.0   # unknown: no budget limit yet


# ---- decoder pacing ----------------------------------------------------------------------------------
def test_queue_wants_every_frame_until_it_knows_the_serve_rate() -> None:
    q = RingQueue(1, threading.Condition())
    assert q.wants_frame(100.0, 0.1)                 # empty
    q.put(frame("a", 1))
    assert q.wants_frame(100.0, 0.1)                 # serve rate unknown
    q.pop_locked(now=100.0)
    q.put(frame("a", 2))
    q.pop_locked(now=101.0)                          # served once a second
    assert q.serve_interval_s == pytest.approx(1.0)
    assert q.wants_frame(101.05, 0.1)                # empty again: keep one frame ready
    q.put(frame("a", 3))
    assert not q.wants_frame(101.2, 0.1)             # next take ~1 s away: no need to convert
    assert q.wants_frame(101.6, 0.1)                 # due within two frames: the newest is wanted
    assert not q.wants_frame(110.0, 0.1)             # nobody takes any more: idle costs nothing


def test_skipped_frames_are_counted_apart_from_drops(fall_onnx_640_anyhw: Path, test_media, daemon_factory,
                                                     collector_factory) -> None:
    """Four 10 fps cameras into a model that serves each about once a second (the fall
    model at 640 on one thread): most frames are decoded but not converted, and none of
    that is a drop. A busier machine only makes the model slower and the skipping surer."""
    from tests.test_daemon import base_config
    cams = [{"id": f"c{i}", "url": str(test_media["bus"].mp4), "loop": True} for i in range(4)]
    cfg = base_config(fall_onnx_640_anyhw, cams, max_batch=1, max_wait_ms=0)
    cfg["scheduler"]["workers"] = 1
    cfg["model"]["threads"] = 1
    cfg["publisher"]["stats_interval_s"] = 0.5
    d = daemon_factory(cfg)
    stats = collector_factory(cfg["publisher"]["endpoint"], [b"sys/stats"])
    wait_until(lambda: any(sum(c["skipped"] for c in m["cameras"].values()) > 20 for m in stats.of("stats")),
               60, what="frames skipped by pacing")
    last = stats.of("stats")[-1]
    for c in last["cameras"].values():
        assert c["decoded"] >= c["inferred"]
        assert set(c["dropped"]) == {"queue_full", "too_old", "fps_cap"}
    assert last["scheduler"]["workers"] == 1
    assert d.stop() == 0


# ---- the pool's layout -----------------------------------------------------------------------------
def test_candidate_layouts() -> None:
    assert candidate_layouts(1, True) == [Layout(1, 1)]
    assert candidate_layouts(2, True) == [Layout(1, 2), Layout(2, 1)]
    assert candidate_layouts(8, True) == [Layout(1, 8), Layout(4, 2), Layout(8, 1)]
    assert candidate_layouts(64, True)[-1] == Layout(8, 1)
    assert candidate_layouts(8, False) == [Layout(1, 0), Layout(2, 0)]
    assert default_layout(2, True) == Layout(2, 1) and default_layout(16, False) == Layout(2, 0)


def test_pool_layout_is_measured_on_the_real_model(yolov8n_onnx_320: Path) -> None:
    opened: list[Backend] = []

    def open_one(threads: int) -> Backend:
        b = open_backend(yolov8n_onnx_320, device="cpu", threads=threads, warmup=False)
        opened.append(b)
        return b

    pool = build_pool(open_one, workers=None, threads=0, on_cpu=True, autotune_s=1.0, cores=2)
    try:
        assert set(pool.measured) == {"1 worker(s) x 2 thread(s)", "2 worker(s) x 1 thread(s)"}
        assert all(v > 0 for v in pool.measured.values())
        assert pool.layout in (Layout(1, 2), Layout(2, 1))
        assert len(pool.backends) == pool.layout.workers
        assert pool.seconds_per_image and pool.seconds_per_image > 0
        # The losing layout's sessions were closed, the winners are the pool's.
        assert len(opened) == 3 and all(b in opened for b in pool.backends)
    finally:
        pool.close()


def test_configured_workers_are_not_measured_against_others(yolov8n_onnx_320: Path) -> None:
    pool = build_pool(lambda t: open_backend(yolov8n_onnx_320, device="cpu", threads=t, warmup=False),
                      workers=3, threads=0, on_cpu=True, autotune_s=0, cores=2)
    try:
        assert pool.layout == Layout(3, 1) and len(pool.backends) == 3 and not pool.measured
    finally:
        pool.close()


@pytest.mark.slow
def test_no_detection_is_published_older_than_the_bound_under_overload(fall_onnx_320: Path, test_media,
                                                                     daemon_factory, collector_factory) -> None:
    """Four cameras offering more than the model takes, at the daemon's defaults but for a
    tight bound: the bound holds at publish time, and every worker of the pool is used."""
    from tests.test_daemon import base_config
    cams = [{"id": f"c{i}", "url": str(test_media["bus"].mp4), "loop": True} for i in range(4)]
    cfg = base_config(fall_onnx_320, cams)
    cfg["scheduler"] = {"max_frame_age_ms": 700, "workers": 2}
    cfg["publisher"]["stats_interval_s"] = 0.5
    d = daemon_factory(cfg)
    c = collector_factory(cfg["publisher"]["endpoint"], [b"cam/", b"sys/stats"])
    wait_until(lambda: len(c.of("detections")) >= 40, 90, what="40 detection messages")
    wait_until(lambda: any(set(m["scheduler"]["worker_batches"]) == {"0", "1"} for m in c.of("stats")), 30,
               what="a stats message showing both workers used")
    bound = c.of("stats")[-1]["scheduler"]["max_frame_age_ms"] / 1000
    ages = [m["publish_ts"] - m["capture_ts"] for m in c.of("detections")]
    # A little slack for the hand-over from the post thread to the PUB socket's thread.
    assert max(ages) <= bound + 0.2, (max(ages), bound)
    assert c.of("stats")[-1]["scheduler"]["workers"] == 2
    assert d.stop() == 0
