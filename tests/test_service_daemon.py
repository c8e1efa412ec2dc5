"""The daemon as a service: real signals to a real process, the systemd notify socket,
the watchdog on a hung inference, live reload, and the metrics endpoint."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import yaml

from streamd.config import load_config
from streamd.service.daemon import Daemon
from streamd.service.systemd import Notifier, Watchdog
from tests.fixtures_daemon import free_tcp_port, wait_until
from tests.test_daemon import base_config

pytestmark = pytest.mark.slow


class NotifySocket:
    """The unix datagram socket systemd would own, bound by the test."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.received: list[tuple[float, str]] = []

    def drain(self) -> list[str]:
        while True:
            try:
                data = self.sock.recv(4096)
            except (socket.timeout, BlockingIOError):
                break
            self.received.append((time.monotonic(), data.decode()))
        return [m for _, m in self.received]

    def wait_for(self, needle: str, timeout: float, after: int = 0) -> int:
        """Index of the first message at or after ``after`` containing ``needle``."""
        def find() -> int | None:
            msgs = self.drain()
            return next((i for i in range(after, len(msgs)) if needle in msgs[i]), None)
        found = wait_until(lambda: (i := find()) is not None and (i,), timeout, what=f"notify message {needle!r}")
        return found[0]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path):
    s = NotifySocket(tmp_path / "notify.sock")
    yield s
    s.close()


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pat = re.escape(name) + (r"\{" + re.escape(sel) + r"\}" if sel else "") + r" ([0-9.e+-]+)$"
    m = re.search(pat, text, re.M)
    assert m, f"{name}{{{sel}}} not in metrics"
    return float(m.group(1))


def test_notify_ready_watchdog_reload_and_stop(yolov8n_onnx_320: Path, test_media, daemon_factory,
                                               collector_factory, notify_socket: NotifySocket) -> None:
    cfg = base_config(yolov8n_onnx_320, [{"id": "a", "url": str(test_media["bus"].mp4), "loop": True}])
    d = daemon_factory(cfg, env={"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "1000000"})
    i_ready = notify_socket.wait_for("READY=1", 60)
    # READY means the PUB socket is bound: a subscriber gets heartbeats or detections at once.
    c = collector_factory(cfg["publisher"]["endpoint"])
    c.wait_for(lambda m: True, 10, "any message right after READY")
    wait_until(lambda: sum("WATCHDOG=1" in m for m in notify_socket.drain()[i_ready:]) >= 3, 20,
               what="three watchdog pings")
    d.signal(signal.SIGHUP)
    i_rel = notify_socket.wait_for("RELOADING=1", 20, after=i_ready + 1)
    assert "MONOTONIC_USEC=" in notify_socket.drain()[i_rel]
    notify_socket.wait_for("READY=1", 20, after=i_rel + 1)
    assert d.stop() == 0
    notify_socket.wait_for("STOPPING=1", 5)


def test_watchdog_pings_stop_when_inference_hangs(yolov8n_onnx_320: Path, test_media, tmp_path: Path,
                                                  notify_socket: NotifySocket) -> None:
    """A hung inference can't be produced by a healthy ONNX Runtime, so this one test wraps
    the real backend's infer with a gate the test closes."""
    cfg_path = tmp_path / "streamd.yaml"
    cfg = base_config(yolov8n_onnx_320, [{"id": "a", "url": str(test_media["bus"].mp4), "loop": True}])
    cfg["metrics"] = {"enabled": False}
    cfg_path.write_text(yaml.safe_dump(cfg))
    daemon = Daemon(load_config(cfg_path), cfg_path)
    daemon.watchdog_stall_s = 2.0
    gate = threading.Event()
    gate.set()

    def gated(real_infer: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
        def gated_infer(batch: np.ndarray) -> np.ndarray:
            while not gate.wait(0.1):
                if daemon.stop_event.is_set():
                    break
            return real_infer(batch)
        return gated_infer

    for backend in daemon.backend.backends:      # every worker of the pool
        backend.infer = gated(backend.infer)  # type: ignore[method-assign]
    notifier = Notifier({"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "1000000"})
    t = threading.Thread(target=daemon.run, kwargs={"install_signals": False, "notifier": notifier})
    t.start()
    try:
        i = notify_socket.wait_for("READY=1", 60)
        wait_until(lambda: sum("WATCHDOG=1" in m for m in notify_socket.drain()[i:]) >= 2, 20, what="pings")
        gate.clear()                      # inference hangs from the next batch on
        j = notify_socket.wait_for("inference running", 20, after=i)
        t_hung = notify_socket.received[j][0]
        # No ping for a while after the STATUS says why.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            notify_socket.drain()
        late = [m for ts, m in notify_socket.received if ts > t_hung and "WATCHDOG=1" in m]
        assert late == []
        gate.set()                        # it recovers: pings come back
        notify_socket.wait_for("WATCHDOG=1", 20, after=len(notify_socket.drain()))
    finally:
        gate.set()
        daemon.request_stop("test over")
        t.join(20)
    assert not t.is_alive()


def _write(path: Path, cfg: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    os.replace(tmp, path)


def test_sighup_applies_camera_and_threshold_changes_and_rejects_bad_config(
        yolov8n_onnx_320: Path, fall_onnx_320: Path, test_media, daemon_factory, collector_factory) -> None:
    bus, zidane = str(test_media["bus"].mp4), str(test_media["zidane"].mp4)
    cfg = base_config(yolov8n_onnx_320, [{"id": "keep", "url": bus, "loop": True, "fps": 5},
                                         {"id": "drop", "url": zidane, "loop": True, "fps": 5}])
    d = daemon_factory(cfg)
    c = collector_factory(cfg["publisher"]["endpoint"])
    wait_until(lambda: len(c.of("detections", "keep")) >= 3 and len(c.of("detections", "drop")) >= 3, 60,
               what="both cameras publishing")
    pid_threads_before = d.pid

    # 1. add one camera, remove one, lower the threshold: the kept camera is not touched.
    cfg2 = dict(cfg, cameras=[cfg["cameras"][0], {"id": "new", "url": zidane, "loop": True, "fps": 5}])
    cfg2["model"] = dict(cfg["model"], conf=0.05)
    _write(d.config_path, cfg2)
    n_keep_health = len(c.of("health", "keep"))
    d.signal(signal.SIGHUP)
    c.wait_for(lambda m: m["type"] == "health" and m["camera"] == "drop" and m["state"] == "stopped"
               and m["reason"] == "removed from the config", 30, "the removed camera to stop")
    wait_until(lambda: len(c.of("detections", "new")) >= 3, 60, what="the added camera publishing")
    assert "reload applied" in d.log() and "model unchanged" in d.log()
    assert len(c.of("health", "keep")) == n_keep_health          # untouched: no state change at all
    n_drop = len(c.of("detections", "drop"))

    # 2. an invalid config is rejected; everything keeps running as before.
    _write(d.config_path, dict(cfg2, scheduler={"max_batch": "lots"}))
    n_keep = len(c.of("detections", "keep"))
    d.signal(signal.SIGHUP)
    wait_until(lambda: "reload rejected" in d.log(), 30, what="the rejection in the log")
    assert "scheduler.max_batch" in d.log()
    wait_until(lambda: len(c.of("detections", "keep")) >= n_keep + 5, 30, what="the old config to keep running")
    assert len(c.of("detections", "drop")) == n_drop

    # 3. a new model: loaded before the old one is dropped; frames keep flowing.
    cfg3 = dict(cfg2, model=dict(cfg2["model"], path=str(fall_onnx_320), conf=0.25))
    _write(d.config_path, cfg3)
    d.signal(signal.SIGHUP)
    wait_until(lambda: "model now" in d.log(), 60, what="the model swap")
    t_swap = time.time()
    msg = c.wait_for(lambda m: m["type"] == "detections" and m["publish_ts"] > t_swap and m["detections"], 60,
                     "detections from the new model")
    assert msg["detections"][0]["label"] in ("Normal", "Fall")
    assert d.pid == pid_threads_before and d.proc.poll() is None
    assert d.stop() == 0


def test_metrics_endpoint_agrees_with_what_a_subscriber_counted(
        yolov8n_onnx_320: Path, test_media, daemon_factory, collector_factory) -> None:
    port = free_tcp_port()
    # A finite file played in real time: when it ends, every counter is final. The camera is
    # added by a reload once the subscriber provably receives (a heartbeat arrived), so the
    # subscriber sees every one of its messages.
    cfg = base_config(yolov8n_onnx_320, [])
    cfg["metrics"] = {"port": port}
    d = daemon_factory(cfg)
    c = collector_factory(cfg["publisher"]["endpoint"])
    c.wait_for(lambda m: m["type"] == "heartbeat", 60, f"a heartbeat\n{d.log()[-2000:]}")
    _write(d.config_path, dict(cfg, cameras=[{"id": "clip", "url": str(test_media["bus"].mp4), "realtime": True}]))
    d.signal(signal.SIGHUP)
    c.wait_for(lambda m: m["type"] == "health" and m["camera"] == "clip" and m["state"] == "ended", 60,
               f"the clip to end\n{d.log()[-2000:]}")
    received = c.of("detections", "clip")
    assert received and min(m["cam_seq"] for m in c.of(camera="clip")) == 1, \
        "subscriber missed the camera's first messages; counts would not compare"
    wait_until(lambda: metric(metrics_text(port), "streamd_camera_frames_published_total", camera="clip")
               == len(received), 10, what="published_total to equal what the subscriber got")
    text = metrics_text(port)
    decoded = metric(text, "streamd_camera_frames_decoded_total", camera="clip")
    dropped = sum(metric(text, "streamd_camera_frames_dropped_total", camera="clip", cause=k)
                  for k in ("queue_full", "too_old"))
    assert decoded == test_media["bus"].frame_count
    assert decoded - dropped == len(received)
    assert metric(text, "streamd_camera_state", camera="clip", state="ended") == 1
    assert metric(text, "streamd_batch_size_count") >= 1
    assert metric(text, "process_resident_memory_bytes") > 10e6
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
        assert r.status == 200
    assert d.stop() == 0


def test_a_decoder_thread_that_dies_of_a_bug_is_restarted_with_its_counters(
        yolov8n_onnx_320: Path, test_media, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug inside a decoder thread (not a camera fault, which the thread handles itself)
    kills the thread; the supervisor notices, says so, and starts a new one on the same
    queue with the same counters, and the camera's frames flow again."""
    from streamd.pipeline.sources.camera import CameraSource
    cfg_path = tmp_path / "streamd.yaml"
    cfg = base_config(yolov8n_onnx_320, [{"id": "a", "url": str(test_media["bus"].mp4), "loop": True}])
    cfg["metrics"] = {"enabled": False}
    cfg_path.write_text(yaml.safe_dump(cfg))
    real_stream = CameraSource._stream
    calls = {"n": 0}

    def stream_with_a_bug(self: CameraSource, cap: Any) -> tuple[str, str, bool]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug in the decoder loop")
        return real_stream(self, cap)

    monkeypatch.setattr(CameraSource, "_stream", stream_with_a_bug)
    daemon = Daemon(load_config(cfg_path), cfg_path)
    daemon.start()
    try:
        first = daemon.cameras["a"]
        wait_until(lambda: first.error is not None and not first.is_alive(), 30, what="the thread to die")
        reconnects_before = first.stats.reconnects

        def restarted_and_inferring() -> bool:
            daemon.supervise_once()
            cam = daemon.cameras["a"]
            return cam is not first and cam.is_alive() and daemon.pipeline.inferred_per_camera.get("a", 0) > 0

        wait_until(restarted_and_inferring, 60, what="a new decoder thread and inferred frames")
        second = daemon.cameras["a"]
        assert second.stats is first.stats and second.stats.reconnects == reconnects_before + 1
        assert second.queue is first.queue
    finally:
        daemon.request_stop("test over")
        daemon.shutdown()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def test_a_dead_decoder_thread_shows_in_healthz_health_topic_and_watchdog_status_until_restarted(
        yolov8n_onnx_320: Path, test_media, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        collector_factory, notify_socket: NotifySocket) -> None:
    """While a decoder thread that died of a bug waits for the supervisor, /healthz answers
    503 and the systemd status line names the camera (by id: the error's text quotes a URL
    with a password); the watchdog keeps pinging, since the rest of the daemon is serving.
    Once the supervisor has restarted the thread, both are healthy again."""
    from streamd.pipeline.sources.camera import CameraSource
    port = free_tcp_port()
    cfg_path = tmp_path / "streamd.yaml"
    cfg = base_config(yolov8n_onnx_320, [{"id": "gate", "url": str(test_media["bus"].mp4), "loop": True}])
    cfg["metrics"] = {"port": port}
    cfg_path.write_text(yaml.safe_dump(cfg))
    real_stream = CameraSource._stream
    go = threading.Event()
    calls = {"n": 0}

    def stream_with_a_bug(self: CameraSource, cap: Any) -> tuple[str, str, bool]:
        calls["n"] += 1
        if calls["n"] == 1:
            go.wait(30)      # the bug strikes once the test's subscriber is connected
            raise RuntimeError("a bug next to rtsp://admin:hunter2@192.0.2.7/live")
        return real_stream(self, cap)

    monkeypatch.setattr(CameraSource, "_stream", stream_with_a_bug)
    daemon = Daemon(load_config(cfg_path), cfg_path)
    sub = collector_factory(cfg["publisher"]["endpoint"], [b"cam/gate/health", b"sys/heartbeat"])
    healthz = f"http://127.0.0.1:{port}/healthz"
    watchdog = Watchdog(Notifier({"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "1000000"}),
                        daemon.watchdog_health)
    daemon.start()
    watchdog.start()
    try:
        sub.wait_for(lambda m: m["type"] == "heartbeat", 30, "a heartbeat (the subscriber is connected)")
        assert _get(healthz) == (200, "ok\n")
        first = daemon.cameras["gate"]
        go.set()
        wait_until(lambda: first.error is not None and not first.is_alive(), 30, what="the thread to die")

        problem = "camera gate: decoder thread died (RuntimeError), restart pending"
        assert _get(healthz) == (503, problem + "\n")
        assert daemon.watchdog_health() == (True, problem)
        i = notify_socket.wait_for(f"STATUS={problem}", 10)
        notify_socket.wait_for("WATCHDOG=1", 10, after=i + 1)          # the pings go on
        msg = sub.wait_for(lambda m: m["type"] == "health" and m["state"] == "stopped", 10,
                           "the camera's health message")
        assert msg["reason"] == "decoder thread died (RuntimeError)"
        for text in (*notify_socket.drain(), msg["reason"]):
            assert "hunter2" not in text and "192.0.2.7" not in text

        daemon.supervise_once()                                          # the supervisor's round
        assert daemon.cameras["gate"] is not first
        assert _get(healthz) == (200, "ok\n")
        notify_socket.wait_for("STATUS=1 cameras, publishing on", 10, after=i + 1)
        sub.wait_for(lambda m: m["type"] == "health" and m["state"] == "streaming", 30, "the camera streaming again")
    finally:
        go.set()
        watchdog.stop()
        daemon.request_stop("test over")
        daemon.shutdown()
