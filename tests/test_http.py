"""The daemon's HTTP server: detect/tasks, cameras, pictures, WebSocket push, auth and the live
view, all against a real daemon process on loopback, with real pictures and a real model; the
live view in a real headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import numpy as np
import pytest

from streamd.config import parse_config
from streamd.errors import ConfigError
from tests.fixtures_daemon import free_tcp_port, wait_until
from tests.test_daemon import base_config
from tests.test_requests import Client, zctx  # noqa: F401 - zctx is a fixture

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

pytestmark = pytest.mark.slow


def http_config(model: Path, cameras: list[dict[str, Any]], **http: Any) -> dict[str, Any]:
    cfg = base_config(model, cameras)
    del cfg["metrics"]
    cfg["http"] = {"port": free_tcp_port(), **http}
    return cfg


def call(url: str, data: bytes | None = None, headers: dict[str, str] | None = None,
         method: str | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()
    except urllib.error.URLError:
        return 0, {}, b""


def base(cfg: dict[str, Any]) -> str:
    return f"http://127.0.0.1:{cfg['http']['port']}"


def wait_healthy(d, cfg: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    wait_until(lambda: call(base(cfg) + "/healthz", headers=headers)[0] == 200, 90,
               what=f"/healthz to answer 200\n{d.log()[-2000:]}")


def post_image(url: str, data: bytes, ctype: str = "image/jpeg", query: str = "") -> tuple[int, dict[str, str], Any]:
    code, headers, body = call(f"{url}/api/v1/detect{query}", data, {"Content-Type": ctype}, "POST")
    return code, headers, json.loads(body) if body else None


def multipart(fields: dict[str, str], image: bytes) -> tuple[bytes, str]:
    boundary = "streamdtestboundary"
    out = b""
    for k, v in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
    out += (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n'
            f'Content-Type: image/jpeg\r\n\r\n').encode() + image + f"\r\n--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def metric(url: str, name: str, **labels: str) -> float | None:
    """One sample's value from the daemon's /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families
    for fam in text_string_to_metric_families(call(f"{url}/metrics")[2].decode()):
        for sample in fam.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def task(url: str, location: str, wait: float = 0) -> dict[str, Any]:
    code, _, body = call(f"{url}{location}?wait={wait}")
    assert code == 200, body
    return json.loads(body)


def test_detect_tasks_cameras_and_pictures(fall_onnx_320: Path, sample_images, test_media, daemon_factory,
                                           collector_factory) -> None:
    cfg = http_config(fall_onnx_320, [{"id": "bus", "url": str(test_media["bus"].mp4), "loop": True, "fps": 5}],
                      result_ttl_s=2, max_body_bytes=1_000_000)
    d = daemon_factory(cfg)
    pub = collector_factory(cfg["publisher"]["endpoint"], [b"req/", b"sys/"])
    url = base(cfg)
    wait_healthy(d, cfg)
    # Subscribed for real (a daemon-wide message arrived) before any result can be published.
    wait_until(lambda: pub.of("heartbeat") or pub.of("stats"), 30, what="the subscription to take")
    bus = sample_images[0].read_bytes()

    # Raw body: 202 at once, then the result on a long poll.
    code, headers, body = post_image(url, bus)
    assert code == 202 and body["status"] == "pending", body
    assert headers["Location"] == f"/api/v1/tasks/{body['task_id']}"
    done = task(url, headers["Location"], wait=60)
    assert done["status"] == "done", done
    assert (done["width"], done["height"]) == (810, 1080)
    assert done["detections"] and all(x["label"] in ("Normal", "Fall") for x in done["detections"])
    t = done["timings_ms"]
    assert set(t) == {"queue", "inference", "total"} and t["total"] >= t["queue"] and t["inference"] > 0
    assert task(url, headers["Location"]) == done                      # read again: the same answer

    # Multipart with its own threshold and client id: fewer (or as many) boxes, all above it.
    payload, ctype = multipart({"conf": "0.7", "client_id": "door-app", "request_id": "r1"}, bus)
    code, headers, body = post_image(url, payload, ctype)
    assert code == 202, body
    strict = task(url, headers["Location"], wait=60)
    assert strict["status"] == "done" and strict["client_id"] == "door-app" and strict["request_id"] == "r1"
    assert len(strict["detections"]) <= len(done["detections"])
    assert all(x["confidence"] >= 0.7 for x in strict["detections"])
    # Answered exactly once: one published result per task.
    wait_until(lambda: len(pub.of("result")) >= 2, 20, what="both results published")
    assert Counter(m["task_id"] for m in pub.of("result")) == {done["task_id"]: 1, strict["task_id"]: 1}

    # Kept for result_ttl_s, then expired; an id never issued is unknown.
    wait_until(lambda: task(url, headers["Location"])["status"] == "expired", 15, what="the result to expire")
    assert call(f"{url}/api/v1/tasks/0123456789abcdef")[0] == 404

    # Refused with the reason: not a picture, too large, bad field.
    assert post_image(url, b"hello", "text/plain")[0] == 415
    assert post_image(url, b"\xff\xd8 not really a jpeg", "image/jpeg")[0] == 415
    assert post_image(url, bus + b"\0" * 1_000_000)[0] == 413
    big, ctype = multipart({}, bus + b"\0" * 1_000_000)
    assert post_image(url, big, ctype)[0] == 413
    code, _, body = post_image(url, bus, query="?conf=2")
    assert code == 400 and "conf" in body["error"]
    code, _, body = post_image(url, bus, query="?classes=7")
    assert code == 400 and "classes" in body["error"]

    # The cameras API and the camera's latest annotated picture.
    def streaming() -> dict[str, Any] | None:
        cams = json.loads(call(f"{url}/api/v1/cameras")[2])["cameras"]
        return cams[0] if cams and cams[0]["state"] == "streaming" and cams[0]["frame"] else None
    cam = wait_until(streaming, 60, what="the camera streaming with a frame")
    assert cam["id"] == "bus" and cam["fps"] > 0 and cam["latency_ms"] > 0 and cam["last_error"] is None
    code, headers, jpeg = call(f"{url}/api/v1/cameras/bus/latest.jpg")
    assert code == 200 and headers["Content-Type"] == "image/jpeg"
    picture = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert picture is not None and (picture.shape[1], picture.shape[0]) == (cam["width"], cam["height"])
    assert call(f"{url}/api/v1/cameras/nope/latest.jpg")[0] == 404
    # MJPEG: the first part is a whole JPEG.
    with urllib.request.urlopen(f"{url}/api/v1/cameras/bus/stream.mjpg", timeout=30) as r:
        assert r.headers["Content-Type"].startswith("multipart/x-mixed-replace")
        head = b""
        while b"\r\n\r\n" not in head:
            head += r.read(1)
        length = int(next(x for x in head.decode().split("\r\n") if x.startswith("Content-Length")).split(":")[1])
        part = r.read(length)
        assert cv2.imdecode(np.frombuffer(part, np.uint8), cv2.IMREAD_COLOR) is not None
    # /metrics on the same server, in the negotiated format.
    code, headers, body = call(f"{url}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert code == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
    assert b"streamd_camera_frames_decoded_total" in body
    assert d.stop() == 0
    assert "Traceback" not in d.log() and "Task was destroyed" not in d.log()    # streams ended cleanly


def test_429_at_the_bound_and_every_accepted_task_answered(fall_onnx_320: Path, sample_images,
                                                            daemon_factory) -> None:
    cfg = http_config(fall_onnx_320, [])
    cfg["requests"] = {"queue_size": 2}      # the queue the HTTP door shares (the ZeroMQ door stays off)
    d = daemon_factory(cfg)
    url = base(cfg)
    wait_healthy(d, cfg)
    bus = sample_images[0].read_bytes()
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: post_image(url, bus), range(36)))
    codes = Counter(code for code, _, _ in answers)
    assert set(codes) == {202, 429} and codes[429] > 0 and codes[202] >= 2, codes
    assert all(h["Retry-After"] == "1" for code, h, _ in answers if code == 429)
    locations = [h["Location"] for code, h, _ in answers if code == 202]
    assert len(set(locations)) == len(locations)
    finals = [task(url, loc, wait=60) for loc in locations]
    assert [f["status"] for f in finals] == ["done"] * len(locations)
    assert metric(url, "streamd_http_requests_total", outcome="busy") == codes[429]
    assert metric(url, "streamd_requests_total", outcome="accepted") is None      # the ZeroMQ door stayed off
    assert metric(url, "streamd_http_requests_total", outcome="completed") == codes[202]
    assert d.stop() == 0


def test_both_doors_share_the_queue_and_shutdown_answers_every_task(fall_onnx_320: Path, sample_images,
                                                                    daemon_factory, zctx) -> None:
    cfg = http_config(fall_onnx_320, [], cors_origins=["http://viewer.test"])
    cfg["requests"] = {"enabled": True, "endpoint": f"tcp://127.0.0.1:{free_tcp_port()}", "queue_size": 64}
    d = daemon_factory(cfg)
    url = base(cfg)
    wait_healthy(d, cfg)
    # CORS only for the origin listed.
    code, headers, _ = call(url + "/api/v1/cameras", headers={"Origin": "http://viewer.test"})
    assert code == 200 and headers["Access-Control-Allow-Origin"] == "http://viewer.test"
    code, headers, _ = call(url + "/api/v1/detect", method="OPTIONS", headers={"Origin": "http://viewer.test"})
    assert code == 204 and "POST" in headers["Access-Control-Allow-Methods"]
    assert "Access-Control-Allow-Origin" not in call(url + "/api/v1/cameras", headers={"Origin": "http://x.test"})[1]

    bus = sample_images[0].read_bytes()
    zmq_client = Client(cfg["requests"]["endpoint"], zctx)
    for i in range(6):
        zmq_client.send(bus, request_id=i)
    locations = []
    for _ in range(16):
        code, headers, body = post_image(url, bus)
        assert code == 202, body
        locations.append(headers["Location"])
    with ThreadPoolExecutor(len(locations)) as pool:
        polls = [pool.submit(task, url, loc, 30) for loc in locations]
        d.signal(signal.SIGTERM)
        finals = [p.result(timeout=60) for p in polls]
    statuses = Counter(f["status"] for f in finals)
    assert set(statuses) <= {"done", "failed"}, statuses
    assert all(f["error"] == "the daemon is shutting down" for f in finals if f["status"] == "failed")
    # The ZeroMQ door's requests, in the same queue, got exactly one answer each as well.
    zmq_client.wait(lambda: len(zmq_client.of("result")) + len(zmq_client.of("error")) == 6, 30,
                    "an answer to each ZeroMQ request")
    zmq_client.pump(time.monotonic() + 0.5)
    answered = [r["request_id"] for r in zmq_client.of("result") + zmq_client.of("error")]
    assert sorted(answered) == list(range(6))
    assert d.stop() == 0


def test_a_token_is_required_beyond_loopback(fall_onnx_320: Path, daemon_factory) -> None:
    token = "s3cret-token-of-24-chars"
    cfg = http_config(fall_onnx_320, [], host="0.0.0.0", allow_non_loopback=True, token="${HTTP_TOKEN}")
    d = daemon_factory(cfg, env={"HTTP_TOKEN": token})
    url = base(cfg)
    good = {"Authorization": f"Bearer {token}"}
    wait_healthy(d, cfg, good)
    for path in ("/healthz", "/metrics", "/api/v1/cameras"):
        assert call(url + path)[0] == 401
        assert call(url + path, headers={"Authorization": f"Bearer {token[:-1]}x"})[0] == 401
        assert call(url + path, headers={"Authorization": token})[0] == 401
        assert call(url + path, headers={"Cookie": f"streamd_token={token[:-1]}x"})[0] == 401
        assert call(url + path, headers=good)[0] == 200
        assert call(url + path, headers={"Cookie": f"streamd_token={token}"})[0] == 200     # the live view's way
    # The page itself holds no data: it loads, and asks for the token.
    code, _, page = call(url + "/")
    assert code == 200 and b'id="login"' in page
    assert call(url + "/live.js")[0] == 200
    code, headers, _ = call(url + "/api/v1/cameras")
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert d.stop() == 0
    assert token not in d.log()


def test_exposure_rules_name_the_field_and_line(tmp_path: Path) -> None:
    head = "model: {path: m.onnx}\n"
    with pytest.raises(ConfigError, match=r"cfg:3: http.host: 0.0.0.0 is not a loopback address"):
        parse_config(head + "http:\n  host: 0.0.0.0\n", "cfg", check_files=False)
    with pytest.raises(ConfigError, match=r"cfg:2: http.token: serving beyond loopback needs a bearer token"):
        parse_config(head + "http: {host: 0.0.0.0, allow_non_loopback: true}\n", "cfg", check_files=False)
    (tmp_path / "m.onnx").write_bytes(b"x")
    (tmp_path / "tok").write_text("short\n")
    with pytest.raises(ConfigError, match=r"http.token_file: the token must be at least 16"):
        parse_config(head + "http: {host: 0.0.0.0, allow_non_loopback: true, token_file: tok}\n", "cfg",
                     base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"cfg:3: metrics: metrics: is the older spelling"):
        parse_config(head + "http: {port: 1}\nmetrics: {port: 2}\n", "cfg", check_files=False)
    # A file that only knows metrics: keeps its server, wherever it listened, without the API.
    old = parse_config(head + "metrics: {host: 0.0.0.0, port: 9200}\n", "cfg", check_files=False)
    assert (old.http.host, old.http.port, old.http.api) == ("0.0.0.0", 9200, False)
    assert parse_config(head, "cfg", check_files=False).http.api is True


# ---- WebSocket ----------------------------------------------------------------------------------------------
class SlowClient:
    """A WebSocket client that completes the handshake and then never reads: a tiny receive
    buffer, so the daemon's side fills after a few kilobytes."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def hung_up(self) -> bool:
        """Drain what is buffered; True once the daemon closed the connection."""
        self.sock.settimeout(0.2)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True


def test_a_slow_websocket_client_is_dropped_while_a_fast_one_keeps_receiving(
        fall_onnx_320: Path, test_media, daemon_factory) -> None:
    cams = [{"id": "bus", "url": str(test_media["bus"].mp4), "loop": True, "fps": 8},
            {"id": "zidane", "url": str(test_media["zidane"].mp4), "loop": True, "fps": 8}]
    cfg = http_config(fall_onnx_320, cams, ws_queue=8)
    d = daemon_factory(cfg)
    wait_healthy(d, cfg)
    port, url = cfg["http"]["port"], base(cfg)
    fast: list[tuple[float, dict[str, Any]]] = []
    stop = threading.Event()
    subscribed = threading.Event()

    async def read_fast() -> None:
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f"ws://127.0.0.1:{port}/api/v1/ws") as ws:
                await ws.send_json({"type": "subscribe", "cameras": ["bus"],
                                    "types": ["detections", "health", "cameras"]})
                while not stop.is_set():
                    try:
                        msg = await ws.receive(timeout=0.5)
                    except asyncio.TimeoutError:
                        continue
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    body = json.loads(msg.data)
                    if body["type"] == "subscribed":
                        subscribed.set()
                    fast.append((time.monotonic(), body))
    reader = threading.Thread(target=lambda: asyncio.run(read_fast()), daemon=True)
    reader.start()
    try:
        wait_until(subscribed.is_set, 30, what="the subscription to be confirmed")
        slow = SlowClient(port, "/api/v1/ws")
        wait_until(lambda: metric(url, "streamd_websocket_clients_dropped_total") == 1, 90,
                   what=f"the slow client to be dropped\n{d.log()[-2000:]}")
        dropped_at = time.monotonic()
        wait_until(slow.hung_up, 30, what="the daemon to close the slow client's connection")
        n = len(fast)
        wait_until(lambda: len(fast) >= n + 5, 30, what="the fast client to keep receiving after the drop")
        assert metric(url, "streamd_websocket_clients_dropped_total") == 1
        assert metric(url, "streamd_websocket_clients") == 1                  # the fast one
        assert "websocket client dropped: more than 8 messages behind" in d.log()
    finally:
        stop.set()
        reader.join(5)
    after = [b for t, b in fast if t > dropped_at]
    assert after and all(b["camera"] == "bus" for b in after if b["type"] in ("detections", "health"))
    assert {b["type"] for _, b in fast} <= {"subscribed", "detections", "health", "cameras"}
    summaries = [b for _, b in fast if b["type"] == "cameras"]
    assert summaries and {c["id"] for c in summaries[-1]["cameras"]} == {"bus", "zidane"}
    frames = [b["frame"] for _, b in fast if b["type"] == "detections"]
    assert frames == sorted(frames) and len(set(frames)) == len(frames)     # in order, none twice
    assert d.stop() == 0


# ---- the live view in a browser --------------------------------------------------------------------------
def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium (tools/setup_system.sh installs it)")
def test_live_view_shows_a_camera_tile_with_a_frame(fall_onnx_320: Path, test_media, daemon_factory,
                                                    tmp_path: Path) -> None:
    cfg = http_config(fall_onnx_320, [{"id": "bus", "url": str(test_media["bus"].mp4), "loop": True, "fps": 5}])
    d = daemon_factory(cfg)
    url = base(cfg)
    wait_healthy(d, cfg)

    def dom() -> str:
        # --dump-dom prints the page after it loaded and its network went quiet for the
        # virtual-time budget; the page's own requests (pictures, WebSocket) run in real time.
        proc = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=8000",
                               "--dump-dom", url + "/"], capture_output=True, text=True, timeout=90)
        return proc.stdout

    def tile_with_updating_frames() -> str | None:
        page = dom()
        shown = re.search(r'data-shown="(\d+)"', page)
        # At least two pictures shown in one page load: the tile updates, not just loads once.
        ok = 'data-camera="bus"' in page and "data-messages=" in page and shown and int(shown.group(1)) >= 2
        return page if ok else None
    page = wait_until(tile_with_updating_frames, 120, interval=1, what="a camera tile whose frame updates")
    assert 'data-state="streaming"' in page
    assert '<h2>bus</h2>' in page
    # A screenshot of the page, kept as a test artifact (test-artifacts/ beside the tests).
    shot = ARTIFACTS / "live-view.png"
    shot.parent.mkdir(exist_ok=True)
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=8000",
                    "--window-size=1280,800", f"--screenshot={shot}", url + "/"],
                   capture_output=True, text=True, timeout=90)
    picture = cv2.imread(str(shot))
    assert picture is not None and picture.shape[:2] == (800, 1280), f"no screenshot at {shot}"
    assert d.stop() == 0
