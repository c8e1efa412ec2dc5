"""Subscribers that connect and never read, against a real daemon process publishing big
snapshots: what they can make the daemon hold is bounded by ``publisher.subscriber_buffer_mb``
(measured as the process's resident memory)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import psutil
import pytest
import zmq

from tests.fixtures_daemon import wait_until
from tests.fixtures_rtsp import load_make_test_media
from tests.test_daemon import base_config

pytestmark = pytest.mark.slow

BUDGET_MB = 8
STUCK = 2
# What the process's memory moves by anyway: Full-HD frames are 6 MB each, and how many are
# in flight (decoder, queue, batches of up to 4) varies from one moment to the next.
SLACK_MB = 40
MESSAGES = 200


@pytest.fixture
def stuck_subscribers() -> Iterator[Callable[[str, int], None]]:
    """SUB sockets that take everything and read nothing: they keep one message, the kernel
    a little more, and the rest waits in the daemon."""
    ctx = zmq.Context()
    socks: list[zmq.Socket] = []

    def connect(endpoint: str, n: int) -> None:
        for _ in range(n):
            s = ctx.socket(zmq.SUB)
            s.setsockopt(zmq.RCVHWM, 1)
            s.setsockopt(zmq.RCVBUF, 65536)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SUBSCRIBE, b"")
            s.connect(endpoint)
            socks.append(s)
    yield connect
    for s in socks:
        s.close(0)
    ctx.term()


def _rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def test_subscribers_that_never_read_hold_at_most_the_budget(yolov8n_onnx_320: Path, daemon_factory,
                                                             collector_factory, tmp_path: Path,
                                                             stuck_subscribers: Callable[[str, int], None]) -> None:
    # Full-HD frames as JPEGs of best quality: about 700 kB per detections message.
    media = load_make_test_media().make_media(tmp_path / "media", size=(1920, 1080), frames=12)["bus"]
    cam = {"id": "hd", "url": str(media.mp4), "loop": True, "snapshot": "always", "snapshot_quality": 100}
    cfg = base_config(yolov8n_onnx_320, [cam])
    cfg["publisher"]["subscriber_buffer_mb"] = BUDGET_MB
    d = daemon_factory(cfg)
    endpoint = cfg["publisher"]["endpoint"]
    reader = collector_factory(endpoint, [b"cam/"])
    wait_until(lambda: len(reader.of("detections", "hd")) >= 10, 90, what=f"snapshots flowing\n{d.log()[-2000:]}")
    stuck_subscribers(endpoint, STUCK)
    # Let the stuck ones fill up what they can, then measure from there.
    n0 = len(reader.of("detections", "hd"))
    wait_until(lambda: len(reader.of("detections", "hd")) >= n0 + 30, 60, what="30 more snapshots")
    before = _rss_mb(d.pid)
    n1 = len(reader.of("detections", "hd"))
    wait_until(lambda: len(reader.of("detections", "hd")) >= n1 + MESSAGES, 240, what=f"{MESSAGES} more snapshots")
    grown = _rss_mb(d.pid) - before
    sent = [m["snapshot"]["bytes"] for m in reader.of("detections", "hd")[n1:] if "snapshot" in m]
    size_mb = sum(sent) / 2**20
    # Each stuck subscriber holds at most its budget, plus the message being written to it.
    bound = STUCK * (BUDGET_MB + max(sent) / 2**20) + SLACK_MB
    # Unbounded, they would keep every one of those snapshots (size_mb): far more than that.
    assert size_mb > 2 * bound, f"the test sent too little to tell: {size_mb:.0f} MB"
    assert grown < bound, f"RSS grew {grown:.0f} MB (bound {bound:.0f}) while {size_mb:.0f} MB of snapshots went out"
    assert d.stop() == 0


def test_a_snapshot_over_the_cap_is_reencoded_to_fit(sample_images) -> None:
    import cv2
    from streamd.config import CameraConfig
    from streamd.entities import Frame, FrameResult
    from streamd.pipeline.output.snapshots import SnapshotPolicy

    image = cv2.resize(cv2.imread(str(sample_images[0])), (1920, 1080))
    cam = CameraConfig(id="hd", url="usb:0", snapshot="always", snapshot_quality=100)
    frame = Frame("hd", 1, 0.0, 0.0, image)
    result = FrameResult("hd", 1, 0.0, 0.0, 1920, 1080, ())
    full = SnapshotPolicy(lambda _: cam).take(result, frame)
    capped = SnapshotPolicy(lambda _: cam, max_bytes=200_000).take(result, frame)
    assert full is not None and len(full) > 200_000
    assert capped is not None and len(capped) <= 200_000
    assert cv2.imdecode(np.frombuffer(capped, np.uint8), cv2.IMREAD_COLOR) is not None
