"""Prometheus metrics over plain HTTP, with the standard library only.

The daemon already counts most things as plain ints (``Daemon.stats()``, also published as
the ``stats`` message). Those are not copied into metric objects: a *collector* reads one
snapshot of that dict at scrape time and builds the families from it, so both outputs
always agree and a camera removed by a config reload simply stops appearing.

What the stats dict cannot express (latency distributions) lives in ``PipelineMetrics``,
whose histograms the daemon observes into as results come out of the pipeline.

Text exposition format 0.0.4:
https://prometheus.io/docs/instrumenting/exposition_formats/#text-based-format
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar
from urllib.parse import urlsplit

from ..errors import StreamdError

log = logging.getLogger("streamd.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9108

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_TYPES = ("counter", "gauge", "histogram", "summary", "untyped")


# ---- rendering ------------------------------------------------------------------------------------
def format_value(value: float) -> str:
    """Shortest exact text for a sample value (``3`` rather than ``3.0``, ``+Inf``, ``NaN``)."""
    v = float(value)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    # Below 2**53 an integral float is exactly its int; beyond, repr keeps the exponent form.
    if v.is_integer() and abs(v) < 2 ** 53:
        return str(int(v))
    return repr(v)


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    # HELP lines escape only backslash and newline; a quote stays as it is.
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _check_name(name: str) -> str:
    if not _METRIC_NAME.match(name):
        raise ValueError(f"invalid metric name {name!r}")
    return name


def _check_labelnames(names: Iterable[str], reserved: tuple[str, ...] = ()) -> tuple[str, ...]:
    out = tuple(names)
    for n in out:
        if not _LABEL_NAME.match(n) or n.startswith("__"):
            raise ValueError(f"invalid label name {n!r}")
        if n in reserved:
            raise ValueError(f"label name {n!r} is reserved here")
    if len(set(out)) != len(out):
        raise ValueError(f"duplicate label names in {out}")
    return out


@dataclass(frozen=True)
class Sample:
    name: str                                  # full sample name, suffix included
    labels: tuple[tuple[str, str], ...]
    value: float


@dataclass
class MetricFamily:
    """One ``# HELP``/``# TYPE`` block and its samples; what collectors return."""

    name: str
    help: str
    type: str
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_name(self.name)
        if self.type not in _TYPES:
            raise ValueError(f"invalid metric type {self.type!r} for {self.name}")

    def add(self, value: float, labels: Mapping[str, Any] | None = None, suffix: str = "") -> MetricFamily:
        pairs = tuple((k, str(v)) for k, v in (labels or {}).items())
        _check_labelnames(k for k, _ in pairs)
        self.samples.append(Sample(self.name + suffix, pairs, float(value)))
        return self

    def render(self) -> str:
        lines = [f"# HELP {self.name} {escape_help(self.help)}", f"# TYPE {self.name} {self.type}"]
        for s in self.samples:
            if s.labels:
                inner = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in s.labels)
                lines.append(f"{s.name}{{{inner}}} {format_value(s.value)}")
            else:
                lines.append(f"{s.name} {format_value(s.value)}")
        return "\n".join(lines) + "\n"


def render(families: Iterable[MetricFamily]) -> str:
    return "".join(f.render() for f in families)


# ---- metric types -----------------------------------------------------------------------------------
class _Metric:
    """A metric with zero or more label names; each label-value combination is a child.

    One lock per metric guards all its children: updates are a few arithmetic ops, so
    contention is negligible and a scrape sees each child consistently (a histogram's
    buckets, sum and count always agree)."""

    type = "untyped"
    _reserved_labels: tuple[str, ...] = ()

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name = _check_name(name)
        self.help = help
        self.labelnames = _check_labelnames(labelnames, self._reserved_labels)
        self._lock = threading.Lock()
        self._children: dict[tuple[str, ...], Any] = {}
        if not self.labelnames:
            self._children[()] = self._new_child()

    def _new_child(self) -> Any:
        raise NotImplementedError

    def _key(self, values: tuple[Any, ...], kw: Mapping[str, Any]) -> tuple[str, ...]:
        if values and kw:
            raise ValueError("pass label values either by position or by name, not both")
        if kw:
            if set(kw) != set(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(kw)}")
            return tuple(str(kw[n]) for n in self.labelnames)
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {len(values)} value(s)")
        return tuple(str(v) for v in values)

    def labels(self, *values: Any, **kw: Any) -> Any:
        if not self.labelnames:
            raise ValueError(f"{self.name} has no labels")
        key = self._key(values, kw)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._new_child()
            return child

    def remove(self, *values: Any, **kw: Any) -> None:
        """Drop one series (e.g. a camera that was removed); absent ones are ignored."""
        key = self._key(values, kw)
        with self._lock:
            self._children.pop(key, None)

    def label_values(self) -> list[dict[str, str]]:
        with self._lock:
            return [dict(zip(self.labelnames, k)) for k in self._children if k]

    def _only(self) -> Any:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames}: use .labels(...) first")
        return self._children[()]

    def _snapshot(self) -> list[tuple[tuple[str, ...], Any]]:
        raise NotImplementedError

    def collect(self) -> MetricFamily:
        fam = MetricFamily(self.name, self.help, self.type)
        for key, value in self._snapshot():
            fam.add(value, dict(zip(self.labelnames, key)))
        return fam


class _Value:
    __slots__ = ("_lock", "value")

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self.value = 0.0


class _CounterChild(_Value):
    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        with self._lock:
            self.value += amount


class _GaugeChild(_Value):
    __slots__ = ()

    def set(self, value: float) -> None:
        with self._lock:
            self.value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        with self._lock:
            self.value -= amount


class Counter(_Metric):
    """Name it with its ``_total`` suffix: it is rendered exactly as given."""

    type = "counter"

    def _new_child(self) -> _CounterChild:
        return _CounterChild(self._lock)

    def inc(self, amount: float = 1.0) -> None:
        self._only().inc(amount)

    @property
    def value(self) -> float:
        return self._only().value

    def _snapshot(self) -> list[tuple[tuple[str, ...], Any]]:
        with self._lock:
            return [(k, c.value) for k, c in self._children.items()]


class Gauge(_Metric):
    type = "gauge"

    def _new_child(self) -> _GaugeChild:
        return _GaugeChild(self._lock)

    def set(self, value: float) -> None:
        self._only().set(value)

    def inc(self, amount: float = 1.0) -> None:
        self._only().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._only().dec(amount)

    @property
    def value(self) -> float:
        return self._only().value

    def _snapshot(self) -> list[tuple[tuple[str, ...], Any]]:
        with self._lock:
            return [(k, c.value) for k, c in self._children.items()]


class _HistogramChild:
    __slots__ = ("_lock", "_bounds", "counts", "sum", "count")

    def __init__(self, lock: threading.Lock, bounds: tuple[float, ...]) -> None:
        self._lock = lock
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)     # per bucket, not cumulative; last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        v = float(value)
        if math.isnan(v):
            return   # one NaN would make _sum NaN for the rest of the process
        # bisect_left: a value equal to a bound belongs in that bound's bucket (le = "<=").
        i = bisect.bisect_left(self._bounds, v)
        with self._lock:
            self.counts[i] += 1
            self.sum += v
            self.count += 1


class Histogram(_Metric):
    """Fixed buckets; rendered cumulatively with the ``+Inf`` bucket added."""

    type = "histogram"
    _reserved_labels = ("le",)

    def __init__(self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str] = ()) -> None:
        bounds = tuple(float(b) for b in buckets if not math.isinf(b))
        if not bounds or any(b2 <= b1 for b1, b2 in zip(bounds, bounds[1:])):
            raise ValueError(f"{name}: buckets must be non-empty and strictly increasing, got {tuple(buckets)}")
        self.buckets = bounds
        super().__init__(name, help, labelnames)

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self._lock, self.buckets)

    def observe(self, value: float) -> None:
        self._only().observe(value)

    def collect(self) -> MetricFamily:
        fam = MetricFamily(self.name, self.help, self.type)
        with self._lock:
            snap = [(k, list(c.counts), c.sum, c.count) for k, c in self._children.items()]
        les = [format_value(b) for b in self.buckets] + ["+Inf"]
        for key, counts, total, n in snap:
            labels = dict(zip(self.labelnames, key))
            running = 0
            for le, c in zip(les, counts):
                running += c
                fam.add(running, {**labels, "le": le}, "_bucket")
            fam.add(total, labels, "_sum")
            fam.add(n, labels, "_count")
        return fam


# ---- registry ----------------------------------------------------------------------------------------
Collector = Callable[[], Iterable[MetricFamily]]
M = TypeVar("M", bound=_Metric)


class Registry:
    """Metric objects plus collectors (callables run at every scrape).

    A collector that raises makes ``collect()``/``render()`` raise: a scrape reports the
    failure (HTTP 500) rather than silently serving a partial page."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: dict[str, _Metric] = {}
        self._collectors: list[Collector] = []

    def register(self, metric: M) -> M:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} is already registered")
            self._metrics[metric.name] = metric
        return metric

    def unregister(self, metric: _Metric) -> None:
        with self._lock:
            if self._metrics.get(metric.name) is metric:
                del self._metrics[metric.name]

    def register_collector(self, collector: Collector) -> Collector:
        with self._lock:
            self._collectors.append(collector)
        return collector

    def unregister_collector(self, collector: Collector) -> None:
        with self._lock:
            if collector in self._collectors:
                self._collectors.remove(collector)

    def collect(self) -> list[MetricFamily]:
        with self._lock:
            metrics = list(self._metrics.values())
            collectors = list(self._collectors)
        families = [m.collect() for m in metrics]
        for c in collectors:
            families.extend(c())
        seen: set[str] = set()
        for f in families:
            if f.name in seen:
                # Two blocks of one name are invalid exposition; fail loudly instead.
                raise ValueError(f"metric family {f.name} produced twice")
            seen.add(f.name)
        return families

    def render(self) -> str:
        return render(self.collect())

    def close(self) -> None:
        """Release what collectors hold (the NVML session)."""
        with self._lock:
            collectors = list(self._collectors)
        for c in collectors:
            close = getattr(c, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    log.debug("closing collector %r failed", c, exc_info=True)


# ---- the daemon's own counters (from Daemon.stats()) -----------------------------------------------------
CAMERA_STATES = ("starting", "connecting", "streaming", "stalled", "lost", "reconnecting", "ended", "stopped")
DROP_CAUSES = ("queue_full", "too_old", "fps_cap")

_CAMERA_COUNTERS = (
    # (stats key, metric name, help)
    ("decoded", "streamd_camera_frames_decoded_total", "Frames decoded from the camera and kept (after the fps cap)."),
    ("skipped", "streamd_camera_frames_skipped_total",
     "Frames decoded but not converted or queued: a newer one would be taken first (pacing, not a loss)."),
    ("inferred", "streamd_camera_frames_inferred_total", "Frames of the camera that went through inference."),
    ("published", "streamd_camera_frames_published_total",
     "Detection messages of the camera sent on the PUB socket."),
    ("reconnects", "streamd_camera_reconnects_total", "Times the camera was reopened after losing its stream."),
    ("decode_errors", "streamd_camera_decode_errors_total", "Frames the decoder failed to return."),
)


def _num(value: Any) -> float:
    # A missing or null field reads as 0 rather than failing the whole scrape.
    if value is None:
        return 0.0
    return float(value)


def daemon_families(stats: Mapping[str, Any]) -> list[MetricFamily]:
    """Families for one ``Daemon.stats()`` snapshot (also valid for a ``stats`` message body)."""
    cams: Mapping[str, Mapping[str, Any]] = stats.get("cameras") or {}
    fams: list[MetricFamily] = []
    for key, name, help_ in _CAMERA_COUNTERS:
        fam = MetricFamily(name, help_, "counter")
        for cid, c in cams.items():
            fam.add(_num(c.get(key)), {"camera": cid})
        fams.append(fam)

    dropped = MetricFamily("streamd_camera_frames_dropped_total",
                           "Frames dropped before inference, by cause: queue_full (the camera's queue "
                           "overflowed), too_old (older than max_frame_age_ms), fps_cap (over the camera's fps).",
                           "counter")
    for cid, c in cams.items():
        d = c.get("dropped") or {}
        for cause in DROP_CAUSES:
            dropped.add(_num(d.get(cause)), {"camera": cid, "cause": cause})
    fams.append(dropped)

    depth = MetricFamily("streamd_camera_queue_depth", "Frames waiting in the camera's queue.", "gauge")
    width = MetricFamily("streamd_camera_frame_width_pixels", "Width of the camera's frames (0 until known).", "gauge")
    height = MetricFamily("streamd_camera_frame_height_pixels", "Height of the camera's frames (0 until known).",
                          "gauge")
    state = MetricFamily("streamd_camera_state", "1 for the camera's current state, 0 for the others.", "gauge")
    for cid, c in cams.items():
        depth.add(_num(c.get("queue_depth")), {"camera": cid})
        width.add(_num(c.get("width")), {"camera": cid})
        height.add(_num(c.get("height")), {"camera": cid})
        current = str(c.get("state", ""))
        for s in CAMERA_STATES:
            state.add(1 if s == current else 0, {"camera": cid, "state": s})
        if current and current not in CAMERA_STATES:
            state.add(1, {"camera": cid, "state": current})   # a state newer than this list
    fams += [depth, width, height, state]

    sched = stats.get("scheduler") or {}
    fams.append(MetricFamily("streamd_scheduler_batches_total", "Batches run through inference.", "counter")
                .add(_num(sched.get("batches"))))
    fams.append(MetricFamily("streamd_scheduler_frames_total", "Frames run through inference, all cameras.",
                             "counter").add(_num(sched.get("frames"))))
    pub = stats.get("publisher") or {}
    fams.append(MetricFamily("streamd_publisher_messages_sent_total", "Messages sent on the PUB socket.",
                             "counter").add(_num(pub.get("sent"))))
    fams.append(MetricFamily("streamd_publisher_messages_dropped_total",
                             "Messages dropped before the PUB socket (publisher queue full).",
                             "counter").add(_num(pub.get("dropped"))))
    fams.append(MetricFamily("streamd_uptime_seconds", "Seconds since the daemon started.", "gauge")
                .add(_num(stats.get("uptime_s"))))
    return fams


def daemon_collector(stats_fn: Callable[[], Mapping[str, Any]]) -> Collector:
    """A collector over ``Daemon.stats``: one snapshot per scrape, built fresh each time,
    so cameras that came or went since the last scrape are exactly what is exported."""
    def collect() -> list[MetricFamily]:
        return daemon_families(stats_fn())
    return collect


# ---- pipeline latencies -------------------------------------------------------------------------------
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64)
# Edge boxes: a few ms on a GPU up to seconds on a loaded CPU; beyond 10 s is "broken".
LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.35, 0.5, 0.75,
                                      1.0, 1.5, 2.5, 5.0, 10.0)


class PipelineMetrics:
    """The histograms the daemon observes into. Register it as a collector:
    ``registry.register_collector(pipeline_metrics)``.

    ``camera_ids``, when given, returns the cameras that currently exist; per-camera
    series of any other camera are dropped at scrape time, so a camera removed by a
    reload leaves no stale histogram behind."""

    def __init__(self, camera_ids: Callable[[], Iterable[str]] | None = None,
                 latency_buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self._camera_ids = camera_ids
        self.batch_size = Histogram("streamd_batch_size", "Frames per inference batch.", BATCH_SIZE_BUCKETS)
        self.queue_seconds = Histogram(
            "streamd_queue_seconds", "Seconds from a frame's capture until its batch was assembled.",
            latency_buckets)
        self.inference_seconds = Histogram(
            "streamd_inference_seconds", "Seconds the backend spent on one batch.", latency_buckets)
        self.capture_to_publish_seconds = Histogram(
            "streamd_capture_to_publish_seconds",
            "Seconds from a frame's capture until its detections were handed to the publisher.",
            latency_buckets, ["camera"])

    def observe_batch(self, size: int, inference_s: float) -> None:
        self.batch_size.observe(size)
        self.inference_seconds.observe(inference_s)

    def observe_queue(self, seconds: float) -> None:
        self.queue_seconds.observe(seconds)

    def observe_capture_to_publish(self, camera_id: str, seconds: float) -> None:
        self.capture_to_publish_seconds.labels(camera=camera_id).observe(seconds)

    def observe_results(self, results: Sequence[Any], now_mono: float | None = None) -> None:
        """Everything at once from one batch's ``FrameResult``s, right after they were
        handed to the publisher: the batch's size and inference time, each frame's queue
        time (``timings["queue"]``) and its capture-to-publish time (``capture_mono`` to now).
        Results without timings still count for size and latency."""
        if not results:
            return
        now = time.monotonic() if now_mono is None else now_mono
        infer = results[0].timings.get("infer")
        self.batch_size.observe(len(results))
        if infer is not None:
            self.inference_seconds.observe(infer)
        for r in results:
            q = r.timings.get("queue")
            if q is not None:
                self.queue_seconds.observe(q)
            self.capture_to_publish_seconds.labels(camera=r.camera_id).observe(now - r.capture_mono)

    def forget_camera(self, camera_id: str) -> None:
        self.capture_to_publish_seconds.remove(camera=camera_id)

    def __call__(self) -> list[MetricFamily]:
        if self._camera_ids is not None:
            live = set(self._camera_ids())
            for lv in self.capture_to_publish_seconds.label_values():
                if lv["camera"] not in live:
                    self.forget_camera(lv["camera"])
        return [h.collect() for h in (self.batch_size, self.queue_seconds, self.inference_seconds,
                                      self.capture_to_publish_seconds)]


# ---- process (Linux /proc) ------------------------------------------------------------------------------
class ProcessCollector:
    """The conventional ``process_*`` families from /proc/self; nothing where /proc is absent."""

    def __init__(self, proc: str = "/proc/self") -> None:
        self._proc = proc
        self._ticks = 100.0
        self._page = 4096
        self._boot = 0.0
        self.available = os.path.exists(os.path.join(proc, "stat"))
        if not self.available:
            return
        try:
            self._ticks = float(os.sysconf("SC_CLK_TCK"))
            self._page = int(os.sysconf("SC_PAGE_SIZE"))
            with open("/proc/stat", encoding="ascii") as f:
                self._boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
        except (OSError, ValueError, StopIteration):
            self.available = False

    def __call__(self) -> list[MetricFamily]:
        if not self.available:
            return []
        with open(os.path.join(self._proc, "stat"), encoding="ascii", errors="replace") as f:
            raw = f.read()
        # The command name (field 2) is in parentheses and may itself hold spaces or ')'.
        rest = raw[raw.rindex(")") + 2:].split()
        # rest[0] is field 3 (state); field N is rest[N - 3]. See proc(5).
        utime, stime = float(rest[11]), float(rest[12])
        threads = float(rest[17])
        start_ticks = float(rest[19])
        vsize, rss_pages = float(rest[20]), float(rest[21])
        try:
            fds = float(len(os.listdir(os.path.join(self._proc, "fd"))))
        except OSError:
            fds = float("nan")
        fams = [
            MetricFamily("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.",
                         "counter").add((utime + stime) / self._ticks),
            MetricFamily("process_resident_memory_bytes", "Resident memory size in bytes.", "gauge")
            .add(rss_pages * self._page),
            MetricFamily("process_virtual_memory_bytes", "Virtual memory size in bytes.", "gauge").add(vsize),
            MetricFamily("process_start_time_seconds", "Start time of the process since unix epoch in seconds.",
                         "gauge").add(self._boot + start_ticks / self._ticks),
            MetricFamily("process_threads", "Number of OS threads in the process.", "gauge").add(threads),
        ]
        if not math.isnan(fds):
            fams.append(MetricFamily("process_open_fds", "Number of open file descriptors.", "gauge").add(fds))
        max_fds = self._max_fds()
        if max_fds is not None:
            fams.append(MetricFamily("process_max_fds", "Maximum number of open file descriptors.", "gauge")
                        .add(max_fds))
        return fams

    def _max_fds(self) -> float | None:
        try:
            with open(os.path.join(self._proc, "limits"), encoding="ascii") as f:
                for line in f:
                    if line.startswith("Max open files"):
                        soft = line.split()[3]
                        return float("inf") if soft == "unlimited" else float(soft)
        except (OSError, ValueError, IndexError):
            pass
        return None


# ---- GPU (NVML) ---------------------------------------------------------------------------------------------
class GpuCollector:
    """GPU utilisation and memory through NVML (the ``nvidia-ml-py`` package, module
    ``pynvml``). Without the package, the driver, or a GPU it exports nothing and never
    raises: NVML is tried once, on the first scrape, and a failure is only logged at debug."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tried = False
        self._nvml: Any = None
        self._handles: list[Any] = []

    def _open(self) -> None:
        self._tried = True
        try:
            import pynvml
        except ImportError:
            log.debug("pynvml is not installed: no GPU metrics")
            return
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - NVMLError, or OSError from a broken driver install
            log.debug("NVML unavailable (%s): no GPU metrics", exc)
            return
        try:
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as exc:  # noqa: BLE001
            log.debug("NVML could not list GPUs (%s): no GPU metrics", exc)
            pynvml.nvmlShutdown()
            return
        self._nvml = pynvml

    @property
    def available(self) -> bool:
        with self._lock:
            if not self._tried:
                self._open()
            return self._nvml is not None

    def __call__(self) -> list[MetricFamily]:
        with self._lock:
            if not self._tried:
                self._open()
            nvml, handles = self._nvml, list(self._handles)
        if nvml is None:
            return []
        util = MetricFamily("streamd_gpu_utilization_ratio",
                            "Fraction of the last sample period the GPU was busy (0-1).", "gauge")
        used = MetricFamily("streamd_gpu_memory_used_bytes", "GPU memory in use, all processes.", "gauge")
        total = MetricFamily("streamd_gpu_memory_total_bytes", "GPU memory installed.", "gauge")
        for i, h in enumerate(handles):
            try:
                rates = nvml.nvmlDeviceGetUtilizationRates(h)
                mem = nvml.nvmlDeviceGetMemoryInfo(h)
            except nvml.NVMLError as exc:
                # E.g. a GPU that fell off the bus: skip it, keep the others and the scrape.
                log.debug("NVML query of GPU %d failed: %s", i, exc)
                continue
            labels = {"gpu": str(i)}
            util.add(rates.gpu / 100.0, labels)
            used.add(mem.used, labels)
            total.add(mem.total, labels)
        return [util, used, total]

    def close(self) -> None:
        with self._lock:
            nvml, self._nvml, self._handles = self._nvml, None, []
        if nvml is not None:
            try:
                nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting down is best effort
                pass


def build_registry(stats_fn: Callable[[], Mapping[str, Any]] | None = None,
                   pipeline: PipelineMetrics | None = None, *, process: bool = True,
                   gpu: bool = True) -> Registry:
    """The daemon's registry: its stats counters, pipeline histograms, process and GPU."""
    reg = Registry()
    if stats_fn is not None:
        reg.register_collector(daemon_collector(stats_fn))
    if pipeline is not None:
        reg.register_collector(pipeline)
    if process:
        reg.register_collector(ProcessCollector())
    if gpu:
        reg.register_collector(GpuCollector())
    return reg


# ---- HTTP --------------------------------------------------------------------------------------------------
HealthCheck = Callable[[], "str | None"]   # None (or "") when healthy, else the reason


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    registry: Registry
    health: HealthCheck | None

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr for every client that hangs up early.
        log.debug("metrics request from %s failed", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10                   # a client that stops sending cannot pin a thread forever
    server_version = "streamd-metrics"

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/metrics":
            try:
                body = self.server.registry.render().encode("utf-8")
            except Exception as exc:  # noqa: BLE001 - one failed scrape must not stop the server
                log.warning("metrics scrape failed", exc_info=True)
                self._reply(500, f"scrape failed: {type(exc).__name__}: {exc}"[:300] + "\n")
                return
            self._reply(200, body, CONTENT_TYPE)
        elif path == "/healthz":
            reason = self._health()
            if reason:
                self._reply(503, reason + "\n")
            else:
                self._reply(200, "ok\n")
        else:
            self._reply(404, "not found: try /metrics or /healthz\n")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _health(self) -> str | None:
        check = self.server.health
        if check is None:
            return None
        try:
            return check() or None
        except Exception as exc:  # noqa: BLE001 - a broken check means "not healthy", not a crash
            log.warning("health check failed", exc_info=True)
            return f"health check failed: {type(exc).__name__}: {exc}"

    def _reply(self, code: int, body: bytes | str, ctype: str = "text/plain; charset=utf-8") -> None:
        data = body.encode("utf-8") if isinstance(body, str) else body
        try:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("metrics client %s went away", self.client_address)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)


class MetricsServer:
    """``GET /metrics`` and ``GET /healthz`` on a daemon thread.

    Binds in the constructor, so a busy port fails start-up with a clear error (port 0
    picks a free one: read ``.port``). ``health`` returns None when healthy or a short
    reason, served as 503. ``stop()`` also closes the registry (NVML)."""

    def __init__(self, registry: Registry, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 health: HealthCheck | None = None) -> None:
        self.registry = registry
        cls = _Server6 if ":" in host else _Server
        try:
            self._server = cls((host.strip("[]"), port), _Handler)
        except OSError as exc:
            raise StreamdError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
        self._server.registry = registry
        self._server.health = health
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def url(self) -> str:
        host = f"[{self.host.strip('[]')}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        if self._thread is not None or self._closed:
            raise RuntimeError("a metrics server starts once")
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="metrics-http", daemon=True)
        self._thread.start()
        log.info("metrics on %s/metrics", self.url)

    def stop(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            # shutdown() waits for serve_forever to return: only call it when it runs.
            self._server.shutdown()
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("metrics server thread still running after %.1fs", timeout)
        self._server.server_close()
        self.registry.close()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
