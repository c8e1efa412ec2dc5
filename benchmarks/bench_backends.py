"""``bench.py --backends``: the backends side by side on the same model and cameras.

For every image size and model (the default any-H x W FP32 export; ``--int8 PATH ...`` adds
INT8 models, e.g. both flavours), in one run on the same box:

1. each runtime's own fastest loop on random input at imgsz x imgsz, the reference a backend
   is held to: ONNX Runtime's N sessions x T threads (bench.py's raw layouts); OpenVINO's
   benchmark_app-style loop (THROUGHPUT hint, an AsyncInferQueue of its optimal number of
   requests, static 1 x 3 x S x S, FP32 inference precision as streamd runs FP32 models, and
   BF16 as ``model.openvino_bf16`` runs them);
2. streamd's backend alone: its pool opened and measured the way the daemon does at start
   (``open_pool`` with autotune), the best layout's img/s at batch 1;
3. the daemon on that backend (``model.backend`` named, everything else default) on the
   live RTSP cameras: frames/s published, latency p50/p99, oldest published.
"""

from __future__ import annotations

import argparse
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import bench as B   # bench.py, registered under this name by its main()
from streamd.backends.choice import backend_options
from streamd.backends.pool import open_pool

# (label, model.backend, model.openvino_bf16)
BACKENDS = (("onnxruntime", "onnxruntime", False), ("openvino", "openvino", False),
            ("openvino bf16", "openvino", True))


def openvino_reference(model: Path, imgsz: int, seconds: float, bf16: bool) -> float:
    """benchmark_app's loop: THROUGHPUT hint, its optimal number of requests kept busy."""
    import openvino as ov
    core = ov.Core()
    m = core.read_model(str(model))
    m.reshape([1, 3, imgsz, imgsz])
    cm = core.compile_model(m, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT",
                                       "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"})
    n = int(cm.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    queue = ov.AsyncInferQueue(cm, n)
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    done = [0]
    lock = threading.Lock()

    def count(*_: object) -> None:
        with lock:
            done[0] += 1

    queue.set_callback(count)
    for _ in range(n):                       # first runs allocate: not counted
        queue.start_async({0: x})
    queue.wait_all()
    done[0] = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        queue.start_async({0: x})            # blocks while every request is busy
    queue.wait_all()
    return done[0] / (time.monotonic() - t0)


def backend_alone(model: Path, backend: str, bf16: bool, seconds: float) -> tuple[float, str]:
    """streamd's pool of ``backend``, measured as the daemon measures it at start."""
    opts = backend_options(backend, rebuild=False, cache_dir=model.parent / ".streamd-cache", verify_sha256=True,
                           bf16=bf16)
    pool = open_pool(model, backend, device="cpu", threads=0, workers=None, autotune_s=seconds, **opts)
    try:
        return max(pool.measured.values()), str(pool.layout)
    finally:
        pool.close()


@dataclass
class BackendRow:
    size: int
    model: str
    backend: str
    cameras: int
    reference: float
    alone: float
    layout: str
    daemon: B.DaemonResult | str


def table(rows: list[BackendRow]) -> str:
    out = ["| imgsz | model | backend | runtime's own loop img/s | backend alone img/s (layout) | alone/own "
           "| cameras | daemon fps | daemon/alone | p50 / p99 ms | max age ms |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r.daemon
        if isinstance(d, str):
            cells = f"{d} | - | - | -"
        else:
            cells = (f"{d.fps:.1f} | {d.fps / r.alone:.2f} | {d.p50_ms:.0f} / {d.p99_ms:.0f} | "
                     f"{d.max_age_ms:.0f}")
        out.append(f"| {r.size} | {r.model} | {r.backend} | {r.reference:.1f} | {r.alone:.1f} ({r.layout}) | "
                   f"{r.alone / r.reference:.2f} | {r.cameras} | {cells} |")
    return "\n".join(out)


def run_backends(args: argparse.Namespace, workdir: Path) -> int:
    pt = args.model_pt.resolve() if args.model_pt else B.DEFAULT_PT
    if args.onnx is None and not args.model_pt:
        pt = B.sample_weights()
    n_cores = B.cores()
    print(f"{n_cores} x {B.cpu_model()}; backends {', '.join(b[0] for b in BACKENDS)}; sizes {args.sizes}; cameras "
          f"{args.cameras} x {args.fps:g} fps; {args.seconds:g} s per daemon run after {args.warmup:g} s",
          flush=True)
    rows: list[BackendRow] = []
    cams = B.Cameras(max(args.cameras), args.fps, workdir).start()
    try:
        for size in args.sizes:
            fp32 = args.onnx.resolve() if args.onnx else B.streamd_model(pt, size, square=False)
            models = [fp32] + [p.resolve() for p in args.int8 or []]
            for model in models:
                for label, backend, bf16 in BACKENDS:
                    if bf16 and model != fp32:
                        # model.openvino_bf16 applies to FP32 models only: an INT8 file's float
                        # parts run in FP32 as its export verified them, so this row would repeat
                        # the one above against a BF16 reference loop it does not run.
                        continue
                    # The runtime's own loop right before streamd's backend alone: on a shared
                    # box the pair then sees the same load.
                    own = B.bench_raw(model, size, args.raw_seconds).fastest if backend == "onnxruntime" \
                        else openvino_reference(model, size, args.raw_seconds, bf16)
                    print(f"  {label}'s own loop: {own:.2f} img/s", flush=True)
                    alone, layout = backend_alone(model, backend, bf16, 2 * args.raw_seconds)
                    print(f"  streamd {label} alone: {alone:.2f} img/s ({layout})", flush=True)
                    for n in args.cameras:
                        time.sleep(B.SETTLE_S)
                        print(f"streamd on {label} ({model.name}), imgsz {size}, {n} cameras ...", flush=True)
                        options = {"backend": backend, **({"openvino_bf16": True} if bf16 else {})}
                        try:
                            d: B.DaemonResult | str = B.bench_streamd(
                                model, cams.urls(n), args.warmup, args.seconds, workdir,
                                f"{label.replace(' ', '-')}-{size}-{n}-{model.stem}", model_options=options)
                            print(B._detail(f"streamd on {label}", d, n * args.fps), flush=True)
                        except RuntimeError as exc:
                            d = "failed"
                            print(f"  streamd on {label} failed: {exc}", flush=True)
                        rows.append(BackendRow(size, model.name, label, n, own, alone, layout, d))
    finally:
        cams.close()
    out = table(rows)
    print()
    print(out)
    if args.record:
        B.record(f"\n## Backends side by side ({time.strftime('%Y-%m-%d')}, {n_cores} x {B.cpu_model()})\n\n"
                 f"Made by `benchmarks/bench.py --backends --record`: {args.seconds:g} s per daemon run after "
                 f"a {args.warmup:g} s warm-up, live RTSP cameras 640x480 H.264 at {args.fps:g} frames/s each, "
                 f"weights `{pt.name}`. Own loop: ONNX Runtime's fastest sessions x threads layout, "
                 f"OpenVINO's benchmark_app-style AsyncInferQueue (THROUGHPUT hint, FP32 or BF16 inference "
                 f"precision as the row says); "
                 f"alone: streamd's pool of that backend, best layout, batch 1; daemon: `streamd run` with "
                 f"`model.backend` named, scheduler defaults.\n\n{out}\n")
    return 0
