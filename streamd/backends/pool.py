"""A small pool of backend workers, its layout chosen by measuring this box.

One ONNX Runtime session with every core is not the fastest way to spend a small CPU: its
intra-op threads synchronise after every operator, and the cores idle at each barrier. On
the 2-core development box two sessions with one thread each do 20-25% more images per
second than one session with two threads. On a GPU, two workers let one batch's copies and
host work overlap the other's compute. Which layout wins depends on the model, the CPU and
what else runs, so at start the candidate layouts are measured for a few seconds on the
real model and the fastest one is kept (logged; ``scheduler.workers`` and ``model.threads``
override it).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .base import Backend, ModelInfo, open_each

log = logging.getLogger("streamd.backend.pool")

MAX_AUTO_WORKERS = 8     # more sessions than this only cost memory on the boxes we target


def usable_cores() -> int:
    """Cores this process may run on (a cgroup/affinity limit, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):   # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Layout:
    """``workers`` backend instances, each with ``threads`` intra-op threads (0: the backend's choice)."""

    workers: int
    threads: int

    def __str__(self) -> str:
        return f"{self.workers} worker(s) x {self.threads or 'auto'} thread(s)"


def candidate_layouts(cores: int, on_cpu: bool) -> list[Layout]:
    """Layouts worth measuring. CPU: one session with every core, one session per core, and
    in between two threads per session; accelerators: one or two workers (the device does
    the work; a second worker hides copies and host work)."""
    if not on_cpu:
        return [Layout(1, 0), Layout(2, 0)]
    out = [Layout(1, cores)]
    if cores >= 4:
        out.append(Layout(cores // 2, 2))
    if cores >= 2:
        out.append(Layout(min(cores, MAX_AUTO_WORKERS), 1))
    return list(dict.fromkeys(out))


def default_layout(cores: int, on_cpu: bool) -> Layout:
    """The layout used without measuring: the usual winner (one single-threaded session
    per core on a CPU, two workers on an accelerator)."""
    return Layout(min(cores, MAX_AUTO_WORKERS), 1) if on_cpu else Layout(2, 0)


def measure(backends: list[Backend], seconds: float, min_runs: int = 3) -> float:
    """Images per second of ``backends`` inferring batch-1 inputs concurrently, one thread
    each, for about ``seconds`` (and at least ``min_runs`` runs per backend). The first run
    of each backend allocates and is not counted."""
    info = backends[0].info
    x = info.blank_input(1)
    counts = [0] * len(backends)
    start = threading.Barrier(len(backends) + 1)
    stop_at = [0.0]

    def run(i: int, b: Backend) -> None:
        b.infer(x)                   # allocation and first-run tuning, not counted
        start.wait()
        while counts[i] < min_runs or time.monotonic() < stop_at[0]:
            b.infer(x)
            counts[i] += 1

    threads = [threading.Thread(target=run, args=(i, b), name=f"autotune-{i}", daemon=True)
               for i, b in enumerate(backends)]
    for t in threads:
        t.start()
    # The end is set before the barrier lets the runners go, so none can see it unset.
    stop_at[0] = time.monotonic() + seconds + 60.0
    start.wait()
    t0 = time.monotonic()
    stop_at[0] = t0 + seconds
    for t in threads:
        t.join()
    return sum(counts) / max(time.monotonic() - t0, 1e-6)


class BackendPool:
    """``workers`` loaded backends of one model; worker ``i`` only ever uses ``backends[i]``
    (one thread per session/context, never shared)."""

    def __init__(self, backends: list[Backend], layout: Layout, measured: dict[str, float] | None = None,
                 seconds_per_image: float | None = None) -> None:
        if not backends:
            raise ValueError("a backend pool needs at least one backend")
        self.backends = backends
        self.layout = layout
        self.measured = measured or {}              # layout -> images/s, when measured
        self.seconds_per_image = seconds_per_image  # one worker, batch 1, at the model's size
        self.info: ModelInfo = backends[0].info

    @classmethod
    def of(cls, backend: Backend) -> "BackendPool":
        """A pool of the one backend given (tests, tools)."""
        return cls([backend], Layout(1, 0))

    @property
    def name(self) -> str:
        return self.backends[0].name

    def describe(self) -> dict[str, Any]:
        d = dict(self.backends[0].describe())
        d["workers"] = self.layout.workers
        d["threads_per_worker"] = self.layout.threads
        if self.measured:
            d["measured_img_s"] = dict(self.measured)
        return d

    def close(self) -> None:
        for b in self.backends:
            b.close()


Opener = Callable[[int], Backend]   # threads -> a loaded backend (no warm-up)
LayoutOpener = Callable[[Layout], list[Backend]]   # a layout -> its workers (no warm-up)


def build_pool(open_one: Opener | None, *, workers: int | None, threads: int, on_cpu: bool,
               autotune_s: float, cores: int | None = None,
               open_layout: LayoutOpener | None = None) -> BackendPool:
    """Open the pool. ``workers`` None means choose: measure the candidate layouts for
    ``autotune_s`` seconds in all (0: take ``default_layout`` without measuring).
    ``threads`` > 0 fixes the threads per worker. ``open_layout``, when given, opens a
    layout's workers at once (OpenVINO: one compiled model, one infer request per worker);
    otherwise ``open_one`` opens each worker's own backend."""
    cores = cores or usable_cores()
    if open_layout is None:
        assert open_one is not None, "build_pool needs open_one or open_layout"
        open_layout = functools.partial(_open_n, open_one)
    if workers is not None:
        layout = Layout(workers, threads or (max(1, cores // workers) if on_cpu else 0))
        backends = open_layout(layout)
        spi = None
        if autotune_s > 0:
            rate = measure(backends, min(autotune_s, 1.0))
            spi = layout.workers / rate
        log.info("backend pool: %s (configured)", layout)
        return BackendPool(backends, layout, seconds_per_image=spi)

    if threads:
        # Threads fixed by the config: as many workers as the cores hold; nothing to choose.
        layout = Layout(max(1, min(MAX_AUTO_WORKERS, cores // threads)) if on_cpu else 2, threads)
        log.info("backend pool: %s (from model.threads)", layout)
        return BackendPool(open_layout(layout), layout)
    candidates = candidate_layouts(cores, on_cpu)
    if autotune_s <= 0 or len(candidates) == 1:
        layout = default_layout(cores, on_cpu)
        log.info("backend pool: %s (not measured)", layout)
        return BackendPool(open_layout(layout), layout)

    per = autotune_s / len(candidates)
    best: tuple[float, Layout, list[Backend]] | None = None
    measured: dict[str, float] = {}
    for layout in candidates:
        backends = open_layout(layout)
        try:
            rate = measure(backends, per)
        except BaseException:
            _close(backends)
            if best is not None:
                _close(best[2])
            raise
        measured[str(layout)] = round(rate, 2)
        # Fewer workers win a tie (within 3%): each session holds its own weights.
        if best is None or rate > best[0] * 1.03:
            if best is not None:
                _close(best[2])
            best = (rate, layout, backends)
        else:
            _close(backends)
    assert best is not None
    rate, layout, backends = best
    log.info("backend pool: %s chosen by measurement (%s img/s at batch 1)", layout,
             ", ".join(f"{k}: {v}" for k, v in measured.items()))
    return BackendPool(backends, layout, measured, seconds_per_image=layout.workers / rate)


def _open_n(open_one: Opener, layout: Layout) -> list[Backend]:
    return open_each(layout.workers, lambda: open_one(layout.threads))


def _close(backends: list[Backend]) -> None:
    for b in backends:
        b.close()


def open_pool(path: Path, backend: str | None, *, device: str, threads: int, workers: int | None,
              autotune_s: float, **options: Any) -> BackendPool:
    """Load ``path`` as a pool: the backend its suffix (or ``backend``) selects."""
    from . import backend_for, check_model_file
    check_model_file(Path(path))
    cls = backend_for(Path(path), backend)

    def open_layout(layout: Layout) -> list[Backend]:
        return cls.open_workers(Path(path), layout.workers, device=device, threads=layout.threads,
                                warmup=False, **options)

    return build_pool(None, workers=workers, threads=threads, on_cpu=cls.runs_on_cpu(device),
                      autotune_s=autotune_s, open_layout=open_layout)


def runs_on_cpu(path: Path, backend: str | None, device: str) -> bool:
    """Whether this model would run on the CPU with ``device`` (sized in threads per core)."""
    from . import backend_for
    return backend_for(Path(path), backend).runs_on_cpu(device)
