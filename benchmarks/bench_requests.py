#!/usr/bin/env python3
"""On-demand request throughput and latency, with and without camera load.

    .venv/bin/python benchmarks/bench_requests.py [--requests 60] [--clients 4] [--record]

Runs the daemon as a real process with the request endpoint on, then has N DEALER clients
submit pictures (Ultralytics' bus.jpg and zidane.jpg) as fast as the daemon accepts them
(retrying on busy), once with no cameras and once with cameras offering more frames than
the model can take. Prints results/s and client-side latency (send -> result) p50/p99.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench import _free_port, default_model, load_tool  # noqa: E402 - same model and tools as bench.py


def client_run(endpoint: str, images: list[bytes], n: int, lat: list[float], busy: list[int],
               limit_s: float = 600) -> None:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    sent: dict[int, float] = {}
    done = 0
    i = 0
    in_flight = 0
    deadline = time.monotonic() + limit_s
    while done < n and time.monotonic() < deadline:
        while i < n and in_flight < 4:          # a few outstanding per client, like a real service
            sent[i] = time.monotonic()
            s.send_multipart([json.dumps({"request_id": i}).encode(), images[i % len(images)]])
            i += 1
            in_flight += 1
        if not s.poll(1000):
            continue
        r = json.loads(s.recv_multipart()[-1])
        rid = r.get("request_id")
        if r["type"] == "busy":
            busy[0] += 1
            time.sleep(0.05)     # back off, then send the same request again
            sent[rid] = time.monotonic()
            s.send_multipart([json.dumps({"request_id": rid}).encode(), images[rid % len(images)]])
        elif r["type"] in ("result", "error"):
            lat.append(time.monotonic() - sent[rid])
            done += 1
            in_flight -= 1
    s.close(0)


def daemon_config(model: Path, req_ep: str, cameras: list[dict[str, object]], **more: object) -> dict[str, object]:
    """The daemon under test: the ZeroMQ request door on ``req_ep``, ``more`` sections added."""
    return {"model": {"path": str(model)}, "scheduler": {"max_batch": 4},
            "publisher": {"endpoint": f"tcp://127.0.0.1:{_free_port()}"},
            "requests": {"enabled": True, "endpoint": req_ep, "queue_size": 16},
            "log": {"level": "warning"}, "cameras": cameras, **more}


def run(model: Path, cameras: int, clip: Path, n_req: int, clients: int, images: list[bytes]) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="streamd-bench-req-") as tmp:
        req_ep = f"tcp://127.0.0.1:{_free_port()}"
        cfg = Path(tmp) / "c.yaml"
        cfg.write_text(yaml.safe_dump(daemon_config(
            model, req_ep, [{"id": f"cam{i}", "url": str(clip), "loop": True, "fps": 10} for i in range(cameras)],
            metrics={"enabled": False})))
        proc = subprocess.Popen([sys.executable, "-m", "streamd.cli", "run", "-c", str(cfg)],
                                stdout=open(Path(tmp) / "log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
        try:
            warm: list[float] = []
            client_run(req_ep, images, 2, warm, [0], limit_s=60)
            if len(warm) < 2:
                raise SystemExit(f"the daemon did not answer: {(Path(tmp) / 'log').read_text()[-1500:]}")
            time.sleep(3 if cameras else 0)          # let the cameras fill their queues
            lat: list[float] = []
            busy = [0]
            per = n_req // clients
            t0 = time.monotonic()
            threads = [threading.Thread(target=client_run, args=(req_ep, images, per, lat, busy)) for _ in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.monotonic() - t0
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    return summarize(lat, wall, busy[0])


def summarize(lat: list[float], wall: float, busy: int) -> dict[str, float]:
    """results/s over ``wall`` seconds and the latencies' p50/p99 in ms."""
    lat = sorted(lat)
    return {"rps": len(lat) / wall, "p50": 1000 * lat[len(lat) // 2],
            "p99": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))], "busy": busy, "n": len(lat)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--cameras", type=int, default=2)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    model = (args.model or default_model(args.imgsz)).resolve()
    clip = load_tool("make_test_media").make_media(REPO / ".cache" / "test-media")["bus"].mp4
    import ultralytics
    assets = Path(ultralytics.__file__).parent / "assets"
    images = [(assets / "bus.jpg").read_bytes(), (assets / "zidane.jpg").read_bytes()]
    rows = []
    for cams in (0, args.cameras):
        r = run(model, cams, clip, args.requests, args.clients, images)
        label = "no cameras" if cams == 0 else f"{cams} cameras x 10 fps"
        print(f"{label:20s} {r['rps']:.1f} results/s, latency p50 {r['p50']:.0f} ms p99 {r['p99']:.0f} ms, "
              f"{r['busy']} busy answers, {r['n']} requests", flush=True)
        rows.append((label, r))
    if args.record:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "?")
        with open(REPO / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(f"\n## On-demand requests ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} x {cpu}, "
                    f"{model.name}, {args.clients} clients, {args.requests} requests)\n\n"
                    "| load | results/s | latency p50 ms | latency p99 ms | busy answers |\n|---|---|---|---|---|\n")
            for label, r in rows:
                f.write(f"| {label} | {r['rps']:.1f} | {r['p50']:.0f} | {r['p99']:.0f} | {r['busy']} |\n")
        print("recorded in benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
