"""``streamd detect IMAGE...``: submit pictures to a running daemon and print the results.

It speaks the request protocol of streamd.service.requests over a DEALER socket: every image is
sent with its index as ``request_id``; ``busy`` answers are retried with capped,
jittered exponential backoff, so a burst of submissions never overruns the daemon.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import zmq

from ..redact import redact_url, scrub


@dataclass
class Job:
    index: int
    path: Path
    data: bytes
    attempts: int = 0
    next_try: float = 0.0
    task_id: str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    busy: int = 0
    sent_at: float = 0.0


@dataclass
class DetectClient:
    endpoint: str
    client_id: str | None = None
    context: zmq.Context | None = None
    sock: zmq.Socket = field(init=False)

    def __post_init__(self) -> None:
        ctx = self.context or zmq.Context.instance()
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.endpoint)

    def submit(self, data: bytes, request_id: int | str, priority: int = 0, **thresholds: Any) -> None:
        header: dict[str, Any] = {"v": 1, "request_id": request_id, "priority": priority}
        if self.client_id:
            header["client_id"] = self.client_id
        header.update({k: v for k, v in thresholds.items() if v is not None})
        self.sock.send_multipart([json.dumps(header).encode(), data])

    def receive(self, timeout_s: float) -> dict[str, Any] | None:
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        return json.loads(self.sock.recv_multipart()[-1])

    def close(self) -> None:
        self.sock.close(0)


def busy_backoff_s(busy: int, rng: random.Random) -> float:
    """How long to wait before submitting again after the ``busy``-th "busy" answer: capped,
    jittered exponential backoff, so many clients turned away together do not return together."""
    step = min(5.0, 0.1 * 2 ** min(busy, 6))
    return step * (0.5 + 0.5 * rng.random())


def detect_many(client: DetectClient, paths: list[Path], timeout_s: float, priority: int = 0,
                conf: float | None = None, max_attempts: int = 50) -> list[Job]:
    jobs = [Job(i, p, p.read_bytes()) for i, p in enumerate(paths)]
    rng = random.Random()
    deadline = time.monotonic() + timeout_s
    open_jobs = {j.index: j for j in jobs}
    while open_jobs and time.monotonic() < deadline:
        now = time.monotonic()
        for j in open_jobs.values():
            if j.task_id is None and j.sent_at <= j.next_try and now >= j.next_try:
                j.attempts += 1
                j.sent_at = now
                client.submit(j.data, j.index, priority=priority, conf=conf)
        reply = client.receive(0.1)
        if reply is None:
            continue
        j = open_jobs.get(reply.get("request_id")) if isinstance(reply.get("request_id"), int) else None
        if j is None:
            continue
        kind = reply.get("type")
        if kind == "accepted":
            j.task_id = reply["task_id"]
        elif kind == "busy":
            j.busy += 1
            if j.attempts >= max_attempts:
                j.error = f"still busy after {j.attempts} attempts"
                open_jobs.pop(j.index)
            else:
                j.next_try = time.monotonic() + busy_backoff_s(j.busy, rng)
        elif kind == "result":
            j.result = reply
            open_jobs.pop(j.index)
        elif kind == "error":
            j.error = reply.get("error", "unknown error")
            open_jobs.pop(j.index)
    for j in open_jobs.values():
        j.error = j.error or f"no answer within {timeout_s:g}s"
    return jobs


def run_detect(paths: list[str], endpoint: str, priority: int, conf: float | None, out_dir: str | None,
               timeout_s: float, as_json: bool, client_id: str | None, out: TextIO = sys.stdout,
               redis_url: str | None = None, stream: str = "streamd:requests", http_url: str | None = None) -> int:
    """``redis_url``: submit through the fleet's Redis stream instead of one daemon's socket;
    ``http_url``: through the daemon's HTTP API (``POST /api/v1/detect``)."""
    files = [Path(p) for p in paths]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        print(f"streamd detect: error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    if redis_url is not None:
        import redis
        try:
            jobs = _detect_through_redis(files, redis_url, stream, client_id, timeout_s, priority, conf)
        except redis.RedisError as exc:
            print(f"streamd detect: error: redis at {redact_url(redis_url)}: {scrub(str(exc))}", file=sys.stderr)
            return 1
    elif http_url is not None:
        from .http_detect import detect_many_http
        jobs = detect_many_http(http_url, files, timeout_s, priority=priority, conf=conf, client_id=client_id)
    else:
        client = DetectClient(endpoint, client_id)
        try:
            jobs = detect_many(client, files, timeout_s, priority=priority, conf=conf)
        finally:
            client.close()
    failed = 0
    for j in jobs:
        if j.result is None:
            failed += 1
            print(json.dumps({"image": str(j.path), "error": j.error}) if as_json
                  else f"{j.path}: ERROR {j.error}", file=out, flush=True)
            continue
        r = j.result
        if as_json:
            print(json.dumps({"image": str(j.path), **r}), file=out, flush=True)
        else:
            dets = " ".join(f"{d['label']}:{d['confidence']:.2f}@{','.join(str(int(v)) for v in d['box'])}"
                            for d in r["detections"]) or "-"
            t = r["timings_ms"]
            print(f"{j.path}: {r['width']}x{r['height']} n={len(r['detections'])} {dets} "
                  f"(queue {t['queue']:.0f} ms, infer {t['infer']:.0f} ms, total {t['total']:.0f} ms"
                  + (f", {j.busy} busy" if j.busy else "") + ")", file=out, flush=True)
        if out_dir:
            _write_annotated(j, Path(out_dir))
    return 1 if failed else 0


def _detect_through_redis(files: list[Path], url: str, stream: str, client_id: str | None, timeout_s: float,
                          priority: int, conf: float | None) -> list[Job]:
    from .redis_detect import FleetClient, detect_many_fleet   # redis-py is optional: only for --redis
    fleet = FleetClient(url, stream, client_id=client_id)
    try:
        return detect_many_fleet(fleet, files, timeout_s, priority=priority, conf=conf)
    finally:
        fleet.close()


def _write_annotated(job: Job, folder: Path) -> None:
    import cv2
    import numpy as np

    from ..annotate import draw
    img = cv2.imdecode(np.frombuffer(job.data, np.uint8), cv2.IMREAD_COLOR)
    assert job.result is not None
    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / f"{job.path.stem}.jpg"),
                draw(img, job.result["detections"], f"{job.path.name}: {len(job.result['detections'])} detections"))
