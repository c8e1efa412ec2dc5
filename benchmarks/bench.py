#!/usr/bin/env python3
"""Throughput and freshness, side by side: raw ONNX Runtime, streamd, Ultralytics.

    make bench                                        # sizes 320 640, 4 and 8 cameras
    .venv/bin/python benchmarks/bench.py --sizes 320 --cameras 4 --seconds 15 --warmup 5
    .venv/bin/python benchmarks/bench.py --record     # also append the table to RESULTS.md
    .venv/bin/python benchmarks/bench.py --soak 600 --sizes 320 --cameras 4

For every image size, on the same box and in one run:

1. raw ONNX Runtime on random input at imgsz x imgsz, same model, no spinning threads (as
   streamd's backend runs it): one session on all cores at batch 1 and 4, and N sessions of
   T threads (N x T = cores) at batch 1, one Python thread driving each. The fastest is
   what the box can do with this model, with nothing else to do.
and for every camera count, the cameras being live RTSP cameras (640x480, H.264, paced at
``--fps``) served on loopback by ``tools/rtsp_test_server.py``:
2. streamd as a real ``streamd run`` process whose config names only the model, the
   cameras, a publisher endpoint and a free metrics port, so every scheduler setting is
   its default; once with a square fixed-size export (when ``streamd-export`` has
   ``--fixed-size``) and once with the default export. A SUB socket reads everything it
   publishes: frames/s published, latency (receive time - capture time) p50/p99, the largest
   publish - capture age, and the mean batch inference time from the stats messages.
3. Ultralytics' own multi-stream loop (``predict(source=X.streams, stream=True)``) on
   Ultralytics' own dynamic ONNX export of the same weights and the same cameras, in a
   process of its own with a hard deadline; "n/a" where ultralytics is not installed.

``--backends`` instead compares ONNX Runtime and OpenVINO on the same model and cameras,
each alone and under the daemon (``bench_backends.py``).

``--soak SECONDS`` instead runs streamd (default export, first size and camera count) that
long and reports whether latency or memory grow.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streamd import protocol  # noqa: E402
from streamd.client.subscriber import subscribe  # noqa: E402
from streamd.config import SchedulerConfig  # noqa: E402
from streamd.manifest import sha256_file  # noqa: E402

ENGINES = REPO / "engines"
CACHE = REPO / ".cache"
DEFAULT_PT = CACHE / "models" / "fall-yolov8s.pt"
EXPORT_TOOL_DIR = REPO / "tools" / "export"
ULTRALYTICS_CHILD = Path(__file__).resolve().parent / "ultralytics_streams.py"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
# The RTSP server imports GStreamer through gi, which only the distribution's Python has.
GST_PYTHON = os.environ.get("STREAMD_TEST_GST_PYTHON", "/usr/bin/python3")

BATCH_RANGE = "1-8"
MAX_AGE_MS = SchedulerConfig().max_frame_age_ms
# Model load, RTSP opens and the first batch; generous because the box may be busy.
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
SETTLE_S = 2.0  # between runs, so one run's teardown does not eat into the next one's cores


# ---- helpers shared with bench_requests.py ------------------------------------------------------

def load_tool(name: str) -> ModuleType:
    """``tools/NAME.py`` as a module (``tools/`` is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load tools/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    # Registered before running it: dataclasses look their module up in sys.modules.
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_model(imgsz: int) -> Path:
    """The sample model as ``streamd-export --batch 1-8`` makes it by default."""
    return streamd_model(sample_weights(), imgsz, square=False)


# ---- child processes ---------------------------------------------------------------------------

_children: list[subprocess.Popen[Any]] = []


def spawn(cmd: list[str], log: Path, **kwargs: Any) -> subprocess.Popen[Any]:
    """Start a child in its own session (so a Ctrl-C in the terminal reaches only this
    process, which then stops the children in order) and remember it for stop_all."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=kwargs.pop("stdout", out), stderr=out,
                                start_new_session=True, cwd=REPO, **kwargs)
    _children.append(proc)
    return proc


def stop(proc: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT_S) -> int | None:
    """SIGTERM, then SIGKILL of its process group after ``timeout``; returns the exit status."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)   # its group: pgid == pid (own session)
            except ProcessLookupError:
                pass
            proc.wait(5)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None and not pipe.closed:
            pipe.close()
    if proc in _children:
        _children.remove(proc)
    return proc.returncode


def stop_all() -> None:
    # A second Ctrl-C must not cut the clean-up short and leave a camera server running.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for proc in reversed(list(_children)):
            stop(proc)
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# ---- models ------------------------------------------------------------------------------------

def sample_weights() -> Path:
    return load_tool("fetch_sample_model").fetch(DEFAULT_PT)


def _export_cmd() -> list[str]:
    # Through this interpreter rather than a script on PATH, so it is this checkout's tool.
    return [sys.executable, "-c", "import sys; from streamd_export.cli import main; sys.exit(main())"]


_fixed_size_flag: bool | None = None


def export_has_fixed_size() -> bool:
    """Whether ``streamd-export`` can make a square fixed-size model (``--fixed-size``)."""
    global _fixed_size_flag
    if _fixed_size_flag is None:
        out = subprocess.run(_export_cmd() + ["--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
        _fixed_size_flag = "--fixed-size" in out.stdout
    return _fixed_size_flag


def _export_is_current(onnx: Path, pt_sha: str) -> bool:
    """A cached export is reused only when made from the same weights by the export tool
    as it is now (the tool changes: what its default makes may have changed with it)."""
    manifest = onnx.with_name(onnx.name + ".json")
    if not (onnx.is_file() and manifest.is_file()):
        return False
    try:
        source = json.loads(manifest.read_text()).get("source", {})
    except (OSError, ValueError):
        return False
    newest_tool = max((p.stat().st_mtime for p in EXPORT_TOOL_DIR.glob("*.py")), default=0.0)
    return source.get("sha256") == pt_sha and onnx.stat().st_mtime >= newest_tool


def streamd_model(pt: Path, imgsz: int, square: bool) -> Path:
    """``engines/STEM-SIZE-b8[-square].onnx`` made by streamd-export (reused when current)."""
    name = f"{pt.stem}-{imgsz}-b8" + ("-square" if square else "")
    onnx = ENGINES / f"{name}.onnx"
    if _export_is_current(onnx, sha256_file(pt)):
        return onnx
    cmd = _export_cmd() + [str(pt), "--imgsz", str(imgsz), "--batch", BATCH_RANGE,
                           "--out-dir", str(ENGINES), "--name", name]
    if square:
        cmd.append("--fixed-size")
    print(f"exporting {onnx.relative_to(REPO)} ...", flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"streamd-export failed ({out.returncode}): {(out.stderr or out.stdout).strip()[-1500:]}")
    return onnx


def ultralytics_model(pt: Path, imgsz: int, log: Path) -> Path:
    """Ultralytics' own dynamic export of ``pt``, cached under .cache/bench/ultralytics."""
    onnx = CACHE / "bench" / "ultralytics" / f"{pt.stem}-{imgsz}-dynamic.onnx"
    try:
        made = json.loads(onnx.with_name(onnx.name + ".json").read_text())
        if onnx.is_file() and made.get("weights_sha256") == sha256_file(pt) and made.get("imgsz") == imgsz:
            return onnx
    except (OSError, ValueError):
        pass
    print(f"exporting {onnx.relative_to(REPO)} with Ultralytics ...", flush=True)
    proc = spawn([sys.executable, str(ULTRALYTICS_CHILD), "export", "--pt", str(pt), "--imgsz", str(imgsz),
                  "--out", str(onnx)], log, env=_ultralytics_env())
    try:
        rc = proc.wait(900)
    finally:
        stop(proc)
    if rc != 0:
        raise RuntimeError(f"Ultralytics export failed ({rc}): {tail(log, 1500)}")
    return onnx


def input_shape(onnx: Path) -> list[int | str]:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx), sess_options=opts, providers=["CPUExecutionProvider"])
    return [d if isinstance(d, int) else "?" for d in sess.get_inputs()[0].shape]


def describe_input(shape: list[int | str]) -> str:
    h, w = shape[2], shape[3]
    return f"{h}x{w} fixed" if isinstance(h, int) and isinstance(w, int) else "any HxW"


# ---- 1. raw ONNX Runtime ------------------------------------------------------------------------

def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _session(model: Path, threads: int) -> Any:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    # As streamd's backend: workers sleep instead of spinning between ops, so the
    # comparison is with the same session settings the daemon uses.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])


def raw_one_session(model: Path, imgsz: int, batch: int, threads: int, seconds: float) -> float:
    sess = _session(model, threads)
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).random((batch, 3, imgsz, imgsz), dtype=np.float32)
    sess.run(None, {name: x})  # first run allocates and tunes; not counted
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sess.run(None, {name: x})
        n += batch
    rate = n / (time.perf_counter() - t0)
    del sess
    return rate


def raw_sessions(model: Path, imgsz: int, sessions: int, threads: int, seconds: float) -> float:
    """``sessions`` sessions of ``threads`` threads at batch 1, each driven by its own thread."""
    made = [_session(model, threads) for _ in range(sessions)]
    name = made[0].get_inputs()[0].name
    counts = [0] * sessions
    ends = [0.0] * sessions
    start = threading.Barrier(sessions + 1)
    stop_at = [0.0]
    errors: list[BaseException] = []

    def drive(i: int) -> None:
        try:
            x = np.random.default_rng(i).random((1, 3, imgsz, imgsz), dtype=np.float32)
            made[i].run(None, {name: x})
            start.wait()
            while time.perf_counter() < stop_at[0]:
                made[i].run(None, {name: x})
                counts[i] += 1
            ends[i] = time.perf_counter()
        except BaseException as exc:  # reported by the caller; a thread cannot raise there
            errors.append(exc)
            start.abort()

    workers = [threading.Thread(target=drive, args=(i,), daemon=True) for i in range(sessions)]
    for w in workers:
        w.start()
    # Set before the barrier releases the drivers, so none of them can see it unset.
    stop_at[0] = time.perf_counter() + seconds
    try:
        start.wait()
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    del made
    return sum(counts) / (max(ends) - t0)


@dataclass
class RawResult:
    model: str
    one_b1: float
    one_b4: float
    multi: dict[str, float]  # "2x1" -> img/s

    @property
    def fastest(self) -> float:
        return max([self.one_b1, self.one_b4, *self.multi.values()])


def multi_layouts(n_cores: int) -> list[tuple[int, int]]:
    """(sessions, threads each) with sessions x threads = cores: one thread each, and two
    sessions sharing the cores (the same on 2 cores)."""
    layouts = {(n_cores, 1)}
    if n_cores % 2 == 0 and n_cores > 2:
        layouts.add((2, n_cores // 2))
    return sorted(layouts) if n_cores > 1 else []


def bench_raw(model: Path, imgsz: int, seconds: float) -> RawResult:
    n = cores()
    print(f"raw ONNX Runtime {model.name} at {imgsz}x{imgsz}, {seconds:g} s per layout", flush=True)
    b1 = raw_one_session(model, imgsz, 1, n, seconds)
    print(f"  1 session x {n} threads, batch 1: {b1:.2f} img/s", flush=True)
    b4 = raw_one_session(model, imgsz, 4, n, seconds)
    print(f"  1 session x {n} threads, batch 4: {b4:.2f} img/s", flush=True)
    multi = {}
    for s, t in multi_layouts(n):
        multi[f"{s}x{t}"] = raw_sessions(model, imgsz, s, t, seconds)
        print(f"  {s} sessions x {t} threads, batch 1: {multi[f'{s}x{t}']:.2f} img/s", flush=True)
    gc.collect()
    return RawResult(model.name, b1, b4, multi)


# ---- cameras -----------------------------------------------------------------------------------

class Cameras:
    """One RTSP test server with ``count`` paced cameras, /cam0 .. /camN-1."""

    def __init__(self, count: int, fps: float, workdir: Path) -> None:
        media = load_tool("make_test_media").make_media(CACHE / "test-media", h264=True)
        # Paced H.264 loops rather than live-encoded stills: the same moving pictures of
        # people at exactly ``fps``, but the server costs almost no CPU, so the box's cores
        # go to decoding and inference as they would with cameras on the network.
        clips = [media["bus"].h264, media["zidane"].h264]
        self.mounts = {f"/cam{i}": f"h264:{clips[i % 2]}@{fps:g}" for i in range(count)}
        self.log = workdir / "rtsp-server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = ""

    def start(self) -> Cameras:
        cmd = [GST_PYTHON, str(REPO / "tools" / "rtsp_test_server.py"), "--port", "0", "--exit-on-stdin-eof"]
        for path, spec in self.mounts.items():
            cmd += ["--mount", f"{path}={spec}"]
        # stdin is a pipe this process never writes: if it dies, the server sees EOF and stops.
        self.proc = spawn(cmd, self.log, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = b""
        deadline = time.monotonic() + 30
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in line:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"RTSP test server did not start: {tail(self.log)}")
                if sel.select(0.5):
                    chunk = os.read(self.proc.stdout.fileno(), 4096)
                    if not chunk:
                        raise RuntimeError(f"RTSP test server exited: {tail(self.log)}")
                    line += chunk
        first = line.split(b"\n", 1)[0].decode().strip()
        if not first.startswith("READY "):
            raise RuntimeError(f"unexpected line from the RTSP test server: {first!r}")
        self.base = first.split(" ", 1)[1]
        return self

    def urls(self, count: int) -> list[str]:
        return [f"{self.base}/cam{i}" for i in range(count)]

    def close(self) -> None:
        if self.proc is not None:
            stop(self.proc)


# ---- 2. streamd ---------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def rss_kb(pid: int, field_name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class DaemonResult:
    fps: float
    p50_ms: float
    p99_ms: float
    max_age_ms: float
    infer_ms: float | None
    infer_note: str
    mean_batch: float | None
    decoded_fps: float | None
    dropped: int | None
    startup_s: float
    # Soak only: latency by thirds of the run, and memory.
    p99_first_ms: float = 0.0
    p99_last_ms: float = 0.0
    rss_mb: list[tuple[float, float]] = field(default_factory=list)
    peak_rss_mb: float = 0.0


def _window_stats(stats: list[tuple[float, dict[str, Any]]], t_begin: float,
                  t_end: float) -> tuple[float | None, str, float | None, float | None, int | None]:
    """Mean batch inference ms, how it was taken, mean batch size, decoded frames/s and
    frames dropped, between the first and the last stats message of the window."""
    inside = [b for t, b in stats if t_begin <= t <= t_end]
    if not inside:
        if not stats:
            return None, "no stats message", None, None, None
        last = stats[-1][1].get("scheduler", {})
        return last.get("infer_ms_mean"), "since start", None, None, None
    first, last = inside[0], inside[-1]
    s0, s1 = first.get("scheduler", {}), last.get("scheduler", {})
    if len(inside) < 2 or s1.get("batches", 0) <= s0.get("batches", 0):
        return s1.get("infer_ms_mean"), "since start", None, None, None
    batches = s1["batches"] - s0["batches"]
    # infer_ms_mean is the mean since start; mean x count gives the totals to subtract.
    infer = (s1["infer_ms_mean"] * s1["batches"] - s0["infer_ms_mean"] * s0["batches"]) / batches
    mean_batch = (s1["frames"] - s0["frames"]) / batches
    span = last["uptime_s"] - first["uptime_s"]

    def total(body: dict[str, Any], key: str) -> int:
        cams = body.get("cameras", {}).values()
        if key == "dropped":
            return sum(sum(c.get("dropped", {}).values()) for c in cams)
        return sum(c.get(key, 0) for c in cams)

    # Frames the decoders delivered: converted and queued, or skipped by pacing (decoded
    # but not converted because a newer one would be taken first).
    delivered = total(last, "decoded") + total(last, "skipped") - total(first, "decoded") - total(first, "skipped")
    decoded = delivered / span if span > 0 else None
    dropped = total(last, "dropped") - total(first, "dropped")
    return infer, f"over {span:.0f} s", mean_batch, decoded, dropped


def bench_streamd(model: Path, urls: list[str], warmup: float, seconds: float, workdir: Path,
                  tag: str, model_options: dict[str, Any] | None = None) -> DaemonResult:
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    cfg = workdir / f"streamd-{tag}.yaml"
    # Only what a user must name: every scheduler, source and publisher setting is a default.
    cfg.write_text(yaml.safe_dump({
        "model": {"path": str(model), **(model_options or {})},
        "publisher": {"endpoint": endpoint},
        "metrics": {"port": 0},
        "cameras": [{"id": f"cam{i}", "url": url} for i, url in enumerate(urls)],
    }, sort_keys=False))
    log = workdir / f"streamd-{tag}.log"
    t_launch = time.monotonic()
    proc = spawn([sys.executable, "-m", "streamd.cli", "run", "-c", str(cfg)], log)
    try:
        # Wait for the first detections, in short subscriptions so a daemon that exits
        # before publishing anything is noticed at once.
        started: float | None = None
        while started is None:
            if proc.poll() is not None:
                raise RuntimeError(f"streamd exited with status {proc.returncode}: {tail(log)}")
            if time.monotonic() - t_launch > START_TIMEOUT_S:
                raise RuntimeError(f"no detections within {START_TIMEOUT_S:.0f} s: {tail(log)}")
            for _, body in subscribe(endpoint, until=time.monotonic() + 1.0):
                if body.get("type") == protocol.TYPE_DETECTIONS:
                    started = time.monotonic()
                    break
        startup_s = started - t_launch
        wall0 = time.time() + (started - time.monotonic())
        t_begin, t_end = wall0 + warmup, wall0 + warmup + seconds
        lat: list[tuple[float, float]] = []   # (receive time, receive - capture)
        max_age = 0.0
        stats: list[tuple[float, dict[str, Any]]] = []
        rss: list[tuple[float, float]] = []
        next_rss = 0.0
        # Heartbeats come every second: a gap of 10 s means the daemon is gone or hung.
        for _, body in subscribe(endpoint, timeout_s=10.0, until=started + warmup + seconds):
            now = time.time()
            if now >= next_rss:
                rss.append((now, rss_kb(proc.pid, "VmRSS") / 1024))
                next_rss = now + 1.0
            kind = body.get("type")
            if kind == protocol.TYPE_STATS:
                stats.append((now, body))
            elif kind == protocol.TYPE_DETECTIONS and now >= t_begin:
                lat.append((now, now - body["capture_ts"]))
                max_age = max(max_age, body["publish_ts"] - body["capture_ts"])
        if proc.poll() is not None:
            raise RuntimeError(f"streamd exited with status {proc.returncode} during the run: {tail(log)}")
        if time.monotonic() < started + warmup + seconds - 1.0:
            raise RuntimeError(f"streamd went silent for 10 s during the run: {tail(log)}")
        if not lat:
            raise RuntimeError(f"no detections after the warm-up: {tail(log)}")
        peak = rss_kb(proc.pid, "VmHWM") / 1024
    finally:
        stop(proc)
    values = [v for _, v in lat]
    third = max(1, len(lat) // 3)
    infer, note, mean_batch, decoded, dropped = _window_stats(stats, t_begin, t_end)
    return DaemonResult(
        fps=len(lat) / seconds, p50_ms=1000 * percentile(values, 50), p99_ms=1000 * percentile(values, 99),
        max_age_ms=1000 * max_age, infer_ms=infer, infer_note=note, mean_batch=mean_batch,
        decoded_fps=decoded, dropped=dropped, startup_s=startup_s,
        p99_first_ms=1000 * percentile(values[:third], 99), p99_last_ms=1000 * percentile(values[-third:], 99),
        rss_mb=[(t, m) for t, m in rss if t >= t_begin], peak_rss_mb=peak)


# ---- 3. Ultralytics -----------------------------------------------------------------------------

def ultralytics_available() -> bool:
    return importlib.util.find_spec("ultralytics") is not None


def _ultralytics_env() -> dict[str, str]:
    env = dict(os.environ)
    env["YOLO_OFFLINE"] = "1"      # no update or asset checks against a network that isn't there
    # RTSP over TCP, as streamd reads its cameras (its default transport): like for like.
    env["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = "rtsp_transport;tcp"
    return env


@dataclass
class UltralyticsResult:
    fps: float
    input_hw: tuple[int, int] | None
    infer_ms: float | None  # mean inference time of one step (all cameras)
    startup_s: float


def bench_ultralytics(model: Path, imgsz: int, urls: list[str], warmup: float, seconds: float,
                      workdir: Path, tag: str) -> UltralyticsResult:
    streams = workdir / f"ultralytics-{tag}.streams"
    streams.write_text("\n".join(urls) + "\n")
    steps = workdir / f"ultralytics-{tag}.jsonl"
    log = workdir / f"ultralytics-{tag}.log"
    deadline = START_TIMEOUT_S + warmup + seconds + 30
    t_launch = time.monotonic()
    proc = spawn([sys.executable, str(ULTRALYTICS_CHILD), "predict", "--model", str(model),
                  "--streams", str(streams), "--imgsz", str(imgsz), "--warmup", str(warmup),
                  "--seconds", str(seconds), "--deadline", str(deadline), "--out", str(steps)],
                 log, stdin=subprocess.PIPE, env=_ultralytics_env())
    try:
        try:
            proc.wait(deadline + 10)   # it stops itself at its deadline; this is the backstop
        except subprocess.TimeoutExpired:
            pass
    finally:
        rc = stop(proc)
    records: list[dict[str, Any]] = []
    for line in (steps.read_text().splitlines() if steps.exists() else []):
        try:
            records.append(json.loads(line))
        except ValueError:
            pass  # the last line of a process killed while writing it
    events = {r["event"]: r for r in records if "event" in r}
    timed = [r for r in records if "t" in r]
    if not timed:
        raise RuntimeError(f"Ultralytics produced no results (exit {rc}): {tail(log)}")
    t0 = timed[0]["t"]
    window = [r for r in timed if t0 + warmup <= r["t"] < t0 + warmup + seconds]
    if "done" not in events:
        raise RuntimeError(f"Ultralytics stopped early (exit {rc}, {len(timed)} steps): {tail(log)}")
    # One step infers one frame of every camera; Ultralytics reports the step's time split
    # evenly over its images.
    per_image = [r["img_ms"] for r in window if "img_ms" in r]
    hw = events.get("input", {}).get("hw")
    startup = events.get("input", {}).get("startup_s", time.monotonic() - t_launch)
    return UltralyticsResult(fps=sum(r["n"] for r in window) / seconds,
                             input_hw=tuple(hw) if hw else None,
                             infer_ms=len(urls) * sum(per_image) / len(per_image) if per_image else None,
                             startup_s=startup)


# ---- the table ----------------------------------------------------------------------------------

@dataclass
class Row:
    imgsz: int
    cameras: int
    raw: RawResult
    square: DaemonResult | str       # a result, or why there is none
    default: DaemonResult | str
    ultra: UltralyticsResult | str


def _f(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _pair(row: Row, cell: Callable[[DaemonResult], str]) -> str:
    """``square / default`` of one quantity; "–" where a run is missing."""
    parts = [cell(r) if isinstance(r, DaemonResult) else "–" for r in (row.square, row.default)]
    return " / ".join(parts)


def table(rows: list[Row]) -> str:
    multi_names = sorted({k for r in rows for k in r.raw.multi})
    multi_head = " / ".join(f"raw {k}" for k in multi_names) or "raw N x T"
    lines = [
        f"| imgsz | cameras | raw 1 sess b1 / b4 | {multi_head} | streamd square | streamd default | Ultralytics "
        "| streamd/raw | streamd/Ultralytics | p50, p99 ms | p50/infer, p99/infer | max age ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        def daemon_cell(d: DaemonResult | str) -> str:
            return f"{d.fps:.1f}" if isinstance(d, DaemonResult) else d

        if isinstance(r.ultra, UltralyticsResult):
            hw = f" ({r.ultra.input_hw[1]}x{r.ultra.input_hw[0]})" if r.ultra.input_hw else ""
            ultra = f"{r.ultra.fps:.1f}{hw}"
        else:
            ultra = r.ultra
        u_fps = r.ultra.fps if isinstance(r.ultra, UltralyticsResult) and r.ultra.fps > 0 else None
        lines.append(" | ".join([
            f"| {r.imgsz}", str(r.cameras),
            f"{r.raw.one_b1:.1f} / {r.raw.one_b4:.1f}",
            " / ".join(f"{r.raw.multi[k]:.1f}" if k in r.raw.multi else "–" for k in multi_names) or "–",
            daemon_cell(r.square), daemon_cell(r.default), ultra,
            _pair(r, lambda d: f"{d.fps / r.raw.fastest:.2f}"),
            _pair(r, lambda d: f"{d.fps / u_fps:.2f}" if u_fps else "–"),
            _pair(r, lambda d: f"{d.p50_ms:.0f}, {d.p99_ms:.0f}"),
            _pair(r, lambda d: f"{d.p50_ms / d.infer_ms:.1f}, {d.p99_ms / d.infer_ms:.1f}" if d.infer_ms else "–"),
            _pair(r, lambda d: f"{d.max_age_ms:.0f}" + ("" if d.max_age_ms < MAX_AGE_MS else f" (> {MAX_AGE_MS:.0f})")),
        ]) + " |")
    return "\n".join(lines)


def legend(fps: float, models: dict[str, str]) -> str:
    shapes = "; ".join(f"{k}: {v}" for k, v in models.items())
    return (
        f"Cameras: live RTSP on loopback, 640x480 H.264 at {fps:g} frames/s each. Raw: ONNX Runtime "
        "img/s on random input at imgsz x imgsz, no spinning, alone on the box (`raw SxT` = S sessions "
        "of T threads at batch 1, one driver thread each). streamd: frames/s published by a "
        "`streamd run` whose config names only the model, cameras and endpoints (scheduler at its "
        "defaults). Ultralytics: results/s of its own `predict(source=*.streams, stream=True)` loop on "
        "its own dynamic ONNX export, with the input size it chose. Cells with `a / b` are streamd "
        "square / streamd default. streamd/raw divides by the fastest raw layout. Latency = subscriber "
        "receive time - capture time; infer = the daemon's mean batch inference time over the run; "
        f"max age = largest publish - capture (frames older than {MAX_AGE_MS:.0f} ms are dropped). "
        f"Models: {shapes}."
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def record(text: str) -> None:
    with open(RESULTS, "a") as f:
        f.write(text)
    print(f"recorded in {RESULTS.relative_to(REPO)}")


# ---- main ---------------------------------------------------------------------------------------

def _detail(what: str, d: DaemonResult, offered: float) -> str:
    extra = []
    if d.decoded_fps is not None:
        extra.append(f"decoded {d.decoded_fps:.1f} of {offered:g} offered")
    if d.mean_batch is not None:
        extra.append(f"mean batch {d.mean_batch:.2f}")
    if d.dropped is not None:
        extra.append(f"{d.dropped} dropped")
    infer = f"infer {_f(d.infer_ms, 0)} ms ({d.infer_note})"
    return (f"  {what}: {d.fps:.2f} fps published, p50 {d.p50_ms:.0f} ms, p99 {d.p99_ms:.0f} ms, "
            f"max age {d.max_age_ms:.0f} ms, {infer}; {', '.join(extra) or '-'}; first result after "
            f"{d.startup_s:.1f} s")


def estimate_s(args: argparse.Namespace, square: bool, ultra: bool) -> float:
    raw = len(args.sizes) * (2 + len(multi_layouts(cores()))) * (args.raw_seconds + 3)
    per_run = 15 + args.warmup + args.seconds + SETTLE_S
    runs = (1 + square + ultra) * len(args.sizes) * len(args.cameras)
    return raw + runs * per_run


def run(args: argparse.Namespace, workdir: Path) -> int:
    pt = args.model_pt.resolve() if args.model_pt else sample_weights()
    square_ok = export_has_fixed_size()
    ultra_ok = ultralytics_available() and not args.soak
    n_cores = cores()
    print(f"{n_cores} x {cpu_model()}; weights {pt.name}; sizes {args.sizes}; cameras {args.cameras} x "
          f"{args.fps:g} fps; {args.seconds:g} s per run after {args.warmup:g} s warm-up", flush=True)
    if not square_ok:
        print("streamd-export has no --fixed-size here: the 'streamd square' column is skipped", flush=True)
    if not ultralytics_available():
        print("ultralytics is not importable: the Ultralytics column says n/a", flush=True)
    if not args.soak:
        print(f"this takes about {estimate_s(args, square_ok, ultra_ok) / 60:.0f} min", flush=True)

    rows: list[Row] = []
    shapes: dict[str, str] = {}
    cams = Cameras(max(args.cameras), args.fps, workdir).start()
    try:
        for size in args.sizes:
            default_onnx = streamd_model(pt, size, square=False)
            square_onnx = streamd_model(pt, size, square=True) if square_ok else None
            for m in filter(None, (square_onnx, default_onnx)):
                shapes[m.name] = describe_input(input_shape(m))
            ultra_onnx: Path | None = None
            ultra_why = "n/a"
            if ultra_ok:
                try:
                    ultra_onnx = ultralytics_model(pt, size, workdir / f"ultralytics-export-{size}.log")
                except RuntimeError as exc:
                    ultra_why = "failed"
                    print(f"  Ultralytics export at {size}: {exc}", flush=True)
            # The fixed square model is what a raw session runs best; it is the same network.
            raw = bench_raw(square_onnx or default_onnx, size, args.raw_seconds)
            for n in args.cameras:
                urls = cams.urls(n)
                tag = f"{size}-{n}"
                if args.soak:
                    d = bench_streamd(default_onnx, urls, args.warmup, args.soak, workdir, f"soak-{tag}")
                    report_soak(args, raw, default_onnx, n, d)
                    return 0
                results: dict[str, DaemonResult | str] = {}
                for label, model in (("square", square_onnx), ("default", default_onnx)):
                    if model is None:
                        results[label] = "n/a"
                        continue
                    time.sleep(SETTLE_S)
                    print(f"streamd {label} ({model.name}), imgsz {size}, {n} cameras ...", flush=True)
                    try:
                        d = bench_streamd(model, urls, args.warmup, args.seconds, workdir, f"{label}-{tag}")
                        results[label] = d
                        print(_detail(f"streamd {label}", d, n * args.fps), flush=True)
                    except RuntimeError as exc:
                        results[label] = "failed"
                        print(f"  streamd {label} failed: {exc}", flush=True)
                ultra: UltralyticsResult | str = ultra_why
                if ultra_onnx is not None:
                    time.sleep(SETTLE_S)
                    print(f"Ultralytics ({ultra_onnx.name}), imgsz {size}, {n} cameras ...", flush=True)
                    try:
                        ultra = bench_ultralytics(ultra_onnx, size, urls, args.warmup, args.seconds, workdir, tag)
                        hw = f"{ultra.input_hw[1]}x{ultra.input_hw[0]}" if ultra.input_hw else "?"
                        print(f"  Ultralytics: {ultra.fps:.2f} results/s at {hw}, inference "
                              f"{_f(ultra.infer_ms, 0)} ms per step; first result after {ultra.startup_s:.1f} s",
                              flush=True)
                    except RuntimeError as exc:
                        ultra = "failed"
                        print(f"  Ultralytics failed: {exc}", flush=True)
                rows.append(Row(size, n, raw, results["square"], results["default"], ultra))
    finally:
        cams.close()

    out = table(rows)
    print()
    print(out)
    print()
    print(legend(args.fps, shapes))
    if args.record:
        record(f"\n## Throughput and freshness: raw ONNX Runtime, streamd, Ultralytics "
               f"({time.strftime('%Y-%m-%d')}, {n_cores} x {cpu_model()})\n\n"
               f"Made by `benchmarks/bench.py --record`: {args.seconds:g} s per run after a "
               f"{args.warmup:g} s warm-up, {args.raw_seconds:g} s per raw layout, weights `{pt.name}`.\n\n"
               f"{out}\n\n{legend(args.fps, shapes)}\n")
    return 0


def report_soak(args: argparse.Namespace, raw: RawResult, model: Path, cameras: int, d: DaemonResult) -> None:
    rss_start = d.rss_mb[0][1] if d.rss_mb else 0.0
    rss_end = d.rss_mb[-1][1] if d.rss_mb else 0.0
    print(_detail("streamd default", d, cameras * args.fps))
    print(f"  {100 * d.fps / raw.fastest:.0f}% of the fastest raw layout ({raw.fastest:.1f} img/s); "
          f"p99 first third {d.p99_first_ms:.0f} ms -> last third {d.p99_last_ms:.0f} ms; "
          f"RSS {rss_start:.0f} MB after warm-up -> {rss_end:.0f} MB at the end, peak {d.peak_rss_mb:.0f} MB")
    if args.record:
        record(f"\n## Soak: streamd over {args.soak:g} s ({time.strftime('%Y-%m-%d')}, {cores()} x {cpu_model()})\n\n"
               "Made by `benchmarks/bench.py --soak SECONDS --record`: live RTSP cameras (640x480 H.264), "
               "config = model + cameras (scheduler defaults).\n\n"
               "| model | cameras x fps | seconds | fastest raw img/s | daemon fps | ratio | latency p50 / p99 ms "
               "| p99 first -> last third ms | max age ms | RSS MB after warm-up -> end (peak) |\n"
               "|---|---|---|---|---|---|---|---|---|---|\n"
               f"| {model.name} | {cameras} x {args.fps:g} | {args.soak:g} | {raw.fastest:.1f} | {d.fps:.1f} | "
               f"{100 * d.fps / raw.fastest:.0f}% | {d.p50_ms:.0f} / {d.p99_ms:.0f} | {d.p99_first_ms:.0f} -> "
               f"{d.p99_last_ms:.0f} | {d.max_age_ms:.0f} | {rss_start:.0f} -> {rss_end:.0f} ({d.peak_rss_mb:.0f}) |\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[320, 640], help="image sizes (default: 320 640)")
    ap.add_argument("--cameras", type=int, nargs="+", default=[4, 8], help="camera counts (default: 4 8)")
    ap.add_argument("--seconds", type=float, default=40, help="measured seconds per daemon/Ultralytics run")
    ap.add_argument("--warmup", type=float, default=10, help="seconds after the first result not measured")
    ap.add_argument("--fps", type=float, default=10, help="frames/s each camera sends (default: 10)")
    ap.add_argument("--raw-seconds", type=float, default=8, help="seconds per raw ONNX Runtime layout")
    ap.add_argument("--model-pt", type=Path, help="Ultralytics YOLOv8 .pt (default: the sample Normal/Fall model)")
    ap.add_argument("--soak", type=float, metavar="SECONDS",
                    help="instead: run streamd (default export, first size and camera count) this long "
                         "and report latency and memory growth")
    ap.add_argument("--record", action="store_true", help="append the result to benchmarks/RESULTS.md")
    ap.add_argument("--backends", action="store_true",
                    help="instead: ONNX Runtime and OpenVINO side by side, each alone and under the daemon "
                         "(bench_backends.py)")
    ap.add_argument("--onnx", type=Path, metavar="ONNX",
                    help="with --backends: this FP32 model (one size) instead of exporting one per --sizes")
    ap.add_argument("--int8", type=Path, nargs="+", metavar="ONNX",
                    help="with --backends: also these INT8 models (e.g. both flavours)")
    args = ap.parse_args(argv)
    if min(args.sizes) < 32 or any(s % 32 for s in args.sizes):
        ap.error("--sizes must be multiples of 32")
    if min(args.cameras) < 1 or args.seconds <= 0 or args.warmup < 0 or args.fps <= 0:
        ap.error("--cameras, --seconds and --fps must be positive, --warmup not negative")
    if shutil.which("ffmpeg") is None:
        ap.error("ffmpeg is needed to make the camera clips (apt-get install ffmpeg)")

    # SIGTERM and SIGHUP take the same way out as Ctrl-C: through the finally blocks that
    # stop every child this process started.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="streamd-bench-") as tmp:
            try:
                if args.backends:
                    # bench_backends uses this module's helpers and process list, as `bench`.
                    sys.modules.setdefault("bench", sys.modules[__name__])
                    from bench_backends import run_backends
                    return run_backends(args, Path(tmp))
                return run(args, Path(tmp))
            finally:
                stop_all()
    except KeyboardInterrupt:
        print("\ninterrupted; every camera server, daemon and Ultralytics process was stopped", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
