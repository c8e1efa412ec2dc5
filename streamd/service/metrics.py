"""Prometheus metrics: what the daemon exports, as ``prometheus_client`` collectors.

The daemon already counts most things as plain ints (``Daemon.stats()``, also published as
the ``stats`` message). Those are not copied into metric objects: ``DaemonCollector`` reads
one snapshot of that dict at scrape time and builds the families from it, so both outputs
always agree and a camera removed by a config reload simply stops appearing.

What the stats dict cannot express (latency distributions) lives in ``PipelineMetrics``,
whose histograms the daemon observes into as results come out of the pipeline.

Each daemon gets its own ``Registry`` (never the library's global one), so several daemons
in one process do not collide. The HTTP endpoint serving it is in ``service/http.py``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger("streamd.metrics")

# The library would add a ``<name>_created`` series to every counter and histogram: start
# times nobody here graphs, doubling the page. The switch is process-wide; the daemon is the
# only exporter in its process.
disable_created_metrics()

StatsFn = Callable[[], Mapping[str, Any]]


class Registry(CollectorRegistry):
    """A private registry whose ``close()`` also releases what its collectors hold (NVML).

    Every collector here has a ``describe()`` (its families without samples): the registry
    refuses a name registered twice, and ``?name[]=`` scrapes find each family."""

    def __init__(self) -> None:
        super().__init__()
        self._closers: list[Callable[[], None]] = []

    def register(self, collector: Any) -> None:
        super().register(collector)
        close = getattr(collector, "close", None)
        if callable(close):
            self._closers.append(close)

    def close(self) -> None:
        for close in self._closers:
            try:
                close()
            except Exception:  # noqa: BLE001 - closing is best effort
                log.debug("closing collector %r failed", close, exc_info=True)


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
    ("decode_errors", "streamd_camera_decode_errors_total",
     "Frames the decoder failed to return (in a file: skipped, the file goes on)."),
    ("corrupt_frames", "streamd_camera_frames_corrupt_total",
     "Frames returned with errors FFmpeg found and concealed (counted with decoder_threads: 1)."),
)
_CAMERA_GAUGES = (
    ("queue_depth", "streamd_camera_queue_depth", "Frames waiting in the camera's queue."),
    ("width", "streamd_camera_frame_width_pixels", "Width of the camera's frames (0 until known)."),
    ("height", "streamd_camera_frame_height_pixels", "Height of the camera's frames (0 until known)."),
)

_OBJECT_FAMILIES: tuple[tuple[str, type[Metric], str, str], ...] = (
    ("live", GaugeMetricFamily, "streamd_camera_objects_live", "Objects the camera's tracker follows now."),
    ("total", CounterMetricFamily, "streamd_camera_objects_total",
     "Objects (track ids) the camera's tracker has handed out since the daemon started."),
    ("errors", CounterMetricFamily, "streamd_camera_tracking_errors_total",
     "Frames published without track ids because the tracker failed on them."),
)


def _num(value: Any) -> float:
    # A missing or null field reads as 0 rather than failing the whole scrape.
    if value is None:
        return 0.0
    return float(value)


def _single(kind: type[Metric], name: str, help_: str, value: Any) -> Metric:
    return kind(name, help_, value=_num(value))


def daemon_families(stats: Mapping[str, Any]) -> list[Metric]:
    """Families for one ``Daemon.stats()`` snapshot (also valid for a ``stats`` message body)."""
    cams: Mapping[str, Mapping[str, Any]] = stats.get("cameras") or {}
    fams: list[Metric] = []
    for key, name, help_ in _CAMERA_COUNTERS:
        counter = CounterMetricFamily(name, help_, labels=["camera"])
        for cid, c in cams.items():
            counter.add_metric([cid], _num(c.get(key)))
        fams.append(counter)

    dropped = CounterMetricFamily(
        "streamd_camera_frames_dropped_total",
        "Frames dropped before inference, by cause: queue_full (the camera's queue overflowed), "
        "too_old (older than max_frame_age_ms), fps_cap (over the camera's fps).", labels=["camera", "cause"])
    for cid, c in cams.items():
        d = c.get("dropped") or {}
        for cause in DROP_CAUSES:
            dropped.add_metric([cid, cause], _num(d.get(cause)))
    fams.append(dropped)

    for key, name, help_ in _CAMERA_GAUGES:
        gauge = GaugeMetricFamily(name, help_, labels=["camera"])
        for cid, c in cams.items():
            gauge.add_metric([cid], _num(c.get(key)))
        fams.append(gauge)
    # Only cameras that track objects have these (``tracking.tracker`` not ``off``).
    for key, kind, name, help_ in _OBJECT_FAMILIES:
        fam = kind(name, help_, labels=["camera"])
        for cid, c in cams.items():
            objects = c.get("objects")
            if isinstance(objects, Mapping):
                fam.add_metric([cid], _num(objects.get(key)))
        fams.append(fam)
    state = GaugeMetricFamily("streamd_camera_state", "1 for the camera's current state, 0 for the others.",
                              labels=["camera", "state"])
    for cid, c in cams.items():
        current = str(c.get("state", ""))
        for s in CAMERA_STATES:
            state.add_metric([cid, s], 1 if s == current else 0)
        if current and current not in CAMERA_STATES:
            state.add_metric([cid, current], 1)   # a state newer than this list
    fams.append(state)

    sched = stats.get("scheduler") or {}
    pub = stats.get("publisher") or {}
    fams += [
        _single(CounterMetricFamily, "streamd_scheduler_batches_total", "Batches run through inference.",
                sched.get("batches")),
        _single(CounterMetricFamily, "streamd_scheduler_frames_total", "Frames run through inference, all cameras.",
                sched.get("frames")),
        _single(CounterMetricFamily, "streamd_publisher_messages_sent_total", "Messages sent on the PUB socket.",
                pub.get("sent")),
        _single(CounterMetricFamily, "streamd_publisher_messages_dropped_total",
                "Messages dropped before the PUB socket (publisher queue full).", pub.get("dropped")),
        _single(GaugeMetricFamily, "streamd_uptime_seconds", "Seconds since the daemon started.",
                stats.get("uptime_s")),
    ]
    return fams


class DaemonCollector:
    """A collector over ``Daemon.stats``: one snapshot per scrape, built fresh each time,
    so cameras that came or went since the last scrape are exactly what is exported."""

    def __init__(self, stats_fn: StatsFn) -> None:
        self._stats_fn = stats_fn

    def collect(self) -> list[Metric]:
        return daemon_families(self._stats_fn())

    def describe(self) -> list[Metric]:
        return daemon_families({})


# ---- pipeline latencies -------------------------------------------------------------------------------
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64)
# Edge boxes: a few ms on a GPU up to seconds on a loaded CPU; beyond 10 s is "broken".
LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.35, 0.5, 0.75,
                                      1.0, 1.5, 2.5, 5.0, 10.0)


def histogram(name: str, help_: str, buckets: Sequence[float], labels: Sequence[str] = ()) -> Histogram:
    """A histogram in no registry: the collector that owns it yields it."""
    return Histogram(name, help_, labels, buckets=buckets, registry=None)


class PipelineMetrics:
    """The histograms the daemon observes into; a collector for the daemon's registry.

    ``camera_ids``, when given, returns the cameras that currently exist; per-camera
    series of any other camera are dropped at scrape time, so a camera removed by a
    reload leaves no stale histogram behind."""

    def __init__(self, camera_ids: Callable[[], Iterable[str]] | None = None,
                 latency_buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self._camera_ids = camera_ids
        self._lock = threading.Lock()
        self._cameras: set[str] = set()       # cameras with a capture-to-publish series
        self.batch_size = histogram("streamd_batch_size", "Frames per inference batch.", BATCH_SIZE_BUCKETS)
        self.queue_seconds = histogram(
            "streamd_queue_seconds", "Seconds from a frame's capture until its batch was assembled.",
            latency_buckets)
        self.inference_seconds = histogram(
            "streamd_inference_seconds", "Seconds the backend spent on one batch.", latency_buckets)
        self.capture_to_publish_seconds = histogram(
            "streamd_capture_to_publish_seconds",
            "Seconds from a frame's capture until its detections were handed to the publisher.",
            latency_buckets, ["camera"])

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
            with self._lock:
                self._cameras.add(r.camera_id)
                self.capture_to_publish_seconds.labels(camera=r.camera_id).observe(now - r.capture_mono)

    def forget_camera(self, camera_id: str) -> None:
        with self._lock:
            if camera_id in self._cameras:
                self._cameras.discard(camera_id)
                self.capture_to_publish_seconds.remove(camera_id)

    def _histograms(self) -> tuple[Histogram, ...]:
        return self.batch_size, self.queue_seconds, self.inference_seconds, self.capture_to_publish_seconds

    def describe(self) -> list[Metric]:
        return [fam for h in self._histograms() for fam in h.describe()]

    def collect(self) -> Iterator[Metric]:
        if self._camera_ids is not None:
            live = set(self._camera_ids())
            with self._lock:
                gone = self._cameras - live
            for cid in gone:
                self.forget_camera(cid)
        for h in self._histograms():
            yield from h.collect()


# ---- process threads (the library's ProcessCollector has the rest) -------------------------------------------
class ThreadsCollector:
    """``process_threads``: OS threads, native ones (ONNX Runtime, FFmpeg) included, which
    ``threading`` cannot see. Nothing where /proc is absent."""

    def __init__(self, status_path: str = "/proc/self/status") -> None:
        self._path = status_path

    def collect(self) -> list[Metric]:
        try:
            with open(self._path, encoding="ascii", errors="replace") as f:
                count = next((line.split()[1] for line in f if line.startswith("Threads:")), None)
        except OSError:
            return []
        if count is None:
            return []
        threads = self.describe()[0]
        threads.add_metric([], float(count))
        return [threads]

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily("process_threads", "Number of OS threads in the process.")]


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

    def collect(self) -> list[Metric]:
        with self._lock:
            if not self._tried:
                self._open()
            nvml, handles = self._nvml, list(self._handles)
        if nvml is None:
            return []
        util, used, total = fams = self.describe()
        for i, h in enumerate(handles):
            try:
                rates = nvml.nvmlDeviceGetUtilizationRates(h)
                mem = nvml.nvmlDeviceGetMemoryInfo(h)
            except nvml.NVMLError as exc:
                # E.g. a GPU that fell off the bus: skip it, keep the others and the scrape.
                log.debug("NVML query of GPU %d failed: %s", i, exc)
                continue
            util.add_metric([str(i)], rates.gpu / 100.0)
            used.add_metric([str(i)], mem.used)
            total.add_metric([str(i)], mem.total)
        return fams

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily("streamd_gpu_utilization_ratio",
                                  "Fraction of the last sample period the GPU was busy (0-1).", labels=["gpu"]),
                GaugeMetricFamily("streamd_gpu_memory_used_bytes", "GPU memory in use, all processes.",
                                  labels=["gpu"]),
                GaugeMetricFamily("streamd_gpu_memory_total_bytes", "GPU memory installed.", labels=["gpu"])]

    def close(self) -> None:
        with self._lock:
            nvml, self._nvml, self._handles = self._nvml, None, []
        if nvml is not None:
            try:
                nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting down is best effort
                pass


def build_registry(stats_fn: StatsFn | None = None, pipeline: PipelineMetrics | None = None, *,
                   process: bool = True, gpu: bool = True) -> Registry:
    """The daemon's registry: its stats counters, pipeline histograms, process and GPU."""
    reg = Registry()
    if stats_fn is not None:
        reg.register(DaemonCollector(stats_fn))
    if pipeline is not None:
        reg.register(pipeline)
    if process:
        ProcessCollector(registry=reg)    # process_cpu_seconds_total, memory, fds, start time
        reg.register(ThreadsCollector())
    if gpu:
        reg.register(GpuCollector())
    return reg
