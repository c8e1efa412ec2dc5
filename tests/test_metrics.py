"""The daemon's Prometheus collectors and its HTTP endpoint (/metrics, /healthz).

What prometheus_client renders is read back with a small strict parser of text format
0.0.4, so every test that renders also checks the page is well-formed and holds exactly the
names, labels and values the daemon promises. HTTP is real sockets on loopback."""

from __future__ import annotations

import gzip
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

import pytest
from prometheus_client import generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from streamd.entities import FrameResult
from streamd.errors import StreamdError
from streamd.service.http import MetricsServer
from streamd.service.metrics import (CAMERA_STATES, DaemonCollector, GpuCollector, PipelineMetrics, Registry,
                                     build_registry)
from streamd.service.requests import RequestMetrics
from tests.fixtures_stats import camera_stats, daemon_stats

# ---- a strict reader of the text format --------------------------------------------------------------
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_HELP = re.compile(rf"^# HELP ({_NAME}) (.*)$")
_TYPE = re.compile(rf"^# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)$")
_SAMPLE = re.compile(rf"^({_NAME})(\{{.*\}})? (\S+)$")

Labels = tuple[tuple[str, str], ...]


def _unescape(s: str, escapes: dict[str, str]) -> str:
    out, i = [], 0
    while i < len(s):
        ch = s[i]
        if ch == "\\":
            nxt = s[i + 1] if i + 1 < len(s) else ""
            assert nxt in escapes, f"bad escape \\{nxt} in {s!r}"
            out.append(escapes[nxt])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _parse_labels(text: str) -> Labels:
    """``{a="x",b="y\\"z"}`` -> (("a", "x"), ("b", 'y"z')), refusing anything malformed."""
    assert text[0] == "{" and text[-1] == "}"
    body, pairs, i = text[1:-1], [], 0
    while i < len(body):
        m = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="').match(body, i)
        assert m, f"bad label at {body[i:]!r}"
        i = m.end()
        j = i
        while body[j] != '"':
            assert body[j] != "\n", "raw newline in a label value"
            j += 2 if body[j] == "\\" else 1
        pairs.append((m.group(1), _unescape(body[i:j], {"\\": "\\", '"': '"', "n": "\n"})))
        i = j + 1
        if i < len(body):
            assert body[i] == ",", f"expected ',' at {body[i:]!r}"
            i += 1
    names = [k for k, _ in pairs]
    assert len(set(names)) == len(names), f"duplicate label in {text}"
    return tuple(pairs)


def _value(text: str) -> float:
    assert re.fullmatch(r"[+-]Inf|NaN|[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text), f"bad value {text!r}"
    return float(text.replace("Inf", "inf"))


def parse(text: str) -> dict[str, dict[str, Any]]:
    """family -> {"help", "type", "samples": {(sample name, labels): value}}"""
    assert text == "" or text.endswith("\n")
    fams: dict[str, dict[str, Any]] = {}
    current: str | None = None
    lines = text.split("\n")[:-1]
    i = 0
    while i < len(lines):
        m = _HELP.match(lines[i])
        assert m, f"expected a HELP line, got {lines[i]!r}"
        name = m.group(1)
        assert name not in fams, f"family {name} appears twice"
        t = _TYPE.match(lines[i + 1])
        assert t and t.group(1) == name, f"HELP {name} not followed by its TYPE"
        fam = fams[name] = {"help": _unescape(m.group(2), {"\\": "\\", "n": "\n"}), "type": t.group(2),
                            "samples": {}}
        current = name
        i += 2
        suffixes = ("_bucket", "_sum", "_count") if fam["type"] == "histogram" else ("",)
        while i < len(lines) and not lines[i].startswith("#"):
            s = _SAMPLE.match(lines[i])
            assert s, f"bad sample line {lines[i]!r}"
            sname, labels = s.group(1), _parse_labels(s.group(2)) if s.group(2) else ()
            assert any(sname == current + suf for suf in suffixes), f"{sname} inside family {current}"
            key = (sname, labels)
            assert key not in fam["samples"], f"duplicate series {key}"
            fam["samples"][key] = _value(s.group(3))
            i += 1
        if fam["type"] == "histogram":
            _check_histogram(name, fam["samples"])
    return fams


def _check_histogram(name: str, samples: dict[tuple[str, Labels], float]) -> None:
    series: dict[Labels, list[tuple[float, float]]] = {}
    for (sname, labels), v in samples.items():
        if sname == name + "_bucket":
            le = dict(labels)["le"]
            rest = tuple(p for p in labels if p[0] != "le")
            series.setdefault(rest, []).append((_value(le), v))
    for rest, buckets in series.items():
        les = [b[0] for b in buckets]
        assert les == sorted(les) and les[-1] == math.inf, f"{name}{rest}: buckets out of order or no +Inf"
        counts = [b[1] for b in buckets]
        assert counts == sorted(counts), f"{name}{rest}: buckets not cumulative"
        assert samples[(name + "_count", rest)] == counts[-1]
        assert (name + "_sum", rest) in samples


def render(collector: Any) -> str:
    """The page a scrape without an Accept header gets (format 0.0.4)."""
    return generate_latest(collector).decode("utf-8")


def registry_of(*collectors: Any) -> Registry:
    reg = Registry()
    for c in collectors:
        reg.register(c)
    return reg


def series(fams: dict[str, dict[str, Any]], name: str) -> dict[Labels, float]:
    """name's samples (of any suffix matching exactly ``name``) keyed by labels."""
    for fam in fams.values():
        out = {labels: v for (sname, labels), v in fam["samples"].items() if sname == name}
        if out:
            return out
    return {}


# ---- the daemon's stats dict ----------------------------------------------------------------------------
def test_daemon_collector_follows_cameras_between_scrapes() -> None:
    current = daemon_stats({"door": {**camera_stats(), "objects": {"live": 3, "total": 17, "errors": 1}},
                            "yard": camera_stats("reconnecting", 7)})
    reg = registry_of(DaemonCollector(lambda: current))

    fams = parse(render(reg))
    assert series(fams, "streamd_camera_frames_decoded_total") == {(("camera", "door"),): 100,
                                                                   (("camera", "yard"),): 7}
    assert fams["streamd_camera_frames_decoded_total"]["type"] == "counter"
    assert series(fams, "streamd_camera_frames_skipped_total") == {(("camera", "door"),): 200,
                                                                   (("camera", "yard"),): 14}
    assert series(fams, "streamd_camera_frames_inferred_total")[(("camera", "door"),)] == 95
    assert series(fams, "streamd_camera_frames_published_total")[(("camera", "door"),)] == 94
    assert series(fams, "streamd_camera_frames_dropped_total")[(("camera", "door"), ("cause", "fps_cap"))] == 40
    assert len(series(fams, "streamd_camera_frames_dropped_total")) == 6
    assert series(fams, "streamd_camera_reconnects_total")[(("camera", "yard"),)] == 1
    assert series(fams, "streamd_camera_decode_errors_total")[(("camera", "yard"),)] == 0
    assert series(fams, "streamd_camera_queue_depth")[(("camera", "door"),)] == 2
    assert fams["streamd_camera_queue_depth"]["type"] == "gauge"
    assert series(fams, "streamd_camera_frame_width_pixels")[(("camera", "door"),)] == 1920
    # Only the tracked camera has object series.
    assert series(fams, "streamd_camera_objects_live") == {(("camera", "door"),): 3}
    assert fams["streamd_camera_objects_live"]["type"] == "gauge"
    assert series(fams, "streamd_camera_objects_total") == {(("camera", "door"),): 17}
    assert fams["streamd_camera_objects_total"]["type"] == "counter"
    assert series(fams, "streamd_camera_tracking_errors_total") == {(("camera", "door"),): 1}
    states = series(fams, "streamd_camera_state")
    assert len(states) == 2 * len(CAMERA_STATES)
    assert {dict(k)["state"] for k, v in states.items() if v == 1 and dict(k)["camera"] == "yard"} == {"reconnecting"}
    assert sum(states.values()) == 2
    assert series(fams, "streamd_publisher_messages_sent_total") == {(): 130}
    assert series(fams, "streamd_publisher_messages_dropped_total") == {(): 1}
    assert series(fams, "streamd_scheduler_batches_total") == {(): 40}
    assert series(fams, "streamd_scheduler_frames_total") == {(): 118}
    assert series(fams, "streamd_uptime_seconds") == {(): 3723.4}

    # A reload removes yard and adds gate: yard's series are gone, not frozen.
    current = daemon_stats({"door": camera_stats(n=150), "gate": camera_stats("connecting", 0)})
    text = render(reg)
    assert 'camera="yard"' not in text
    fams = parse(text)
    assert series(fams, "streamd_camera_frames_decoded_total") == {(("camera", "door"),): 150,
                                                                   (("camera", "gate"),): 0}
    assert len(series(fams, "streamd_camera_state")) == 2 * len(CAMERA_STATES)

    # No cameras at all: families still declared, with no samples.
    current = daemon_stats({})
    fams = parse(render(reg))
    assert series(fams, "streamd_camera_frames_decoded_total") == {}
    assert "streamd_camera_state" in fams


def test_state_unknown_to_this_list_is_still_exported() -> None:
    reg = registry_of(DaemonCollector(lambda: daemon_stats({"x": camera_stats("warming_up")})))
    states = series(parse(render(reg)), "streamd_camera_state")
    assert states[(("camera", "x"), ("state", "warming_up"))] == 1
    assert sum(states.values()) == 1


def result(cam: str, capture_mono: float, queue_s: float, infer_s: float) -> FrameResult:
    return FrameResult(cam, 1, time.time(), capture_mono, 640, 480, (),
                       {"queue": queue_s, "preprocess": 0.001, "infer_wait": 0.0, "infer": infer_s, "post": 0.001})


def test_pipeline_metrics_from_one_batch_of_results() -> None:
    live = ["door", "yard"]
    pm = PipelineMetrics(camera_ids=lambda: live)
    reg = registry_of(pm)
    now = 1000.0
    pm.observe_results([result("door", now - 0.12, 0.03, 0.06), result("yard", now - 3.0, 0.02, 0.06),
                        result("door", now - 0.2, 0.04, 0.06)], now_mono=now)
    pm.observe_results([], now_mono=now)   # an empty batch is not a batch
    fams = parse(render(reg))
    assert series(fams, "streamd_batch_size_count") == {(): 1}
    assert series(fams, "streamd_batch_size_sum") == {(): 3}
    assert series(fams, "streamd_batch_size_bucket")[(("le", "2.0"),)] == 0
    assert series(fams, "streamd_batch_size_bucket")[(("le", "4.0"),)] == 1
    assert series(fams, "streamd_inference_seconds_count") == {(): 1}
    assert series(fams, "streamd_queue_seconds_count") == {(): 3}
    assert series(fams, "streamd_queue_seconds_bucket")[(("le", "0.025"),)] == 1
    c2p = series(fams, "streamd_capture_to_publish_seconds_count")
    assert c2p == {(("camera", "door"),): 2, (("camera", "yard"),): 1}
    assert series(fams, "streamd_capture_to_publish_seconds_sum")[(("camera", "door"),)] == pytest.approx(0.32)
    assert series(fams, "streamd_capture_to_publish_seconds_bucket")[(("camera", "yard"), ("le", "2.5"))] == 0
    assert series(fams, "streamd_capture_to_publish_seconds_bucket")[(("camera", "yard"), ("le", "5.0"))] == 1

    live.remove("yard")            # camera removed: its latency series goes with it
    fams = parse(render(reg))
    assert series(fams, "streamd_capture_to_publish_seconds_count") == {(("camera", "door"),): 2}
    pm.forget_camera("door")
    assert series(parse(render(reg)), "streamd_capture_to_publish_seconds_count") == {}


def test_request_metrics_and_two_daemons_in_one_process() -> None:
    # Each daemon has its own registry: the same metric names twice in one process do not
    # collide, and each page holds only its own daemon's numbers.
    first, second = RequestMetrics(), RequestMetrics()
    regs = [build_registry(lambda: daemon_stats({}), PipelineMetrics(), process=False, gpu=False)
            for _ in range(2)]
    regs[0].register(first)
    regs[1].register(second)
    for outcome in ("accepted", "accepted", "busy"):
        first.outcomes.labels(outcome=outcome).inc()
    first.total_seconds.observe(0.3)
    second.outcomes.labels(outcome="rejected").inc()
    assert first.outcome_counts() == {"accepted": 2, "busy": 1}
    assert second.outcome_counts() == {"rejected": 1}

    one, two = parse(render(regs[0])), parse(render(regs[1]))
    assert series(one, "streamd_requests_total") == {(("outcome", "accepted"),): 2, (("outcome", "busy"),): 1}
    assert series(two, "streamd_requests_total") == {(("outcome", "rejected"),): 1}
    assert one["streamd_requests_total"]["type"] == "counter"
    assert series(one, "streamd_request_total_seconds_count") == {(): 1}
    assert series(two, "streamd_request_total_seconds_count") == {(): 0}
    assert {"streamd_request_queue_seconds", "streamd_request_inference_seconds"} <= set(one)
    # Only the names the daemon documents: no "_created" series beside every counter.
    assert not [name for name in one if name.endswith("_created")]
    # Within one registry a name is refused the second time (collectors describe their names).
    with pytest.raises(ValueError, match="streamd_requests_total"):
        regs[0].register(RequestMetrics())


# ---- process and GPU -----------------------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")
def test_process_metrics_are_plausible() -> None:
    reg = build_registry(gpu=False)
    burn_until = time.process_time() + 0.05
    while time.process_time() < burn_until:   # make sure some CPU time was spent
        pass
    fams = parse(render(reg))
    rss = series(fams, "process_resident_memory_bytes")[()]
    vms = series(fams, "process_virtual_memory_bytes")[()]
    assert 1_000_000 < rss <= vms
    cpu = series(fams, "process_cpu_seconds_total")[()]
    assert 0.04 <= cpu <= time.process_time() + 0.05      # /proc counts in clock ticks
    assert fams["process_cpu_seconds_total"]["type"] == "counter"
    assert series(fams, "process_open_fds")[()] >= 3
    assert series(fams, "process_threads")[()] >= 1
    start = series(fams, "process_start_time_seconds")[()]
    # Within this process's lifetime: no later than now, and not before the test run began
    # by more than any sane pytest session (generous, clock-tick granularity aside).
    assert time.time() - 24 * 3600 < start <= time.time() + 1


def test_gpu_collector_without_nvml_exports_nothing() -> None:
    gpu = GpuCollector()
    fams = gpu.collect()
    if gpu.available:   # a machine with a working NVIDIA driver: the families must be sane
        parsed = parse(render(gpu))
        assert set(parsed) == {"streamd_gpu_utilization_ratio", "streamd_gpu_memory_used_bytes",
                               "streamd_gpu_memory_total_bytes"}
        for v in series(parsed, "streamd_gpu_utilization_ratio").values():
            assert 0 <= v <= 1
    else:               # pynvml missing, or present with no driver (nvmlInit fails)
        assert fams == []
        assert gpu.collect() == []
    gpu.close()
    gpu.close()


def test_gpu_collector_when_pynvml_cannot_be_imported() -> None:
    # A fresh interpreter in which `import pynvml` raises ImportError (None in sys.modules
    # is how Python marks a module as unimportable), like an install without nvidia-ml-py.
    code = (
        "import sys, logging\n"
        "sys.modules['pynvml'] = None\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from streamd.service.metrics import build_registry, GpuCollector\n"
        "g = GpuCollector()\n"
        "assert g.collect() == [] and not g.available\n"
        "from prometheus_client import generate_latest\n"
        "text = generate_latest(build_registry(lambda: {}, None)).decode()\n"
        "assert 'streamd_gpu' not in text and 'process_resident_memory_bytes' in text, text\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert proc.stderr == ""


# ---- HTTP ---------------------------------------------------------------------------------------------------
def http_get(url: str, method: str = "GET", **headers: str) -> tuple[int, str, str]:
    req = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


@pytest.fixture
def server_parts() -> Iterator[tuple[MetricsServer, dict[str, Any]]]:
    knobs: dict[str, Any] = {"unhealthy": None, "explode": False}
    stats = daemon_stats({"door": camera_stats()})

    class Flaky:
        def collect(self) -> list[Metric]:
            if knobs["explode"]:
                raise RuntimeError("stats went away")
            return [GaugeMetricFamily("t_flaky", "Sometimes fails.", value=1)]

    pm = PipelineMetrics()
    reg = build_registry(lambda: stats, pm)
    reg.register(Flaky())
    server = MetricsServer(reg, "127.0.0.1", 0, health=lambda: knobs["unhealthy"])
    server.start()
    try:
        yield server, knobs
    finally:
        server.stop()


def test_http_scrape_health_and_errors(server_parts: tuple[MetricsServer, dict[str, Any]]) -> None:
    server, knobs = server_parts
    assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
    assert any(t.name == "http" and t.daemon for t in threading.enumerate())

    code, ctype, body = http_get(server.url + "/metrics")
    assert (code, ctype) == (200, "text/plain; version=0.0.4; charset=utf-8")
    fams = parse(body)
    assert series(fams, "streamd_camera_frames_decoded_total") == {(("camera", "door"),): 100}
    assert "streamd_batch_size" in fams and "process_resident_memory_bytes" in fams
    assert series(fams, "t_flaky") == {(): 1}
    assert http_get(server.url + "/metrics?x=1")[0] == 200

    assert http_get(server.url + "/healthz")[::2] == (200, "ok\n")
    knobs["unhealthy"] = "inference thread failed: RuntimeError"
    assert http_get(server.url + "/healthz")[::2] == (503, "inference thread failed: RuntimeError\n")
    knobs["unhealthy"] = None
    assert http_get(server.url + "/healthz")[0] == 200

    assert http_get(server.url + "/")[0] == 404
    assert http_get(server.url + "/metricsx")[0] == 404

    knobs["explode"] = True
    code, _, body = http_get(server.url + "/metrics")
    assert code == 500 and "RuntimeError: stats went away" in body and len(body) < 400
    knobs["explode"] = False
    code, _, body = http_get(server.url + "/metrics")     # still serving, and whole again
    assert code == 200 and "t_flaky 1.0" in body


def test_negotiated_formats_and_head(server_parts: tuple[MetricsServer, dict[str, Any]]) -> None:
    server, _ = server_parts
    # A Prometheus server asks for OpenMetrics; the library answers in it.
    code, ctype, body = http_get(server.url + "/metrics", Accept="application/openmetrics-text; version=1.0.0")
    assert code == 200 and ctype.startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n") and 'streamd_camera_frames_decoded_total{camera="door"} 100.0' in body
    req = urllib.request.Request(server.url + "/metrics", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert "streamd_batch_size" in parse(gzip.decompress(resp.read()).decode())
    # ?name[]= narrows the page to the families asked for.
    code, _, body = http_get(server.url + "/metrics?name[]=streamd_uptime_seconds")
    assert code == 200 and set(parse(body)) == {"streamd_uptime_seconds"}
    for path in ("/metrics", "/healthz"):
        code, _, body = http_get(server.url + path, method="HEAD")
        assert (code, body) == (200, "")


def test_many_concurrent_scrapes(server_parts: tuple[MetricsServer, dict[str, Any]]) -> None:
    server, _ = server_parts
    codes: list[int] = []

    def scrape() -> None:
        for _ in range(5):
            codes.append(http_get(server.url + "/metrics")[0])
    threads = [threading.Thread(target=scrape) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert codes == [200] * 30


def test_health_check_that_raises_reads_as_unhealthy() -> None:
    def broken() -> str | None:
        raise KeyError("pipeline")
    server = MetricsServer(Registry(), port=0, health=broken)
    server.start()
    try:
        code, _, body = http_get(server.url + "/healthz")
        assert code == 503 and "KeyError" in body
        code, _, body = http_get(server.url + "/metrics")
        assert (code, body) == (200, "")     # an empty registry is a valid, empty page
    finally:
        server.stop()


def test_stop_frees_the_port_and_busy_port_fails_clearly() -> None:
    server = MetricsServer(Registry(), port=0)
    server.start()
    port = server.port
    with pytest.raises(StreamdError, match=f"cannot serve HTTP on 127.0.0.1:{port}"):
        MetricsServer(Registry(), port=port)
    server.stop()
    server.stop()                                   # idempotent
    assert not server.is_alive
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with pytest.raises(RuntimeError):
        server.start()
    # Stopping a server that never started must not hang.
    never = MetricsServer(Registry(), port=0)
    t0 = time.monotonic()
    never.stop()
    assert time.monotonic() - t0 < 5
