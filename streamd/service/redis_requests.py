"""The Redis front door: on-demand pictures from a stream that a fleet of daemons shares.

Every daemon with ``requests.redis`` set joins one consumer group on the request stream
(format: ``streamd.fleet``, docs/FLEET.md). Two threads, each with its own connection:

- the *puller* reads new tasks (``XREADGROUP``) only while this daemon holds fewer than
  ``prefetch`` unanswered tasks and the ``RequestQueue`` has room, so a faster box takes
  more; it renews the lease of the tasks it holds and takes over (``XAUTOCLAIM``) tasks
  another consumer has held longer than ``reclaim_idle_s`` without renewing (its daemon died);
- the *answerer* stores each answer at ``<result_prefix>:<task_id>`` with a TTL, only if
  none is stored yet, then acknowledges and deletes the entry, in one script. A task is thus
  answered exactly once from the submitter's view even when it was inferred twice.

The pipeline side is the same as the ZeroMQ door's: ``Request`` records into the shared
``RequestQueue``; the output stage answers through ``answer``/``fail`` (the
``ReplyChannel``). Neither is ever kept waiting by Redis: they hand the answer to a queue.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import cv2
import numpy as np
import redis
from prometheus_client import Counter
from prometheus_client.core import Metric
from pydantic import ValidationError

from .. import fleet
from ..config import CAMERA_ID, RedisRequestsConfig, RequestsConfig
from ..entities import Request, RequestResult
from ..pipeline.postprocess import PostprocessParams
from ..pipeline.requests import RequestQueue
from ..redact import redact_url, scrub
from .requests import PROTOCOL_VERSION, RequestHeader, request_params

log = logging.getLogger("streamd.requests.redis")

DELIVERIES = b"\0deliveries"   # set on a reclaimed entry's fields here; no field a submitter can send
PRUNE_EVERY_S = 300.0   # how often stopped daemons' names are removed from the group
BLOCK_MS = 200          # one XREADGROUP waits this long for new tasks; the stop is seen as often
TIMEOUT_S = 5.0         # socket timeout of every other command


@dataclass
class Held:
    """A task this daemon read from the stream and has not answered yet."""
    entry_id: str
    reply_to: str                 # list key to push the task id to, or ""
    answered: bool = False


class FleetMetrics:
    """Counts by outcome; a collector for the daemon's metrics registry."""

    def __init__(self) -> None:
        self.outcomes = Counter("streamd_fleet_requests_total",
                                "Redis stream tasks by outcome (pulled, reclaimed, completed, failed, rejected, "
                                "duplicate: answered by another daemon first, handed_back: returned at a stop).",
                                ["outcome"], registry=None)

    def inc(self, outcome: str, n: int = 1) -> None:
        self.outcomes.labels(outcome=outcome).inc(n)

    def counts(self) -> dict[str, int]:
        return {s.labels["outcome"]: int(s.value) for fam in self.outcomes.collect() for s in fam.samples
                if s.name == "streamd_fleet_requests_total"}

    def collect(self) -> list[Metric]:
        return list(self.outcomes.collect())

    def describe(self) -> list[Metric]:
        return list(self.outcomes.describe())


class RedisRequestDoor:
    def __init__(self, cfg: RedisRequestsConfig, requests_cfg: RequestsConfig, requests: RequestQueue,
                 names: dict[int, str], default_params: Callable[[], PostprocessParams], origin: str,
                 prefetch: int) -> None:
        self.cfg, self.requests_cfg, self.queue = cfg, requests_cfg, requests
        self.consumer = cfg.consumer or f"{origin}-{os.getpid()}"
        self.prefetch = cfg.prefetch or prefetch
        self.metrics = FleetMetrics()
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self._names, self._default_params = names, default_params
        self._password = cfg.read_password()
        self._held: dict[str, Held] = {}            # task id -> held; guarded by _lock
        self._lock = threading.Lock()
        self._room = threading.Event()              # set when an answer frees a slot
        self._outbox: queue.Queue[tuple[str, str, dict[str, Any] | None]] = queue.Queue()
        self._pulling = True
        self._cursor = "0-0"                        # XAUTOCLAIM's position in the pending list
        self._threads = [threading.Thread(target=self._guarded, args=(self._pull_loop,), name="requests-redis-pull",
                                          daemon=True),
                         threading.Thread(target=self._guarded, args=(self._answer_loop,),
                                          name="requests-redis-answer", daemon=True)]

    # ---- the ReplyChannel (called from the output stage and the request timeouts) ----------------
    def answer(self, result: RequestResult, body: dict[str, Any]) -> bool:
        if not self._mark_answered(result.request.task_id):
            return False
        self._outbox.put(("answer", result.request.task_id, body))
        return True

    def fail(self, request: Request, reason: str) -> None:
        if not self._mark_answered(request.task_id):
            return
        if not self._pulling:
            # Stopping: the task is not this daemon's to fail; another daemon of the fleet takes it.
            self._outbox.put(("hand_back", request.task_id, None))
            return
        self._outbox.put(("answer", request.task_id, {"type": "error", "task_id": request.task_id,
                                                      "request_id": request.request_id, "error": reason}))

    def _mark_answered(self, task_id: str) -> bool:
        with self._lock:
            held = self._held.get(task_id)
            if held is None or held.answered:
                return False
            held.answered = True
            return True

    # ---- lifecycle (the daemon's) -----------------------------------------------------------------
    @property
    def threads(self) -> list[threading.Thread]:
        return list(self._threads)

    def start(self) -> None:
        for t in self._threads:
            t.start()
        log.info("taking requests from redis", extra={"url": redact_url(self.cfg.url), "stream": self.cfg.stream,
                                                      "group": self.cfg.group, "consumer": self.consumer,
                                                      "prefetch": self.prefetch})

    def stop_accepting(self) -> None:
        """No more tasks are read; what is failed from now on is handed back to the fleet."""
        self._pulling = False

    def close(self, timeout: float) -> None:
        """After the pipeline stopped: hand back what is held but unanswered, store the
        answers still queued, and stop both threads within ``timeout``."""
        self._pulling = False
        for req in self.queue.drain():
            req.reply_to.fail(req, "the daemon is shutting down")
        with self._lock:
            left = [tid for tid, h in self._held.items() if not h.answered]
        for tid in left:
            if self._mark_answered(tid):
                self._outbox.put(("hand_back", tid, None))
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
        with self._lock:
            unsaid = len(self._held)
        counts = self.metrics.counts()
        log.info("redis requests stopped", extra={"answered": counts.get("completed", 0) + counts.get("failed", 0),
                                                  "handed_back": counts.get("handed_back", 0),
                                                  "left_to_reclaim": unsaid})

    # ---- shared by both threads -------------------------------------------------------------------
    def _guarded(self, loop: Callable[[redis.Redis], None]) -> None:
        """Runs ``loop`` on a fresh connection; while Redis is away or refuses (a wrong password,
        the stream key holding another type) it says so once and retries with capped backoff,
        so the cameras keep running. Anything else is a bug: recorded for the supervisor."""
        attempts, warned = 0, False
        try:
            while not self._finished():
                conn = redis.Redis.from_url(self.cfg.url, socket_timeout=TIMEOUT_S + BLOCK_MS / 1000,
                                            socket_connect_timeout=TIMEOUT_S,
                                            **({"username": self.cfg.username} if self.cfg.username else {}),
                                            **({"password": self._password} if self._password is not None else {}))
                try:
                    self._setup(conn)
                    if warned:
                        log.info("redis requests: connected again", extra={"url": redact_url(self.cfg.url)})
                    attempts, warned = 0, False
                    loop(conn)
                except redis.RedisError as exc:
                    if self.stop_event.is_set():
                        # Stopping with Redis away: what is left stays pending there, and the
                        # other daemons take it over after reclaim_idle_s.
                        log.warning("redis requests: stopping without redis; unanswered tasks are left to "
                                    "the fleet", extra={"reason": scrub(str(exc))})
                        return
                    if not warned:
                        log.warning("redis requests: not working; retrying", extra={
                            "url": redact_url(self.cfg.url), "error": type(exc).__name__, "reason": scrub(str(exc))})
                        warned = True
                    delay = min(self.cfg.backoff_max_s, self.cfg.backoff_initial_s * 2 ** min(attempts, 16))
                    attempts += 1
                    self.stop_event.wait(delay)
                finally:
                    conn.close()
        except BaseException as exc:  # noqa: BLE001 - recorded for the supervisor
            self.error = exc
            log.exception("redis request front door failed")

    def _setup(self, conn: redis.Redis) -> None:
        try:
            # From id 0: tasks submitted before any daemon started are served too (answered
            # entries are deleted, so 0 never means old work).
            conn.xgroup_create(self.cfg.stream, self.cfg.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        # Listed in XINFO CONSUMERS from the start, not only once it was handed a task.
        conn.xgroup_createconsumer(self.cfg.stream, self.cfg.group, self.consumer)
        conn.set(fleet.limit_key(self.cfg.stream), self.cfg.max_queued)

    def _finished(self) -> bool:
        return self.stop_event.is_set() and (threading.current_thread() is self._threads[0]
                                             or self._outbox.empty())

    # ---- the puller -------------------------------------------------------------------------------
    def _pull_loop(self, conn: redis.Redis) -> None:
        renew = conn.register_script(fleet.RENEW_SCRIPT)
        prune = conn.register_script(fleet.PRUNE_SCRIPT)
        every = min(10.0, max(0.25, self.cfg.reclaim_idle_s / 4))
        next_renew = next_reclaim = next_expiry = 0.0
        next_prune = time.monotonic() + PRUNE_EVERY_S
        while not self.stop_event.is_set():
            now = time.monotonic()
            if now >= next_expiry:
                next_expiry = now + 0.5
                # The ZeroMQ door does this too when it runs; whoever comes first answers.
                for req in self.queue.take_expired(now - self.requests_cfg.timeout_s):
                    req.reply_to.fail(req, f"not processed within {self.requests_cfg.timeout_s:g}s "
                                           "(the model is overloaded)")
            if now >= next_renew:
                next_renew = now + every
                with self._lock:
                    ids = [h.entry_id for h in self._held.values()]
                if ids:
                    renew(keys=[self.cfg.stream], args=[self.cfg.group, self.consumer, *ids], client=conn)
            room = self._room_left() if self._pulling else 0
            if room > 0 and now >= next_reclaim:
                next_reclaim = now + every
                room -= self._reclaim(conn, room)
            if now >= next_prune:
                next_prune = now + PRUNE_EVERY_S
                prune(keys=[self.cfg.stream], args=[self.cfg.group, int(self._prune_idle_s() * 1000), self.consumer],
                      client=conn)
            if room <= 0:
                self._room.wait(0.1)
                self._room.clear()
                continue
            got = conn.xreadgroup(self.cfg.group, self.consumer, {self.cfg.stream: ">"}, count=room, block=BLOCK_MS)
            for _, entries in got or ():
                self._take(entries, "pulled")

    def _prune_idle_s(self) -> float:
        # Well past any reclaim: a name idle this long and holding nothing belongs to no running daemon.
        return max(3600.0, 10 * self.cfg.reclaim_idle_s)

    def _room_left(self) -> int:
        with self._lock:
            held = len(self._held)
        return min(self.prefetch - held, self.queue.size - len(self.queue))

    def _reclaim(self, conn: redis.Redis, room: int) -> int:
        """Take over tasks of consumers that stopped renewing them; returns how many."""
        reply = conn.xautoclaim(self.cfg.stream, self.cfg.group, self.consumer,
                                int(self.cfg.reclaim_idle_s * 1000), self._cursor, count=room)
        # The cursor walks the pending list across calls; "0-0" means it went round.
        self._cursor = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        deleted = reply[2] if len(reply) > 2 else []
        if deleted:   # gone from the stream (trimmed by someone else): nothing left to answer
            conn.xack(self.cfg.stream, self.cfg.group, *deleted)
        entries = [(eid, f) for eid, f in reply[1] if f is not None]
        if entries:
            # Delivery counts come only from XPENDING; needed for the rare reclaimed task alone.
            pipe = conn.pipeline(transaction=False)
            for eid, _ in entries:
                pipe.xpending_range(self.cfg.stream, self.cfg.group, min=eid, max=eid, count=1)
            for (eid, fields), pending in zip(entries, pipe.execute()):
                fields[DELIVERIES] = str(pending[0]["times_delivered"] if pending else 1).encode()
        return self._take(entries, "reclaimed")

    def _take(self, entries: list[tuple[bytes, dict[bytes, bytes]]], how: str) -> int:
        taken = 0
        for raw_id, fields in entries:
            entry_id = raw_id.decode()
            tid = fields.get(b"task_id", b"").decode(errors="replace") or entry_id
            with self._lock:
                if tid in self._held:      # our own task, back from XAUTOCLAIM: already in hand
                    continue
                self._held[tid] = Held(entry_id, fields.get(b"reply_to", b"").decode(errors="replace"))
            taken += 1
            self.metrics.inc(how)
            deliveries = int(fields.get(DELIVERIES, b"1"))
            req_or_error = self._request(tid, fields) if deliveries <= self.cfg.max_deliveries else \
                f"given up after {deliveries - 1} daemons took this task and stopped before answering it"
            if isinstance(req_or_error, Request):
                if not self.queue.offer(req_or_error) and self._mark_answered(tid):
                    # Another front door filled the queue meanwhile: back to the fleet, not an error.
                    self._outbox.put(("hand_back", tid, None))
                continue
            self.metrics.inc("rejected")
            with self._lock:
                self._held[tid].answered = True
            self._outbox.put(("answer", tid, {"type": "error", "task_id": tid, "request_id": _request_id(fields),
                                              "error": req_or_error}))
        return taken

    def _request(self, task_id: str, fields: dict[bytes, bytes]) -> Request | str:
        """The task as a ``Request``, or why it is refused."""
        if not fleet.TASK_ID.match(task_id):
            return "field 'task_id': must be 1-128 characters of letters, digits, '_', '.', ':', '-'"
        try:
            header = RequestHeader.model_validate(json.loads(fields.get(b"header", b"{}")))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return f"field 'header' is not valid JSON ({exc})"
        except ValidationError as exc:
            e = exc.errors()[0]
            where = ".".join(str(p) for p in e["loc"]) or "header"
            return f"header field '{where}': {'unknown field' if e['type'] == 'extra_forbidden' else e['msg']}"
        if header.v != PROTOCOL_VERSION:
            return f"protocol version {header.v} is not supported (this daemon speaks {PROTOCOL_VERSION})"
        if header.client_id is not None and not CAMERA_ID.match(header.client_id):
            # It names a topic on the PUB socket and the brokers.
            return "header field 'client_id': must be 1-64 characters of letters, digits, '_', '.', '-'"
        if header.classes is not None and any(c not in self._names for c in header.classes):
            return f"header field 'classes': the model's classes are {sorted(self._names)}"
        data = fields.get(b"image", b"")
        if len(data) > self.requests_cfg.max_image_bytes:
            return f"image of {len(data)} bytes is larger than the limit of {self.requests_cfg.max_image_bytes}"
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
        if image is None:
            return "field 'image': could not be decoded (send JPEG or PNG bytes)"
        if image.shape[0] * image.shape[1] > self.requests_cfg.max_pixels:
            return f"image of {image.shape[1]}x{image.shape[0]} pixels is larger than the limit"
        return Request(task_id, image, time.time(), time.monotonic(), reply_to=self,
                       params=request_params(header, self._default_params),
                       priority=header.priority, client_id=header.client_id, request_id=header.request_id)

    # ---- the answerer -----------------------------------------------------------------------------
    def _answer_loop(self, conn: redis.Redis) -> None:
        store = conn.register_script(fleet.ANSWER_SCRIPT)
        hand_back = conn.register_script(fleet.HAND_BACK_SCRIPT)
        while not self._finished():
            try:
                what, tid, body = self._outbox.get(timeout=0.2)
            except queue.Empty:
                continue
            with self._lock:
                held = self._held[tid]
            try:
                if what == "hand_back":
                    done = hand_back(keys=[self.cfg.stream], args=[self.cfg.group, self.consumer, held.entry_id],
                                     client=conn)
                    self.metrics.inc("handed_back" if done else "duplicate")
                else:
                    assert body is not None
                    body["v"] = PROTOCOL_VERSION
                    key = fleet.result_key(self.cfg.result_prefix, tid)
                    fresh = store(keys=[key, self.cfg.stream, held.reply_to],
                                  args=[json.dumps(body, separators=(",", ":")), self.cfg.result_ttl_s,
                                        self.cfg.group, held.entry_id, tid], client=conn)
                    self.metrics.inc(("failed" if body["type"] == "error" else "completed") if fresh
                                     else "duplicate")
            except redis.RedisError:
                # Not stored: tried again on the next connection (the script is idempotent).
                self._outbox.put((what, tid, body))
                raise
            with self._lock:
                self._held.pop(tid, None)
            self._room.set()


def _request_id(fields: dict[bytes, bytes]) -> str | int | None:
    """The submitter's ``request_id`` from a header that may be invalid otherwise, so even a
    refused task's error can be matched."""
    try:
        rid = json.loads(fields.get(b"header", b"{}")).get("request_id")
    except (ValueError, AttributeError):
        return None
    return rid if isinstance(rid, (str, int)) else None
