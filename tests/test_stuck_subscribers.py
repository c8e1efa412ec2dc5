"""Subscribers that connect and never read, against a real daemon process publishing big
snapshots: what they can make the daemon hold is bounded by ``publisher.subscriber_buffer_mb``
(measured as the process's resident memory)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest
import zmq

from tests.fixtures_daemon import wait_until
from tests.fixtures_rtsp import load_make_test_media
from tests.test_daemon import base_config

pytestmark = pytest.mark.slow

BUDGET_MB = 8
SNAPSHOT_MAX = 400_000


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
    # Full-HD frames as JPEGs of best quality: about 700 kB, re-encoded to fit 400 kB.
    media = load_make_test_media().make_media(tmp_path / "media", size=(1920, 1080), frames=12)["bus"]
    cam = {"id": "hd", "url": str(media.mp4), "loop": True, "snapshot": "always", "snapshot_quality": 100}
    cfg = base_config(yolov8n_onnx_320, [cam])
    cfg["publisher"].update(subscriber_buffer_mb=BUDGET_MB, snapshot_max_bytes=SNAPSHOT_MAX)
    d = daemon_factory(cfg)
    endpoint = cfg["publisher"]["endpoint"]
    reader = collector_factory(endpoint, [b"cam/"])
    wait_until(lambda: len(reader.of("detections", "hd")) >= 10, 90, what=f"snapshots flowing\n{d.log()[-2000:]}")
    stuck_subscribers(endpoint, 3)
    # Let the stuck ones fill up what they can, then measure from there.
    n0 = len(reader.of("detections", "hd"))
    wait_until(lambda: len(reader.of("detections", "hd")) >= n0 + 30, 60, what="30 more snapshots")
    before = _rss_mb(d.pid)
    n1 = len(reader.of("detections", "hd"))
    wait_until(lambda: len(reader.of("detections", "hd")) >= n1 + 150, 120, what="150 more snapshots")
    grown = _rss_mb(d.pid) - before
    sent = [m["snapshot"]["bytes"] for m in reader.of("detections", "hd")[n1:]]
    size_mb = sum(sent) / 2**20
    assert max(sent) <= SNAPSHOT_MAX
    # Unbounded, three stuck subscribers would keep every one of those snapshots (size_mb).
    assert size_mb > 4 * BUDGET_MB, f"the test sent too little to tell: {size_mb:.0f} MB"
    assert grown < 2 * BUDGET_MB, f"RSS grew {grown:.0f} MB while {size_mb:.0f} MB of snapshots went out"
    assert d.stop() == 0
