"""The HTTP API from a client's side, against a real daemon process: ``streamd detect --http``
(the same answers as through ZeroMQ; the token from the environment), the OpenAPI document (every route the server registers
is in it, and nothing else), and 50 concurrent submitters each getting every accepted task
answered exactly once."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from streamd.config_http import HttpConfig
from streamd.pipeline.requests import RequestQueue
from streamd.service.http import HttpServer
from streamd.service.http_live import LiveHub
from streamd.service.http_tasks import HttpTasks
from streamd.service.metrics import Registry
from streamd.thresholds import PostprocessParams
from tests.fixtures_daemon import free_tcp_port, wait_until
from tests.test_http import base, call, http_config, metric, post_image, task, wait_healthy

pytestmark = pytest.mark.slow


def detect_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamd.cli", "detect", *args], capture_output=True, text=True,
                          timeout=120, env=None if env is None else {**os.environ, **env})


def registered_routes() -> set[tuple[str, str]]:
    """(method, path) of every route a server with the whole API registers, HEAD left out
    (aiohttp adds it to each GET)."""
    tasks = HttpTasks(HttpConfig(), RequestQueue(4, threading.Condition()), {0: "Normal", 1: "Fall"},
                      default_params=PostprocessParams,
                      timeout_s=10)
    server = HttpServer(Registry(), port=0, parts=[tasks, LiveHub(lambda: {})])
    try:
        return {(r.method, r.resource.canonical) for r in server.app.router.routes()
                if r.method != "HEAD" and r.resource is not None}
    finally:
        server.stop()


def test_detect_over_http_answers_as_zeromq_does_and_the_openapi_document_lists_every_route(
        fall_onnx_320: Path, sample_images, daemon_factory) -> None:
    cfg = http_config(fall_onnx_320, [])
    cfg["requests"] = {"enabled": True, "endpoint": f"tcp://127.0.0.1:{free_tcp_port()}"}
    d = daemon_factory(cfg)
    url = base(cfg)
    wait_healthy(d, cfg)
    images = [str(p) for p in sample_images]

    # The same pictures through both doors: the same lines (timings aside) and the same boxes.
    by_http = detect_cli(*images, "--http", url, "--json", "--client-id", "cli")
    by_zmq = detect_cli(*images, "--endpoint", cfg["requests"]["endpoint"], "--json", "--client-id", "cli")
    assert by_http.returncode == 0 and by_zmq.returncode == 0, by_http.stderr + by_zmq.stderr
    http_rows = [json.loads(line) for line in by_http.stdout.splitlines()]
    zmq_rows = [json.loads(line) for line in by_zmq.stdout.splitlines()]
    assert [r["image"] for r in http_rows] == images
    for h, z in zip(http_rows, zmq_rows, strict=True):
        assert set(z) <= set(h) | {"v", "service"}, set(z) - set(h)
        assert set(h["timings_ms"]) == set(z["timings_ms"]) == {"queue", "infer", "total"}
        assert (h["width"], h["height"], h["client_id"]) == (z["width"], z["height"], "cli")
        assert [x["label"] for x in h["detections"]] == [x["label"] for x in z["detections"]]
        assert h["detections"] and all(abs(a - b) < 1e-3 for x, y in zip(h["detections"], z["detections"])
                                       for a, b in zip(x["box"], y["box"]))
    text = detect_cli(*images, "--http", url)
    assert text.returncode == 0, text.stderr
    assert [line.split(" (")[0] for line in text.stdout.splitlines()] == \
           [line.split(" (")[0] for line in detect_cli(*images, "--endpoint", cfg["requests"]["endpoint"]).stdout
            .splitlines()]
    # Refusals name the reason: a file that is not a picture (415), a wrong URL scheme, no daemon.
    bad = detect_cli(__file__, "--http", url)
    assert bad.returncode == 1 and "HTTP 415" in bad.stdout, bad.stdout
    assert detect_cli(images[0], "--http", "ftp://x").returncode == 2
    gone = detect_cli(images[0], "--http", f"http://127.0.0.1:{free_tcp_port()}", "--timeout", "10")
    assert gone.returncode == 1 and "Connection refused" in gone.stdout, gone.stdout

    # The OpenAPI document, as served: every registered route described, nothing described that isn't.
    code, headers, body = call(f"{url}/api/v1/openapi.json")
    assert code == 200 and headers["Content-Type"].startswith("application/json")
    doc = json.loads(body)
    assert doc["openapi"].startswith("3.")
    described = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    routes = registered_routes()
    assert ("GET", "/api/v1/openapi.json") in routes and ("POST", "/api/v1/detect") in routes
    assert routes == described, (routes - described, described - routes)
    for p, ops in doc["paths"].items():        # each path parameter declared where it is used
        for op in ops.values():
            declared = {x["name"] for x in op.get("parameters", []) if x["in"] == "path"}
            assert declared == {s.strip("{}") for s in p.split("/") if s.startswith("{")}, p
    assert d.stop() == 0


def test_detect_over_http_sends_the_token_from_the_environment(fall_onnx_320: Path, sample_images,
                                                               daemon_factory) -> None:
    token = "s3cret-token-of-24-chars"
    cfg = http_config(fall_onnx_320, [], token="${HTTP_TOKEN}")
    d = daemon_factory(cfg, env={"HTTP_TOKEN": token})
    url = base(cfg)
    wait_healthy(d, cfg, {"Authorization": f"Bearer {token}"})
    image = str(sample_images[0])
    refused = detect_cli(image, "--http", url)
    assert refused.returncode == 1 and "HTTP 401" in refused.stdout, refused.stdout
    wrong = detect_cli(image, "--http", url, env={"STREAMD_HTTP_TOKEN": token[:-1] + "x"})
    assert wrong.returncode == 1 and "HTTP 401" in wrong.stdout, wrong.stdout
    good = detect_cli(image, "--http", url, "--json", env={"STREAMD_HTTP_TOKEN": token})
    assert good.returncode == 0, good.stdout + good.stderr
    assert json.loads(good.stdout)["detections"]
    assert all(token not in out and token[:-1] not in out
               for p in (refused, wrong, good) for out in (p.stdout, p.stderr))
    assert d.stop() == 0
    assert token not in d.log()


def test_fifty_concurrent_submitters_get_every_accepted_task_answered_once(
        fall_onnx_320: Path, sample_images, daemon_factory, collector_factory) -> None:
    cfg = http_config(fall_onnx_320, [])
    cfg["requests"] = {"queue_size": 4}           # small: 50 submitters are turned away (429) often
    d = daemon_factory(cfg)
    pub = collector_factory(cfg["publisher"]["endpoint"], [b"req/", b"sys/"])
    url = base(cfg)
    wait_healthy(d, cfg)
    wait_until(lambda: pub.of("heartbeat") or pub.of("stats"), 30, what="the subscription to take")
    pictures = [p.read_bytes() for p in sample_images]
    per_thread, submitters = 2, 50
    lock = threading.Lock()
    accepted: list[str] = []
    finals: dict[str, dict[str, Any]] = {}
    busy = Counter[int]()
    problems: list[str] = []
    start = threading.Barrier(submitters)

    def submitter(n: int) -> None:
        rng = random.Random(n)
        start.wait(30)                          # all 50 at once
        for k in range(per_thread):
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                code, headers, body = post_image(url, pictures[(n + k) % len(pictures)],
                                                 query=f"?client_id=s{n}&request_id={k}")
                if code == 202:
                    break
                if code != 429:
                    with lock:
                        problems.append(f"submitter {n}: {code} {body}")
                    return
                with lock:
                    busy[n] += 1
                # Retry-After says when; jitter so the 50 do not come back in step.
                time.sleep(float(headers["Retry-After"]) * (0.2 + 0.8 * rng.random()))
            else:
                with lock:
                    problems.append(f"submitter {n}: still busy after 120 s")
                return
            final = task(url, headers["Location"], wait=60)
            with lock:
                accepted.append(body["task_id"])
                finals[body["task_id"]] = final

    threads = [threading.Thread(target=submitter, args=(n,), daemon=True) for n in range(submitters)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a submitter never finished"
    assert not problems, problems
    assert len(accepted) == len(set(accepted)) == submitters * per_thread
    assert Counter(f["status"] for f in finals.values()) == {"done": submitters * per_thread}
    assert all(f["client_id"] == f"s{int(f['client_id'][1:])}" and f["detections"] for f in finals.values())
    assert sum(busy.values()) > 0, "50 submitters never filled a queue of 4"
    # Exactly once: one published result per accepted task, none for a refused submission.
    wait_until(lambda: len(pub.of("result")) >= len(accepted), 30, what="every result published")
    assert Counter(m["task_id"] for m in pub.of("result")) == {t: 1 for t in accepted}
    assert metric(url, "streamd_http_requests_total", outcome="busy") == sum(busy.values())
    assert metric(url, "streamd_http_requests_total", outcome="completed") == len(accepted)
    assert d.stop() == 0
