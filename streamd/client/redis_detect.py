"""``streamd detect --redis URL IMAGE...``: submit pictures to a fleet of daemons through the
Redis request stream and wait for their answers (format: ``streamd.fleet``, docs/FLEET.md).

Each picture is a task with a task id chosen here; the submit script refuses it ("busy")
when the stream already holds ``max_queued`` unanswered tasks, and it is then submitted
again with capped, jittered exponential backoff. Whichever daemon answers stores the answer
at ``<result_prefix>:<task_id>`` and pushes the task id to this client's own reply list,
which this client pops (``BLPOP``), so it never polls.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from .. import fleet
from .detect import Job


class FleetClient:
    """One submitter: a connection, its own reply list, the submit script."""

    def __init__(self, url: str, stream: str = "streamd:requests", result_prefix: str = "result",
                 client_id: str | None = None, default_max_queued: int = 1000) -> None:
        self.redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self.stream, self.result_prefix, self.client_id = stream, result_prefix, client_id
        self.default_max_queued = default_max_queued
        self.reply_to = f"{result_prefix}:replies:{uuid.uuid4().hex}"
        self._submit = self.redis.register_script(fleet.SUBMIT_SCRIPT)

    def submit(self, data: bytes, request_id: int | str | None = None, task_id: str | None = None,
               priority: int = 0, **thresholds: Any) -> str | None:
        """Add one task; returns its task id, or None when the stream is full ("busy")."""
        task_id = task_id or uuid.uuid4().hex
        header: dict[str, Any] = {"v": 1, "request_id": request_id, "priority": priority}
        if self.client_id:
            header["client_id"] = self.client_id
        header.update({k: v for k, v in thresholds.items() if v is not None})
        entry_id = self._submit(keys=[self.stream, fleet.limit_key(self.stream)],
                                args=[self.default_max_queued, "task_id", task_id, "header", json.dumps(header),
                                      "image", data, "reply_to", self.reply_to])
        return task_id if entry_id is not None else None

    def next_answered(self, timeout_s: float) -> str | None:
        """The id of a task of this client whose answer was stored, or None after ``timeout_s``."""
        got = self.redis.blpop([self.reply_to], timeout=max(0.01, timeout_s))
        return got[1].decode() if got else None

    def answer(self, task_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(fleet.result_key(self.result_prefix, task_id))
        return json.loads(raw) if raw is not None else None

    def close(self) -> None:
        self.redis.delete(self.reply_to)
        self.redis.close()


def detect_many_fleet(client: FleetClient, paths: list[Path], timeout_s: float, priority: int = 0,
                      conf: float | None = None, max_attempts: int = 50) -> list[Job]:
    """Submit every picture (retrying "busy" with backoff) and collect one answer each."""
    jobs = [Job(i, p, p.read_bytes()) for i, p in enumerate(paths)]
    by_task: dict[str, Job] = {}
    waiting = list(jobs)            # not yet taken by the stream
    rng = random.Random()
    deadline = time.monotonic() + timeout_s
    while (waiting or by_task) and time.monotonic() < deadline:
        now = time.monotonic()
        for j in [j for j in waiting if now >= j.next_try]:
            j.attempts += 1
            task_id = client.submit(j.data, request_id=j.index, priority=priority, conf=conf)
            if task_id is not None:
                j.task_id = task_id
                by_task[task_id] = j
                waiting.remove(j)
                continue
            j.busy += 1
            if j.attempts >= max_attempts:
                j.error = f"still busy after {j.attempts} attempts"
                waiting.remove(j)
            else:
                step = min(5.0, 0.1 * 2 ** min(j.busy, 6))
                j.next_try = time.monotonic() + step * (0.5 + 0.5 * rng.random())
        if not by_task:
            time.sleep(min(0.1, max(0.0, min((j.next_try for j in waiting), default=now) - time.monotonic())))
            continue
        wait = 0.2 if waiting else max(0.01, deadline - time.monotonic())
        task_id = client.next_answered(min(wait, 1.0))
        done = by_task.pop(task_id, None) if task_id is not None else None
        if done is None:
            continue
        reply = client.answer(task_id)
        if reply is None:
            done.error = f"the answer to task {task_id} expired before it was read"
        elif reply.get("type") == "result":
            done.result = reply
        else:
            done.error = reply.get("error", "unknown error")
    for j in jobs:
        if j.result is None and j.error is None:
            j.error = f"no answer within {timeout_s:g}s"
    return jobs
