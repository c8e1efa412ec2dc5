#!/usr/bin/env python3
"""On-demand requests through the HTTP door vs the ZeroMQ door, at the same load.

    .venv/bin/python benchmarks/bench_http.py [--requests 120] [--clients 4] [--rounds 5]

One daemon process with both doors on (they share one request queue) and no cameras. The
same pictures (Ultralytics' bus.jpg and zidane.jpg) go through each door in turn, from
``--clients`` clients keeping 4 requests in flight each: ZeroMQ DEALER clients (as in
bench_requests.py), and for HTTP the same number of in-flight requests as threads that each
POST /api/v1/detect and long-poll the task (urllib, like ``streamd detect --http``). A busy
answer (ZeroMQ ``busy``, HTTP 429) is retried after 50 ms in both. The doors alternate for
``--rounds`` rounds so a drift in the machine's load hits both. Prints results/s and
client-side latency (submit -> result) p50/p99 per door and round, and their medians.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench import _free_port, default_model  # noqa: E402 - same model as bench.py
from bench_requests import client_run, daemon_config, summarize  # noqa: E402 - the ZeroMQ side, as measured there

IN_FLIGHT = 4      # per client, as bench_requests.client_run keeps


def http_worker(url: str, images: list[bytes], n: int, lat: list[float], busy: list[int], first: int) -> None:
    """``n`` requests one after another: POST, then long-poll the task to its end."""
    for i in range(first, first + n):
        t0 = time.monotonic()
        while True:
            req = urllib.request.Request(f"{url}/api/v1/detect", data=images[i % len(images)],
                                         headers={"Content-Type": "image/jpeg"}, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    location = json.loads(r.read())["location"]
                break
            except urllib.error.HTTPError as exc:
                exc.close()
                if exc.code != 429:
                    raise
                busy[0] += 1
                time.sleep(0.05)        # back off, then send the same picture again
                t0 = time.monotonic()   # latency counts from the accepted send, as on the ZeroMQ side
        while True:
            with urllib.request.urlopen(f"{url}{location}?wait=30", timeout=60) as r:
                if json.loads(r.read())["status"] in ("done", "failed"):
                    break
        lat.append(time.monotonic() - t0)


def measure(door: str, ep: str, url: str, images: list[bytes], n_req: int, clients: int) -> dict[str, float]:
    lat: list[float] = []
    busy = [0]
    if door == "zeromq":
        per = n_req // clients
        threads = [threading.Thread(target=client_run, args=(ep, images, per, lat, busy)) for _ in range(clients)]
    else:
        workers = clients * IN_FLIGHT
        counts = [n_req // workers + (w < n_req % workers) for w in range(workers)]
        threads = [threading.Thread(target=http_worker, args=(url, images, c, lat, busy, sum(counts[:w])))
                   for w, c in enumerate(counts)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(lat, time.monotonic() - t0, busy[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--requests", type=int, default=120, help="per door and round")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    model = (args.model or default_model(args.imgsz)).resolve()
    import ultralytics
    assets = Path(ultralytics.__file__).parent / "assets"
    images = [(assets / "bus.jpg").read_bytes(), (assets / "zidane.jpg").read_bytes()]
    with tempfile.TemporaryDirectory(prefix="streamd-bench-http-") as tmp:
        ep, port = f"tcp://127.0.0.1:{_free_port()}", _free_port()
        cfg = Path(tmp) / "c.yaml"
        cfg.write_text(yaml.safe_dump(daemon_config(model, ep, [], http={"port": port})))
        log = Path(tmp) / "log"
        proc = subprocess.Popen([sys.executable, "-m", "streamd.cli", "run", "-c", str(cfg)],
                                stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            warm: list[float] = []
            client_run(ep, images, 2, warm, [0], limit_s=60)
            if len(warm) < 2:
                raise SystemExit(f"the daemon did not answer: {log.read_text()[-1500:]}")
            http_worker(url, images, 2, warm, [0], 0)
            rows: dict[str, list[dict[str, float]]] = {"zeromq": [], "http": []}
            for _ in range(args.rounds):
                for door in rows:
                    r = measure(door, ep, url, images, args.requests, args.clients)
                    rows[door].append(r)
                    print(f"{door:7s} {r['rps']:.1f} results/s, latency p50 {r['p50']:.0f} ms "
                          f"p99 {r['p99']:.0f} ms, {r['busy']} busy answers, {r['n']} requests", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    # Medians over the rounds: on a shared machine one round can be slowed by other work.
    med = {door: {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p99")} for door, rs in rows.items()}
    for door, m in med.items():
        print(f"median  {door:7s} {m['rps']:.1f} results/s, latency p50 {m['p50']:.0f} ms p99 {m['p99']:.0f} ms")
    print(f"HTTP / ZeroMQ throughput (medians): {med['http']['rps'] / med['zeromq']['rps']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
