"""Prometheus exposition, the daemon collector, the HTTP endpoint, and ``streamd status``.

The rendered text is read back with a small strict parser of format 0.0.4, so every test
that renders also checks the output is well-formed. HTTP and ZeroMQ are real sockets on
loopback."""

from __future__ import annotations

import io
import json
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
from typing import Any, Callable, Iterator

import pytest
import zmq

from streamd import protocol
from streamd.entities import FrameResult
from streamd.errors import StreamdError
from streamd.service.metrics import (CAMERA_STATES, CONTENT_TYPE, Counter, Gauge, GpuCollector, Histogram,
                                     MetricFamily, MetricsServer, PipelineMetrics, ProcessCollector, Registry,
                                     build_registry, daemon_collector, format_value)
from streamd.client.status import format_status, format_uptime, run_status

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


def series(fams: dict[str, dict[str, Any]], name: str) -> dict[Labels, float]:
    """name's samples (of any suffix matching exactly ``name``) keyed by labels."""
    for fam in fams.values():
        out = {labels: v for (sname, labels), v in fam["samples"].items() if sname == name}
        if out:
            return out
    return {}


# ---- format ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,text", [
    (0, "0"), (3, "3"), (3.0, "3"), (-2.0, "-2"), (0.005, "0.005"), (1.5, "1.5"), (2.0 ** 53, "9007199254740992.0"),
    (1e20, "1e+20"), (float("inf"), "+Inf"), (float("-inf"), "-Inf"), (float("nan"), "NaN"), (True, "1"),
])
def test_format_value(value: float, text: str) -> None:
    assert format_value(value) == text
    if text != "NaN":
        assert float(text.replace("Inf", "inf")) == float(value)


def test_small_registry_renders_exactly() -> None:
    reg = Registry()
    c = reg.register(Counter("app_requests_total", "Requests.\nSecond line with \\ and \"quotes\".", ["path"]))
    g = reg.register(Gauge("app_temperature_celsius", "Temperature."))
    c.labels(path="/a").inc()
    c.labels("/a").inc(2)
    c.labels(path='q"u\\o\nte').inc(0.5)
    g.set(-3.25)
    assert reg.render() == (
        '# HELP app_requests_total Requests.\\nSecond line with \\\\ and "quotes".\n'
        "# TYPE app_requests_total counter\n"
        'app_requests_total{path="/a"} 3\n'
        'app_requests_total{path="q\\"u\\\\o\\nte"} 0.5\n'
        "# HELP app_temperature_celsius Temperature.\n"
        "# TYPE app_temperature_celsius gauge\n"
        "app_temperature_celsius -3.25\n")


def test_label_values_round_trip_through_escaping() -> None:
    nasty = ['back\\slash', 'quo"te', "new\nline", "all \\\"\n three", "ünïcødé ✓", "", "trailing\\"]
    reg = Registry()
    g = reg.register(Gauge("t_value", "Nasty label values.", ["v"]))
    for i, v in enumerate(nasty):
        g.labels(v=v).set(i)
    got = series(parse(reg.render()), "t_value")
    assert got == {(("v", v),): float(i) for i, v in enumerate(nasty)}


def test_histogram_buckets_are_cumulative_with_inf() -> None:
    reg = Registry()
    h = reg.register(Histogram("t_seconds", "Latency.", [0.1, 0.5, 1.0]))
    for v in (0.05, 0.1, 0.3, 0.5, 0.7, 2.0, 99.0, float("nan")):
        h.observe(v)
    text = reg.render()
    assert 't_seconds_bucket{le="+Inf"} 7\n' in text
    fams = parse(text)
    buckets = {dict(k)["le"]: v for k, v in series(fams, "t_seconds_bucket").items()}
    # A value equal to a bound counts in that bound's bucket (le means "less or equal").
    assert buckets == {"0.1": 2, "0.5": 4, "1": 5, "+Inf": 7}
    assert series(fams, "t_seconds_count") == {(): 7}
    assert series(fams, "t_seconds_sum")[()] == pytest.approx(0.05 + 0.1 + 0.3 + 0.5 + 0.7 + 2.0 + 99.0)


def test_labelled_histogram_series_can_be_removed() -> None:
    reg = Registry()
    h = reg.register(Histogram("t_seconds", "Latency.", [1.0], ["camera"]))
    h.labels(camera="a").observe(0.5)
    h.labels(camera="b").observe(5)
    fams = parse(reg.render())
    assert series(fams, "t_seconds_count") == {(("camera", "a"),): 1, (("camera", "b"),): 1}
    assert series(fams, "t_seconds_bucket")[(("camera", "b"), ("le", "1"))] == 0
    h.remove(camera="a")
    h.remove(camera="never-there")
    assert series(parse(reg.render()), "t_seconds_count") == {(("camera", "b"),): 1}


def test_misuse_is_refused() -> None:
    with pytest.raises(ValueError):
        Counter("bad-name", "x")
    with pytest.raises(ValueError):
        Gauge("g", "x", ["__reserved"])
    with pytest.raises(ValueError):
        Histogram("h", "x", [1.0], ["le"])
    with pytest.raises(ValueError):
        Histogram("h", "x", [2.0, 1.0])
    c = Counter("c_total", "x", ["a"])
    with pytest.raises(ValueError):
        c.inc()                       # labelled: needs .labels()
    with pytest.raises(ValueError):
        c.labels(b="1")
    with pytest.raises(ValueError):
        Counter("d_total", "x").inc(-1)
    reg = Registry()
    reg.register(Counter("c_total", "x"))
    with pytest.raises(ValueError):
        reg.register(Gauge("c_total", "x"))
    reg.register_collector(lambda: [MetricFamily("c_total", "again", "counter")])
    with pytest.raises(ValueError, match="twice"):
        reg.render()


def test_concurrent_updates_are_not_lost() -> None:
    c = Counter("c_total", "x", ["t"])
    h = Histogram("h", "x", [0.5])

    def work() -> None:
        for _ in range(5000):
            c.labels(t="x").inc()
            h.observe(0.25)
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert c.labels(t="x").value == 20000
    fam = h.collect()
    assert [s.value for s in fam.samples if s.name == "h_count"] == [20000]


# ---- the daemon's stats dict ----------------------------------------------------------------------------
def camera_stats(state: str = "streaming", n: int = 100) -> dict[str, Any]:
    return {"state": state, "decoded": n, "skipped": 2 * n, "inferred": n - 5, "published": n - 6,
            "dropped": {"queue_full": 3, "too_old": 2, "fps_cap": 40}, "reconnects": 1, "decode_errors": 0,
            "queue_depth": 2, "width": 1920, "height": 1080}


def daemon_stats(cameras: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"uptime_s": 3723.4, "cameras": cameras,
            "scheduler": {"batches": 40, "frames": 118, "batch_sizes": {"2": 2, "3": 38}, "infer_ms_mean": 38.25,
                          "workers": 2, "threads_per_worker": 1, "worker_batches": {"0": 21, "1": 19},
                          "max_frame_age_ms": 1000.0},
            "publisher": {"sent": 130, "dropped": 1}}


def test_daemon_collector_follows_cameras_between_scrapes() -> None:
    current = daemon_stats({"door": camera_stats(), "yard": camera_stats("reconnecting", 7)})
    reg = Registry()
    reg.register_collector(daemon_collector(lambda: current))

    fams = parse(reg.render())
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
    text = reg.render()
    assert 'camera="yard"' not in text
    fams = parse(text)
    assert series(fams, "streamd_camera_frames_decoded_total") == {(("camera", "door"),): 150,
                                                                   (("camera", "gate"),): 0}
    assert len(series(fams, "streamd_camera_state")) == 2 * len(CAMERA_STATES)

    # No cameras at all: families still declared, with no samples.
    current = daemon_stats({})
    fams = parse(reg.render())
    assert series(fams, "streamd_camera_frames_decoded_total") == {}
    assert "streamd_camera_state" in fams


def test_state_unknown_to_this_list_is_still_exported() -> None:
    reg = Registry()
    reg.register_collector(daemon_collector(lambda: daemon_stats({"x": camera_stats("warming_up")})))
    states = series(parse(reg.render()), "streamd_camera_state")
    assert states[(("camera", "x"), ("state", "warming_up"))] == 1
    assert sum(states.values()) == 1


def result(cam: str, capture_mono: float, queue_s: float, infer_s: float) -> FrameResult:
    return FrameResult(cam, 1, time.time(), capture_mono, 640, 480, (),
                       {"queue": queue_s, "preprocess": 0.001, "infer_wait": 0.0, "infer": infer_s, "post": 0.001})


def test_pipeline_metrics_from_one_batch_of_results() -> None:
    live = ["door", "yard"]
    pm = PipelineMetrics(camera_ids=lambda: live)
    reg = Registry()
    reg.register_collector(pm)
    now = 1000.0
    pm.observe_results([result("door", now - 0.12, 0.03, 0.06), result("yard", now - 3.0, 0.02, 0.06),
                        result("door", now - 0.2, 0.04, 0.06)], now_mono=now)
    pm.observe_results([], now_mono=now)   # an empty batch is not a batch
    fams = parse(reg.render())
    assert series(fams, "streamd_batch_size_count") == {(): 1}
    assert series(fams, "streamd_batch_size_sum") == {(): 3}
    assert series(fams, "streamd_batch_size_bucket")[(("le", "2"),)] == 0
    assert series(fams, "streamd_batch_size_bucket")[(("le", "4"),)] == 1
    assert series(fams, "streamd_inference_seconds_count") == {(): 1}
    assert series(fams, "streamd_queue_seconds_count") == {(): 3}
    assert series(fams, "streamd_queue_seconds_bucket")[(("le", "0.025"),)] == 1
    c2p = series(fams, "streamd_capture_to_publish_seconds_count")
    assert c2p == {(("camera", "door"),): 2, (("camera", "yard"),): 1}
    assert series(fams, "streamd_capture_to_publish_seconds_sum")[(("camera", "door"),)] == pytest.approx(0.32)
    assert series(fams, "streamd_capture_to_publish_seconds_bucket")[(("camera", "yard"), ("le", "2.5"))] == 0
    assert series(fams, "streamd_capture_to_publish_seconds_bucket")[(("camera", "yard"), ("le", "5"))] == 1

    live.remove("yard")            # camera removed: its latency series goes with it
    fams = parse(reg.render())
    assert series(fams, "streamd_capture_to_publish_seconds_count") == {(("camera", "door"),): 2}
    pm.forget_camera("door")
    assert series(parse(reg.render()), "streamd_capture_to_publish_seconds_count") == {}


# ---- process and GPU -----------------------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")
def test_process_metrics_are_plausible() -> None:
    reg = Registry()
    reg.register_collector(ProcessCollector())
    burn_until = time.process_time() + 0.05
    while time.process_time() < burn_until:   # make sure some CPU time was spent
        pass
    fams = parse(reg.render())
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
    fams = gpu()
    if gpu.available:   # a machine with a working NVIDIA driver: the families must be sane
        text = "".join(f.render() for f in fams)
        parsed = parse(text)
        assert set(parsed) == {"streamd_gpu_utilization_ratio", "streamd_gpu_memory_used_bytes",
                               "streamd_gpu_memory_total_bytes"}
        for v in series(parsed, "streamd_gpu_utilization_ratio").values():
            assert 0 <= v <= 1
    else:               # pynvml missing, or present with no driver (nvmlInit fails)
        assert fams == []
        assert gpu() == []
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
        "assert g() == [] and not g.available\n"
        "text = build_registry(lambda: {}, None).render()\n"
        "assert 'streamd_gpu' not in text and 'process_resident_memory_bytes' in text, text\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert proc.stderr == ""


# ---- HTTP ---------------------------------------------------------------------------------------------------
def http_get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


@pytest.fixture
def server_parts() -> Iterator[tuple[MetricsServer, dict[str, Any]]]:
    knobs: dict[str, Any] = {"unhealthy": None, "explode": False}
    stats = daemon_stats({"door": camera_stats()})

    def flaky() -> list[MetricFamily]:
        if knobs["explode"]:
            raise RuntimeError("stats went away")
        return [MetricFamily("t_flaky", "Sometimes fails.", "gauge").add(1)]

    pm = PipelineMetrics()
    reg = build_registry(lambda: stats, pm)
    reg.register_collector(flaky)
    server = MetricsServer(reg, "127.0.0.1", 0, health=lambda: knobs["unhealthy"])
    server.start()
    try:
        yield server, knobs
    finally:
        server.stop()


def test_http_scrape_health_and_errors(server_parts: tuple[MetricsServer, dict[str, Any]]) -> None:
    server, knobs = server_parts
    assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
    assert any(t.name == "metrics-http" and t.daemon for t in threading.enumerate())

    code, ctype, body = http_get(server.url + "/metrics")
    assert (code, ctype) == (200, CONTENT_TYPE)
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
    assert code == 200 and "t_flaky 1" in body


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
    with pytest.raises(StreamdError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
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


# ---- streamd status ---------------------------------------------------------------------------------------------
def stats_body(seq: int = 1, version: int = protocol.PROTOCOL_VERSION) -> dict[str, Any]:
    body = daemon_stats({"door": camera_stats(), "yard": {**camera_stats("reconnecting", 6), "width": 0,
                                                          "height": 0, "reconnects": 12}})
    return {"v": version, "type": protocol.TYPE_STATS, "seq": seq, "pub": "3f9c2a71b0de",
            "publish_ts": time.time(), **body}


def test_format_status_table() -> None:
    text = format_status(stats_body(seq=42))
    lines = text.splitlines()
    assert lines[0].startswith("streamd 3f9c2a71b0de") and "(seq 42)" in lines[0]
    header, door, yard = lines[1], lines[2], lines[3]
    assert header.split()[:6] == ["CAMERA", "STATE", "DECODED", "SKIPPED", "INFERRED", "PUBLISHED"]
    assert door.split() == ["door", "streaming", "100", "200", "95", "94", "3/2/40", "1", "2", "1920x1080"]
    assert yard.split() == ["yard", "reconnecting", "6", "12", "1", "0", "3/2/40", "12", "2", "-"]
    # Fixed width: every column starts at the same offset on every row.
    col = header.index("DECODED")
    end = col + len("DECODED")
    assert door[end - 3:end] == "100" and yard[end - 1] == "6"    # numbers right-aligned under their header
    assert door.index("1920x1080") == yard.index("-", header.index("RESOLUTION")) == header.index("RESOLUTION")
    footer, pool = lines[-2], lines[-1]
    assert pool.split() == ["workers", "2", "x", "1", "thread(s)", "batches", "per", "worker", "21/19",
                            "age", "bound", "1000", "ms"]
    assert "uptime 1h 02m 03s" in footer and "batches 40" in footer and "mean batch 2.95" in footer
    assert "inference 38.2 ms/batch" in footer and "publisher sent 130 dropped 1" in footer


def test_format_status_tolerates_sparse_bodies() -> None:
    text = format_status({"cameras": {"x": {"state": "starting"}}, "scheduler": {"batches": 0, "frames": 0,
                                                                                 "infer_ms_mean": None}})
    assert "(no cameras)" not in text
    assert text.splitlines()[1].split() == ["x", "starting", "-", "-", "-", "-", "-/-/-", "-", "-", "-"]
    assert "mean batch -" in text and "inference -/batch" in text and "uptime -" in text
    assert "(no cameras)" in format_status({})
    assert [format_uptime(s) for s in (5, 65, 3600, 90061, None)] == ["5s", "1m 05s", "1h 00m 00s",
                                                                       "1d 01h 01m", "-"]


class StatsPublisher:
    """A real PUB socket sending protocol-format messages until stopped (PUB/SUB has no
    handshake: a subscriber that connects late only sees what comes after, so keep sending)."""

    def __init__(self, make_parts: Callable[[int], list[bytes]]) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        port = self._sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._make = make_parts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-stats-pub", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seq = 0
        while not self._stop.is_set():
            seq += 1
            self._sock.send_multipart(self._make(seq))
            self._stop.wait(0.02)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close(0)
        self._ctx.term()


def stats_parts(seq: int) -> list[bytes]:
    return [protocol.TOPIC_STATS, json.dumps(stats_body(seq)).encode()]


def test_run_status_prints_the_table_from_a_real_publisher() -> None:
    # Heartbeats on the same socket must be ignored (the SUB filters on sys/stats).
    pub = StatsPublisher(lambda seq: stats_parts(seq) if seq % 2 else
                         [protocol.TOPIC_HEARTBEAT, json.dumps({"v": 1, "type": "heartbeat", "seq": seq}).encode()])
    out, err = io.StringIO(), io.StringIO()
    try:
        assert run_status(pub.endpoint, timeout_s=20, out=out, err=err) == 0
    finally:
        pub.close()
    assert err.getvalue() == ""
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("streamd 3f9c2a71b0de")
    assert lines[2].split()[:2] == ["door", "streaming"] and lines[3].split()[:2] == ["yard", "reconnecting"]


def test_run_status_times_out_with_a_clear_message() -> None:
    # A live publisher that only sends heartbeats: connected, but no stats within the wait.
    pub = StatsPublisher(lambda seq: [protocol.TOPIC_HEARTBEAT,
                                      json.dumps({"v": 1, "type": "heartbeat", "seq": seq}).encode()])
    out, err = io.StringIO(), io.StringIO()
    t0 = time.monotonic()
    try:
        assert run_status(pub.endpoint, timeout_s=0.5, out=out, err=err) == 1
    finally:
        pub.close()
    assert 0.45 <= time.monotonic() - t0 < 10
    assert out.getvalue() == ""
    assert err.getvalue() == (f"no stats message from {pub.endpoint} within 0.5 s: is streamd running, "
                              f"and is publisher.stats_interval_s shorter than that?\n")


def test_run_status_says_when_stats_were_unreadable() -> None:
    pub = StatsPublisher(lambda seq: [protocol.TOPIC_STATS, json.dumps(stats_body(seq, version=2)).encode()])
    err = io.StringIO()
    try:
        # Long enough for several messages to arrive even on a busy machine, yet bounded.
        assert run_status(pub.endpoint, timeout_s=2, out=io.StringIO(), err=err) == 1
    finally:
        pub.close()
    line = err.getvalue()
    assert line.count("\n") == 1 and "unreadable stats message(s): protocol version 2" in line


def test_run_status_with_nothing_listening_and_a_bad_endpoint() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = io.StringIO()
    assert run_status(f"tcp://127.0.0.1:{port}", timeout_s=0.3, out=io.StringIO(), err=err) == 1
    assert err.getvalue().startswith(f"no stats message from tcp://127.0.0.1:{port} within 0.3 s")
    err = io.StringIO()
    assert run_status("nonsense://x", timeout_s=0.3, out=io.StringIO(), err=err) == 1
    assert err.getvalue().startswith("cannot connect to nonsense://x:")
