#!/usr/bin/env python3
"""Backend alone vs the whole daemon, on the same model and batch size.

    make bench                       # defaults below
    .venv/bin/python benchmarks/bench.py --model engines/x.onnx --cameras 8 --seconds 600

(a) the backend alone: ``infer`` on a full letterboxed batch in a tight loop;
(b) the daemon as a real process, fed by N cameras that offer more frames than the model
    can take (paced video files, like real cameras), read by a real SUB socket.
Prints frames/s of both, their ratio, capture->publish latency p50/p99 (first and last
third of the run, to show it does not grow), and the daemon's peak and final memory.
``--record`` appends the row to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streamd.backends import open_backend  # noqa: E402
from streamd.preprocess import letterbox_batch  # noqa: E402
from streamd.subscriber import subscribe  # noqa: E402


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def default_model(imgsz: int) -> Path:
    onnx = REPO / "engines" / f"fall-yolov8s-{imgsz}-b8.onnx"
    if not onnx.is_file():
        pt = load_tool("fetch_sample_model").fetch(REPO / ".cache" / "models" / "fall-yolov8s.pt")
        from streamd_export.cli import main as export_main
        if export_main([str(pt), "--imgsz", str(imgsz), "--batch", "1-8", "--out-dir", str(onnx.parent),
                        "--name", onnx.stem]) != 0:
            raise SystemExit("export failed")
    return onnx


def bench_backend(model: Path, batch: int, seconds: float, image: np.ndarray) -> float:
    with open_backend(model, device="auto") as b:
        h, w = b.info.input_hw
        tensor, _ = letterbox_batch([image] * batch, h, w)
        b.infer(tensor)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            b.infer(tensor)
            n += 1
        return n * batch / (time.perf_counter() - t0)


def rss_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def bench_daemon(model: Path, batch: int, cameras: int, fps: float, seconds: float, warmup: float,
                 clip: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="streamd-bench-") as tmp:
        port = _free_port()
        endpoint = f"tcp://127.0.0.1:{port}"
        cams = "".join(f"  - id: cam{i}\n    url: {clip}\n    loop: true\n    fps: {fps}\n    queue_depth: 2\n"
                       for i in range(cameras))
        cfg = Path(tmp) / "bench.yaml"
        cfg.write_text(f"model:\n  path: {model}\nscheduler:\n  max_batch: {batch}\n  max_wait_ms: 20\n"
                       f"  max_frame_age_ms: 2000\npublisher:\n  endpoint: {endpoint}\n"
                       f"  stats_interval_s: 5\nmetrics:\n  enabled: false\nlog:\n  level: warning\n"
                       f"cameras:\n{cams}")
        proc = subprocess.Popen([sys.executable, "-m", "streamd.cli", "run", "-c", str(cfg)],
                                stdout=open(Path(tmp) / "log", "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            ages: list[tuple[float, float]] = []
            rss_samples: list[tuple[float, int]] = []
            t_begin = time.time() + warmup
            t_end = t_begin + seconds
            last_sample = 0.0
            for _, body in subscribe(endpoint, timeout_s=30):
                now = time.time()
                if now - last_sample > 1.0:
                    rss_samples.append((now, rss_kb(proc.pid, "VmRSS")))
                    last_sample = now
                if body.get("type") == "detections" and body["publish_ts"] >= t_begin:
                    ages.append((body["publish_ts"], body["publish_ts"] - body["capture_ts"]))
                if now >= t_end:
                    break
                if proc.poll() is not None:
                    raise SystemExit(f"daemon exited: {(Path(tmp) / 'log').read_text()[-2000:]}")
            peak = rss_kb(proc.pid, "VmHWM")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if not ages:
            raise SystemExit(f"no detections received; daemon log:\n{(Path(tmp) / 'log').read_text()[-2000:]}")
    lat = sorted(a for _, a in ages)
    third = max(1, len(ages) // 3)
    first, last = sorted(a for _, a in ages[:third]), sorted(a for _, a in ages[-third:])
    after_warm = [r for t, r in rss_samples if t >= t_begin]
    return {
        "fps": len(ages) / seconds,
        "p50_ms": 1000 * lat[len(lat) // 2],
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "p99_first_ms": 1000 * first[min(len(first) - 1, int(len(first) * 0.99))],
        "p99_last_ms": 1000 * last[min(len(last) - 1, int(len(last) * 0.99))],
        "peak_rss_mb": peak / 1024,
        "rss_start_mb": (after_warm[0] if after_warm else 0) / 1024,
        "rss_end_mb": (after_warm[-1] if after_warm else 0) / 1024,
    }


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="ONNX model (default: the sample model exported at --imgsz)")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--cameras", type=int, default=4)
    ap.add_argument("--fps", type=float, default=10, help="frames/s each camera offers")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--warmup", type=float, default=10)
    ap.add_argument("--record", action="store_true", help="append the result to benchmarks/RESULTS.md")
    args = ap.parse_args()

    model = (args.model or default_model(args.imgsz)).resolve()
    media = load_tool("make_test_media").make_media(REPO / ".cache" / "test-media")
    clip = media["bus"].mp4
    image = cv2.imread(str(media["bus"].frame_paths()[0]))

    print(f"model {model.name}, batch {args.batch}, {args.cameras} cameras x {args.fps:g} fps offered, "
          f"{args.seconds:g} s", flush=True)
    backend_fps = bench_backend(model, args.batch, min(args.seconds, 30), image)
    print(f"(a) backend alone: {backend_fps:.1f} frames/s", flush=True)
    d = bench_daemon(model, args.batch, args.cameras, args.fps, args.seconds, args.warmup, clip)
    ratio = d["fps"] / backend_fps
    print(f"(b) whole daemon:  {d['fps']:.1f} frames/s  ({100 * ratio:.0f}% of the backend alone)")
    print(f"    capture->publish latency p50 {d['p50_ms']:.0f} ms, p99 {d['p99_ms']:.0f} ms "
          f"(p99 first third {d['p99_first_ms']:.0f} ms, last third {d['p99_last_ms']:.0f} ms)")
    print(f"    memory: peak RSS {d['peak_rss_mb']:.0f} MB; RSS {d['rss_start_mb']:.0f} MB after warm-up, "
          f"{d['rss_end_mb']:.0f} MB at the end")
    if args.record:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
        head = (f"\n## Backend alone vs the whole daemon ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} x {cpu})\n\n"
                "Made by `benchmarks/bench.py --record`: cameras are looped H.264 files (640x480) paced at "
                "the given rate, each offering frames to the daemon like a live camera.\n\n"
                "| model | batch | cameras x fps offered | seconds | backend alone fps | daemon fps | ratio "
                "| latency p50 / p99 ms | p99 first -> last third ms | peak RSS MB (after warm-up -> end) |\n"
                "|---|---|---|---|---|---|---|---|---|---|\n")
        row = (f"| {model.name} | {args.batch} | {args.cameras} x {args.fps:g} | {args.seconds:g} | "
               f"{backend_fps:.1f} | {d['fps']:.1f} | {100 * ratio:.0f}% | {d['p50_ms']:.0f} / {d['p99_ms']:.0f} | "
               f"{d['p99_first_ms']:.0f} -> {d['p99_last_ms']:.0f} | {d['peak_rss_mb']:.0f} "
               f"({d['rss_start_mb']:.0f} -> {d['rss_end_mb']:.0f}) |\n")
        with open(REPO / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(head + row)
        print("recorded in benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
