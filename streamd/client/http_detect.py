"""``streamd detect --http URL IMAGE...``: submit pictures through the daemon's HTTP API
(``POST /api/v1/detect``, then ``GET /api/v1/tasks/{id}?wait=``; docs/HTTP.md).

The standard library's urllib, one request at a time: the daemon answers a submission at once
(202 with the task's location, or 429 "busy" with ``Retry-After``), so a single thread keeps
every picture in flight. A 429 is retried after the longer of ``Retry-After`` and the same
capped, jittered backoff as the ZeroMQ path. The answers are turned into the ZeroMQ result's
shape, so both print the same lines. With ``STREAMD_HTTP_TOKEN`` set, it is sent as the bearer
token (in the environment rather than on the command line, where ``ps`` would show it).
"""

from __future__ import annotations

import json
import os
import random
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from .detect import Job, busy_backoff_s

TOKEN_ENV = "STREAMD_HTTP_TOKEN"
POLL_S = 10.0       # one long poll at most (the daemon caps it at http.max_wait_s anyway)


def _content_type(path: Path) -> str:
    return "image/png" if path.suffix.lower() == ".png" else "image/jpeg"


class HttpDetectClient:
    def __init__(self, base_url: str, token: str | None = None) -> None:
        self.base = base_url.rstrip("/")
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}

    def call(self, path: str, data: bytes | None = None, ctype: str | None = None,
             timeout_s: float = 30.0) -> tuple[int, dict[str, str], dict[str, Any]]:
        """Status, headers and JSON body; an HTTP error status is an answer here, not an exception."""
        headers = dict(self._auth, **({"Content-Type": ctype} if ctype else {}))
        req = urllib.request.Request(self.base + path, data=data, headers=headers,
                                     method="POST" if data is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                return r.status, dict(r.headers), json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as exc:
            with exc:
                raw = exc.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = {"error": raw.decode("utf-8", "replace").strip() or exc.reason}
            return exc.code, dict(exc.headers), body

    def submit(self, job: Job, priority: int, conf: float | None, client_id: str | None) -> tuple[int, dict[str, str],
                                                                                                 dict[str, Any]]:
        query = {"priority": priority, "request_id": job.index}
        if conf is not None:
            query["conf"] = conf
        if client_id:
            query["client_id"] = client_id
        return self.call(f"/api/v1/detect?{urlencode(query)}", job.data, _content_type(job.path))


def as_result(task: dict[str, Any]) -> dict[str, Any]:
    """A finished HTTP task in the shape of the ZeroMQ door's result message."""
    t = task["timings_ms"]
    return {"type": "result", "task_id": task["task_id"], "request_id": task.get("request_id"),
            "client_id": task.get("client_id"), "width": task["width"], "height": task["height"],
            "detections": task["detections"],
            "timings_ms": {"queue": t["queue"], "infer": t["inference"], "total": t["total"]}}


def detect_many_http(base_url: str, paths: list[Path], timeout_s: float, priority: int = 0,
                     conf: float | None = None, client_id: str | None = None, max_attempts: int = 50,
                     token: str | None = None) -> list[Job]:
    client = HttpDetectClient(base_url, token if token is not None else os.environ.get(TOKEN_ENV) or None)
    jobs = [Job(i, p, p.read_bytes()) for i, p in enumerate(paths)]
    waiting = list(jobs)                 # not yet accepted
    accepted: list[Job] = []
    rng = random.Random()
    deadline = time.monotonic() + timeout_s
    try:
        while (waiting or accepted) and time.monotonic() < deadline:
            for j in [j for j in waiting if time.monotonic() >= j.next_try]:
                _submit(client, j, waiting, accepted, priority, conf, client_id, max_attempts, rng)
            if accepted:
                # Short polls while pictures still wait to be resubmitted, long ones after.
                wait = 0.2 if waiting else min(POLL_S, max(0.0, deadline - time.monotonic()))
                _poll(client, accepted[0], accepted, wait)
            elif waiting:
                time.sleep(max(0.0, min(0.1, min(j.next_try for j in waiting) - time.monotonic())))
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        for j in waiting + accepted:
            j.error = f"HTTP API at {client.base}: {reason}"
    for j in jobs:
        if j.result is None and j.error is None:
            j.error = f"no answer within {timeout_s:g}s"
    return jobs


def _submit(client: HttpDetectClient, j: Job, waiting: list[Job], accepted: list[Job], priority: int,
            conf: float | None, client_id: str | None, max_attempts: int, rng: random.Random) -> None:
    j.attempts += 1
    code, headers, body = client.submit(j, priority, conf, client_id)
    if code == 202:
        j.task_id = body["task_id"]
        waiting.remove(j)
        accepted.append(j)
    elif code == 429:
        j.busy += 1
        if j.attempts >= max_attempts:
            j.error = f"still busy after {j.attempts} attempts"
            waiting.remove(j)
            return
        try:
            retry_after = float(headers.get("Retry-After", 0))
        except ValueError:       # an HTTP date: fall back on the backoff alone
            retry_after = 0.0
        j.next_try = time.monotonic() + max(retry_after, busy_backoff_s(j.busy, rng))
    else:
        j.error = f"HTTP {code}: {body.get('error', 'no reason given')}"
        waiting.remove(j)


def _poll(client: HttpDetectClient, j: Job, accepted: list[Job], wait: float) -> None:
    code, _, task = client.call(f"/api/v1/tasks/{j.task_id}?wait={wait:.1f}", timeout_s=wait + 30)
    status = task.get("status")
    if code != 200:
        j.error = f"HTTP {code}: {task.get('error', 'no reason given')}"
    elif status == "done":
        j.result = as_result(task)
    elif status == "failed":
        j.error = task.get("error", "failed")
    elif status == "expired":
        j.error = f"the answer to task {j.task_id} expired before it was read"
    else:
        accepted.append(accepted.pop(0))         # still pending: the next one gets its turn
        return
    accepted.remove(j)
