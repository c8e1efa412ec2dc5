"""On-demand image requests through the daemon's ROUTER socket, sharing batches with cameras.

Real daemon process, real DEALER/REQ clients on loopback, real images."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import zmq

from tests.fixtures_daemon import free_tcp_port, wait_until
from tests.test_daemon import base_config

pytestmark = pytest.mark.slow


def request_config(model: Path, cameras: list[dict[str, Any]], **req: Any) -> dict[str, Any]:
    cfg = base_config(model, cameras)
    cfg["requests"] = {"enabled": True, "endpoint": f"tcp://127.0.0.1:{free_tcp_port()}", **req}
    return cfg


class Client:
    """A DEALER socket that records every reply it gets, with the time."""

    def __init__(self, endpoint: str, ctx: zmq.Context) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.replies: list[tuple[float, dict[str, Any]]] = []

    def send(self, data: bytes, **header: Any) -> None:
        self.sock.send_multipart([json.dumps({"v": 1, **header}).encode(), data])

    def pump(self, until: float) -> None:
        while time.monotonic() < until:
            if self.sock.poll(50):
                self.replies.append((time.monotonic(), json.loads(self.sock.recv_multipart()[-1])))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r for _, r in self.replies if r["type"] == kind]

    def wait(self, pred, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {[r for _, r in self.replies][-5:]}")
            self.pump(time.monotonic() + 0.2)


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def wait_ready(d, endpoint: str, ctx: zmq.Context, image: bytes) -> None:
    """Ping with a real request until the daemon answers (it loads its model first)."""
    c = Client(endpoint, ctx)
    c.send(image, request_id="ping")
    c.wait(lambda: c.of("result"), 90, f"the daemon to answer a first request\n{d.log()[-1500:]}")
    c.sock.close(0)


def test_concurrent_clients_each_get_exactly_one_result(fall_onnx_320: Path, sample_images, test_media,
                                                        daemon_factory, collector_factory, zctx) -> None:
    cfg = request_config(fall_onnx_320, [{"id": "cam", "url": str(test_media["bus"].mp4), "loop": True, "fps": 5}],
                         queue_size=64)
    d = daemon_factory(cfg)
    ep = cfg["requests"]["endpoint"]
    bus = sample_images[0].read_bytes()
    wait_ready(d, ep, zctx, bus)
    pub = collector_factory(cfg["publisher"]["endpoint"], [b"req/"])
    wait_until(lambda: True, 1)
    clients = [Client(ep, zctx) for _ in range(6)]
    images = [p.read_bytes() for p in sample_images]
    for k, c in enumerate(clients):
        for i in range(5):
            c.send(images[i % 2], request_id=i, client_id=f"client{k}")

    def run(c: Client) -> None:
        c.wait(lambda: len(c.of("result")) + len(c.of("error")) >= 5, 120, "five answers")
        c.pump(time.monotonic() + 1.0)     # any duplicate would arrive in this grace period
    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    task_ids: list[str] = []
    for c in clients:
        assert len(c.of("accepted")) == 5 and not c.of("error") and not c.of("busy")
        results = c.of("result")
        assert sorted(r["request_id"] for r in results) == [0, 1, 2, 3, 4]
        assert Counter(r["task_id"] for r in results).most_common(1)[0][1] == 1      # never twice
        assert {r["task_id"] for r in results} == {a["task_id"] for a in c.of("accepted")}
        for r in results:
            want = (810, 1080) if r["request_id"] % 2 == 0 else (1280, 720)
            assert (r["width"], r["height"]) == want
            assert r["detections"] and all(det["label"] in ("Normal", "Fall") for det in r["detections"])
            t = r["timings_ms"]
            assert t["total"] >= t["queue"] and t["infer"] > 0
        task_ids += [r["task_id"] for r in results]
    assert len(set(task_ids)) == 30
    wait_until(lambda: len(pub.of("result")) >= 30, 20, what="results published on the PUB socket")
    assert {m["client_id"] for m in pub.of("result")} == {f"client{k}" for k in range(6)}
    assert d.stop() == 0


def test_busy_when_full_and_the_queue_never_grows(fall_onnx_320: Path, sample_images, daemon_factory,
                                                  collector_factory, zctx) -> None:
    cfg = request_config(fall_onnx_320, [], queue_size=2)
    cfg["publisher"]["stats_interval_s"] = 0.5
    d = daemon_factory(cfg)
    ep = cfg["requests"]["endpoint"]
    bus = sample_images[0].read_bytes()
    wait_ready(d, ep, zctx, bus)
    stats = collector_factory(cfg["publisher"]["endpoint"], [b"sys/stats"])
    c = Client(ep, zctx)
    for i in range(40):
        c.send(bus, request_id=i)
    c.wait(lambda: len(c.of("accepted")) + len(c.of("busy")) == 40 and
           len(c.of("result")) == len(c.of("accepted")), 120, "every request answered")
    c.pump(time.monotonic() + 1.0)
    accepted = {r["request_id"] for r in c.of("accepted")}
    busy = {r["request_id"] for r in c.of("busy")}
    assert busy and accepted and not accepted & busy
    assert {r["request_id"] for r in c.of("result")} == accepted     # busy ones were not taken
    wait_until(lambda: stats.of("stats"), 20, what="a stats message")
    assert all(m["requests"]["queued"] <= 2 for m in stats.of("stats"))
    last = stats.of("stats")[-1]["requests"]
    assert last["busy"] >= len(busy) and last["accepted"] >= len(accepted)
    assert d.stop() == 0


def test_priorities_and_shares_under_camera_overload(fall_onnx_320: Path, sample_images, test_media,
                                                     daemon_factory, collector_factory, zctx) -> None:
    cams = [{"id": f"c{i}", "url": str(test_media["bus"].mp4), "loop": True, "realtime": False} for i in range(2)]
    cfg = request_config(fall_onnx_320, cams, queue_size=64, share=0.25)
    cfg["scheduler"]["max_batch"] = 4
    d = daemon_factory(cfg)
    ep = cfg["requests"]["endpoint"]
    img = sample_images[1].read_bytes()
    wait_ready(d, ep, zctx, img)
    cams_seen = collector_factory(cfg["publisher"]["endpoint"], [b"cam/"])
    c = Client(ep, zctx)
    for i in range(12):
        c.send(img, request_id=f"low{i}", priority=-5)
    for i in range(12):
        c.send(img, request_id=f"high{i}", priority=5)
    t0 = time.time()
    c.wait(lambda: len(c.of("result")) == 24, 180, "all 24 results")
    order = [r["request_id"] for r in c.of("result")]
    rank = {rid: k for k, rid in enumerate(order)}
    mean_high = sum(rank[f"high{i}"] for i in range(12)) / 12
    mean_low = sum(rank[f"low{i}"] for i in range(12)) / 12
    assert mean_high < mean_low, order          # the later, higher-priority ones went first
    # The cameras kept being served during the burst: requests took only their share.
    during = [m for m in cams_seen.of("detections") if m["publish_ts"] > t0]
    assert len(during) >= 8, len(during)
    assert d.stop() == 0


def test_bad_requests_get_a_named_error_and_hurt_nobody(fall_onnx_320: Path, sample_images, test_media,
                                                        daemon_factory, collector_factory, zctx) -> None:
    cfg = request_config(fall_onnx_320, [{"id": "cam", "url": str(test_media["bus"].mp4), "loop": True, "fps": 5}],
                         max_image_bytes=100_000)
    d = daemon_factory(cfg)
    ep = cfg["requests"]["endpoint"]
    small = sample_images[1].read_bytes()           # zidane.jpg, under 100 kB
    big = sample_images[0].read_bytes()             # bus.jpg, over 100 kB
    assert len(small) < 100_000 < len(big)
    wait_ready(d, ep, zctx, small)
    c = Client(ep, zctx)
    c.send(b"\xff\xd8\xff\xe0 not really a jpeg", request_id="corrupt")
    c.send(big, request_id="oversized")
    c.send(small, request_id="unknown", colour="red")
    c.send(small, request_id="wrongtype", priority="urgent")
    c.sock.send_multipart([b"{not json", small])
    c.sock.send_multipart([b'{"v": 1, "request_id": "onepart"}'])
    c.send(small, request_id="fine")
    c.wait(lambda: len(c.of("error")) >= 6 and c.of("result"), 60, "six errors and one result")
    errors = {r.get("request_id"): r["error"] for r in c.of("error")}
    assert "could not be decoded" in errors["corrupt"]
    assert "larger than the limit" in errors["oversized"]
    assert "'colour'" in errors["unknown"] and "unknown field" in errors["unknown"]
    assert "'priority'" in errors["wrongtype"]
    assert "onepart" in errors and "2 message parts" in errors["onepart"]
    assert any("not valid JSON" in e for e in errors.values())
    assert c.of("result")[0]["request_id"] == "fine"
    assert not c.of("accepted")[1:]                  # only the good one was accepted
    cams = collector_factory(cfg["publisher"]["endpoint"], [b"cam/cam/det"])
    wait_until(lambda: len(cams.of("detections")) >= 3, 30, what="the camera still publishing")
    assert d.stop() == 0


def test_req_socket_clients_work_too(fall_onnx_320: Path, sample_images, daemon_factory, zctx) -> None:
    cfg = request_config(fall_onnx_320, [])
    d = daemon_factory(cfg)
    ep = cfg["requests"]["endpoint"]
    wait_ready(d, ep, zctx, sample_images[1].read_bytes())
    req = zctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(ep)
    req.send_multipart([json.dumps({"request_id": 7, "conf": 0.5}).encode(), sample_images[1].read_bytes()])
    assert req.poll(30000)
    accepted = json.loads(req.recv_multipart()[-1])
    assert accepted["type"] == "accepted" and accepted["request_id"] == 7
    req.close(0)
    assert d.stop() == 0


def test_shutdown_answers_every_accepted_request(fall_onnx_320: Path, sample_images, test_media,
                                                 daemon_factory, zctx) -> None:
    cams = [{"id": "c", "url": str(test_media["bus"].mp4), "loop": True, "realtime": False}]
    cfg = request_config(fall_onnx_320, cams, queue_size=100)
    d = daemon_factory(cfg)
    ep = cfg["requests"]["endpoint"]
    img = sample_images[0].read_bytes()
    wait_ready(d, ep, zctx, img)
    c = Client(ep, zctx)
    for i in range(40):
        c.send(img, request_id=i)
    c.wait(lambda: len(c.of("accepted")) == 40, 60, "40 accepted")
    d.signal(signal.SIGTERM)
    c.pump(time.monotonic() + 8.0)
    d.proc.wait(20)
    assert d.proc.returncode == 0
    finals = c.of("result") + [r for r in c.of("error") if "task_id" in r]
    per_task = Counter(r["task_id"] for r in finals)
    assert set(per_task) == {a["task_id"] for a in c.of("accepted")}       # every accepted one answered
    assert max(per_task.values()) == 1                                     # and only once
    errors = [r for r in c.of("error") if "task_id" in r]
    assert all("shutting down" in r["error"] for r in errors)
    assert c.of("result")                     # the ones already in the pipeline were finished


def test_detect_command(fall_onnx_320: Path, sample_images, daemon_factory, zctx, tmp_path: Path) -> None:
    cfg = request_config(fall_onnx_320, [])
    d = daemon_factory(cfg)
    ep = cfg["requests"]["endpoint"]
    wait_ready(d, ep, zctx, sample_images[1].read_bytes())
    out = tmp_path / "annotated"
    r = subprocess.run([sys.executable, "-m", "streamd.cli", "detect", *map(str, sample_images), "--endpoint", ep,
                        "--out", str(out), "--client-id", "cli"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and all("Normal:" in line for line in lines)
    assert (out / "bus.jpg").stat().st_size > 10000 and (out / "zidane.jpg").is_file()
    bad = subprocess.run([sys.executable, "-m", "streamd.cli", "detect", "/nonexistent.jpg", "--endpoint", ep],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no such file" in bad.stderr
    assert d.stop() == 0
