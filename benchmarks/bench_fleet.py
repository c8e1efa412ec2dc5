#!/usr/bin/env python3
"""Tasks/s through the fleet request queue (Redis Streams) with 1 and 2 daemons, against the
direct ZeroMQ request path of one daemon, on the same box and pictures.

    .venv/bin/python benchmarks/bench_fleet.py [--model M.onnx] [--tasks 200] [--record]

Starts a real redis-server on a free port and the daemons as real processes (no cameras),
warms each path up with a few tasks, then submits ``--tasks`` pictures at once (Ultralytics'
bus.jpg and zidane.jpg in turn) and times the first submission to the last answer. On one
box two daemons share its cores, so they show the queue's overhead and the split, not a
speed-up; on a fleet each daemon brings its own.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench import _free_port, default_model, spawn, stop, stop_all  # noqa: E402 - same model and helpers

from streamd.client.detect import DetectClient, detect_many  # noqa: E402
from streamd.client.redis_detect import FleetClient, detect_many_fleet  # noqa: E402


def start_daemon(tmp: Path, name: str, model: Path, extra: dict[str, Any]) -> subprocess.Popen[bytes]:
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"path": str(model)},
        "scheduler": {"max_batch": 4, "autotune_s": 0},
        "publisher": {"endpoint": f"tcp://127.0.0.1:{_free_port()}", "name": name},
        "metrics": {"enabled": False}, "log": {"level": "warning"}, "cameras": [], **extra}))
    return spawn([sys.executable, "-m", "streamd.cli", "run", "-c", str(cfg)], tmp / f"{name}.log")


def timed(run: Any, pictures: list[Path], warm: list[Path]) -> float:
    """tasks/s of ``run(paths)`` after a warm-up; exits if any picture went unanswered."""
    for paths in (warm, pictures):
        t0 = time.monotonic()
        jobs = run(paths)
        wall = time.monotonic() - t0
        failed = [j.error for j in jobs if j.result is None]
        if failed:
            raise SystemExit(f"{len(failed)} unanswered, e.g. {failed[0]}")
    return len(pictures) / wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    model = (args.model or default_model(args.imgsz)).resolve()
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise SystemExit("redis-server is not installed (tools/setup_system.sh installs it)")
    import ultralytics
    assets = Path(ultralytics.__file__).parent / "assets"
    pictures = [assets / ("bus.jpg" if i % 2 == 0 else "zidane.jpg") for i in range(args.tasks)]
    warm = pictures[:8]
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="streamd-bench-fleet-") as tmp_name:
        tmp = Path(tmp_name)
        port = _free_port()
        url = f"redis://127.0.0.1:{port}/0"
        spawn([redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", tmp_name], tmp / "redis.log")
        daemons: list[subprocess.Popen[bytes]] = []
        try:
            req_ep = f"tcp://127.0.0.1:{_free_port()}"
            daemons.append(start_daemon(tmp, "direct", model, {"requests": {
                "enabled": True, "endpoint": req_ep, "queue_size": args.tasks}}))
            client = DetectClient(req_ep)
            rows.append(("ZeroMQ ROUTER, 1 daemon", timed(lambda p: detect_many(client, p, 300), pictures, warm)))
            client.close()
            stop_daemons(daemons)
            for n in (1, 2):
                stream = f"bench:{n}"
                fleet = {"requests": {"redis": {"url": url, "stream": stream, "max_queued": args.tasks + 16}}}
                daemons += [start_daemon(tmp, f"box-{i}", model, fleet) for i in range(n)]
                fc = FleetClient(url, stream)
                wait_for_consumers(fc, stream, n)
                rows.append((f"Redis stream, {n} daemon{'s' if n > 1 else ''}",
                             timed(lambda p: detect_many_fleet(fc, p, 300), pictures, warm)))
                fc.close()
                stop_daemons(daemons)
        finally:
            stop_all()
    for label, rate in rows:
        print(f"{label:28s} {rate:6.1f} tasks/s", flush=True)
    if args.record:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "?")
        with open(REPO / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(f"\n## Fleet request queue ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} x {cpu}, "
                    f"{model.name}, {args.tasks} tasks)\n\n| path | tasks/s |\n|---|---|\n")
            for label, rate in rows:
                f.write(f"| {label} | {rate:.1f} |\n")
        print("recorded in benchmarks/RESULTS.md")
    return 0


def wait_for_consumers(fc: FleetClient, stream: str, n: int, timeout_s: float = 120) -> None:
    """Until ``n`` daemons joined the group (each lists itself once its model is loaded)."""
    import redis
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if len(fc.redis.xinfo_consumers(stream, "streamd")) >= n:
                return
        except redis.ResponseError:     # no group yet
            pass
        time.sleep(0.2)
    raise SystemExit(f"{n} daemon(s) did not join within {timeout_s:g}s")


def stop_daemons(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each daemon by its PID and wait (a clean stop hands back the tasks it holds)."""
    while procs:
        stop(procs.pop())


if __name__ == "__main__":
    sys.exit(main())
