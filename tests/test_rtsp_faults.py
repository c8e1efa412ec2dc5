"""The daemon against real RTSP cameras on loopback, and the ways real cameras fail.

Each test runs the daemon as a process, the cameras as GStreamer RTSP server processes,
and reads the daemon's real PUB socket. Faults are real: SIGKILL, SIGSTOP, closed ports,
wrong passwords."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_daemon import free_tcp_port, wait_until
from tests.test_daemon import base_config

pytestmark = [pytest.mark.rtsp, pytest.mark.slow]


def states(c, cam: str) -> list[str]:
    return [m["state"] for m in c.of("health", cam)]


def dets(c, cam: str) -> list[dict[str, Any]]:
    return c.of("detections", cam)


def test_several_rtsp_cameras_publish_at_once(fall_onnx_320: Path, test_media, rtsp_server, daemon_factory,
                                              collector_factory) -> None:
    srv = rtsp_server(mounts={"/bus": test_media["bus"].images_spec(5),
                              "/pitch": test_media["zidane"].images_spec(5),
                              "/bus2": test_media["bus"].images_spec(3)})
    cams = [{"id": m, "url": srv.url(f"/{m}")} for m in ("bus", "pitch", "bus2")]
    cfg = base_config(fall_onnx_320, cams)
    d = daemon_factory(cfg)
    c = collector_factory(cfg["publisher"]["endpoint"])
    for cam in ("bus", "pitch", "bus2"):
        c.wait_for(lambda m, cam=cam: m["type"] == "detections" and m["camera"] == cam and m["detections"],
                   90, f"people detected on RTSP camera {cam}\n{d.log()[-2000:]}")
    m = dets(c, "pitch")[-1]
    assert (m["width"], m["height"]) == test_media["zidane"].size
    assert d.stop() == 0


def test_killed_camera_comes_back_by_itself(yolov8n_onnx_320: Path, test_media, rtsp_server, daemon_factory,
                                            collector_factory) -> None:
    steady = rtsp_server(mounts={"/cam": test_media["bus"].images_spec(8)})
    flaky = rtsp_server(mounts={"/cam": test_media["zidane"].images_spec(8)})
    cfg = base_config(yolov8n_onnx_320, [{"id": "steady", "url": steady.url("/cam")},
                                         {"id": "flaky", "url": flaky.url("/cam")}])
    d = daemon_factory(cfg)
    c = collector_factory(cfg["publisher"]["endpoint"])
    wait_until(lambda: len(dets(c, "flaky")) >= 5 and len(dets(c, "steady")) >= 5, 90,
               what=f"both cameras publishing\n{d.log()[-2000:]}")
    flaky.kill()
    c.wait_for(lambda m: m["type"] == "health" and m["camera"] == "flaky" and m["state"] in ("lost", "stalled"),
               30, "the killed camera reported lost")
    c.wait_for(lambda m: m["type"] == "health" and m["camera"] == "flaky" and m["state"] == "reconnecting",
               30, "a reconnect attempt")
    # While it is down the other camera keeps publishing.
    n_steady = len(dets(c, "steady"))
    wait_until(lambda: len(dets(c, "steady")) >= n_steady + 5, 30, what="the steady camera to keep going")
    n_flaky = len(dets(c, "flaky"))
    flaky.restart()
    wait_until(lambda: len(dets(c, "flaky")) >= n_flaky + 5, 60,
               what=f"the restarted camera's frames again\n{d.log()[-2000:]}")
    assert states(c, "flaky")[-1] == "streaming"
    assert d.stop() == 0


def test_stalled_camera_is_detected_and_recovered(yolov8n_onnx_320: Path, test_media, rtsp_server,
                                                  daemon_factory, collector_factory) -> None:
    srv = rtsp_server(mounts={"/cam": test_media["bus"].images_spec(8)})
    other = rtsp_server(mounts={"/cam": test_media["zidane"].images_spec(8)})
    cfg = base_config(yolov8n_onnx_320, [{"id": "frozen", "url": srv.url("/cam")},
                                         {"id": "other", "url": other.url("/cam")}])
    d = daemon_factory(cfg)
    c = collector_factory(cfg["publisher"]["endpoint"])
    wait_until(lambda: len(dets(c, "frozen")) >= 5, 90, what=f"the camera streaming\n{d.log()[-2000:]}")
    srv.pause()              # SIGSTOP: the TCP connection stays open, no frames come
    try:
        h = c.wait_for(lambda m: m["type"] == "health" and m["camera"] == "frozen" and m["state"] == "stalled",
                       40, f"the stall to be reported\n{d.log()[-2000:]}")
        assert "no frame" in h["reason"]
        n_other = len(dets(c, "other"))
        wait_until(lambda: len(dets(c, "other")) >= n_other + 5, 30, what="the other camera to keep going")
    finally:
        srv.resume()
    n = len(dets(c, "frozen"))
    wait_until(lambda: len(dets(c, "frozen")) >= n + 5, 60, what=f"frames after SIGCONT\n{d.log()[-2000:]}")
    assert states(c, "frozen")[-1] == "streaming"
    assert d.stop() == 0


def test_camera_offline_at_start_joins_when_it_appears(yolov8n_onnx_320: Path, test_media, rtsp_server,
                                                       daemon_factory, collector_factory) -> None:
    online = rtsp_server(mounts={"/cam": test_media["bus"].images_spec(8)})
    late_port = free_tcp_port()
    cfg = base_config(yolov8n_onnx_320, [{"id": "online", "url": online.url("/cam")},
                                         {"id": "late", "url": f"rtsp://127.0.0.1:{late_port}/cam"}])
    d = daemon_factory(cfg)
    c = collector_factory(cfg["publisher"]["endpoint"])
    wait_until(lambda: len(dets(c, "online")) >= 5, 90, what="the online camera publishing")
    h = c.wait_for(lambda m: m["type"] == "health" and m["camera"] == "late" and m["state"] == "reconnecting",
                   30, "the offline camera's reconnecting notice")
    assert "connection refused" in h["reason"]
    rtsp_server(mounts={"/cam": test_media["zidane"].images_spec(8)}, port=late_port)
    wait_until(lambda: len(dets(c, "late")) >= 3, 60, what=f"the late camera's frames\n{d.log()[-2000:]}")
    assert d.stop() == 0


def test_wrong_password_and_bad_path_are_reported_and_never_leak(yolov8n_onnx_320: Path, test_media,
                                                                 rtsp_server, daemon_factory,
                                                                 collector_factory) -> None:
    canary = "Canary7Pw-x91q"
    srv = rtsp_server(mounts={"/cam": test_media["bus"].images_spec(8)}, user="admin", password="right-one")
    port = srv.port
    cams = [{"id": "wrongpw", "url": f"rtsp://admin:{canary}@127.0.0.1:{port}/cam"},
            {"id": "badpath", "url": f"rtsp://admin:right-one@127.0.0.1:{port}/nope"},
            {"id": "envpw", "url": f"rtsp://127.0.0.1:{port}/cam", "username": "admin",
             "password": "${CAM_PW}"}]
    cfg = base_config(yolov8n_onnx_320, cams)
    d = daemon_factory(cfg, env={"CAM_PW": "right-one"})
    c = collector_factory(cfg["publisher"]["endpoint"])
    h = c.wait_for(lambda m: m["type"] == "health" and m["camera"] == "wrongpw" and m["state"] == "reconnecting",
                   60, f"the wrong password to be reported\n{d.log()[-2000:]}")
    assert "authentication failed" in h["reason"]
    h = c.wait_for(lambda m: m["type"] == "health" and m["camera"] == "badpath" and m["state"] == "reconnecting",
                   60, "the bad path to be reported")
    assert "not found" in h["reason"]
    # The password from the environment works.
    wait_until(lambda: len(dets(c, "envpw")) >= 3, 60, what="frames from the camera with the env password")
    wait_until(lambda: c.of("stats"), 30, what="a stats message")
    assert d.stop() == 0
    everything = d.log() + "".join(json.dumps(b) for _, b, _ in c.messages)
    assert canary not in everything
    assert "right-one" not in everything
    assert "rtsp://***@127.0.0.1" in d.log()


def test_bad_url_host_is_a_clear_health_message(yolov8n_onnx_320: Path, daemon_factory, collector_factory) -> None:
    cfg = base_config(yolov8n_onnx_320, [{"id": "nohost", "url": "rtsp://no-such-host.invalid/stream"}])
    d = daemon_factory(cfg)
    c = collector_factory(cfg["publisher"]["endpoint"])
    h = c.wait_for(lambda m: m["type"] == "health" and m["camera"] == "nohost" and m["state"] == "reconnecting",
                   60, "the unresolvable host to be reported")
    assert "does not resolve" in h["reason"] or "cannot reach" in h["reason"]
    assert d.stop() == 0


def test_sigterm_with_cameras_streaming_leaves_no_process(yolov8n_onnx_320: Path, test_media, rtsp_server,
                                                          daemon_factory, collector_factory) -> None:
    srv = rtsp_server(mounts={"/a": test_media["bus"].images_spec(8), "/b": test_media["zidane"].images_spec(8)})
    cfg = base_config(yolov8n_onnx_320, [{"id": "a", "url": srv.url("/a")}, {"id": "b", "url": srv.url("/b")}])
    d = daemon_factory(cfg)
    c = collector_factory(cfg["publisher"]["endpoint"])
    wait_until(lambda: len(dets(c, "a")) >= 3 and len(dets(c, "b")) >= 3, 90, what="both cameras")
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    d.proc.wait(15)
    assert time.monotonic() - t0 < 10
    assert d.proc.returncode == 0
    assert "stopped cleanly" in d.log()
    stopped = c.wait_for(lambda m: m["type"] == "health" and m["state"] == "stopped", 5, "stopped notices")
    assert stopped["reason"] == "daemon stopping"
