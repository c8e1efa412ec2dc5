"""On-demand image requests that share the engine with the cameras.

A client (any language; ``streamd detect`` is one) sends ``[header JSON, image bytes]``
from a DEALER (or REQ) socket to the daemon's ROUTER socket. It is answered at once:
``accepted`` with a task id, ``busy`` when the bounded queue is full (not taken: retry
later), or ``error`` naming the problem. The result comes later on the same connection
(and is published on the PUB socket under ``req/<client_id>/result``). Every accepted
request is answered exactly once: a result, or an error (timeout, shutdown, failure).
Full message description: docs/PROTOCOL.md.

This module is the ZeroMQ front door only: accepted requests go into the transport-agnostic
``streamd.pipeline.requests.RequestQueue`` the scheduler takes from, and results come back
through the output stage, which calls ``answer`` here (the ``ReplyChannel`` of
``streamd.entities``). Only the server thread touches the ROUTER socket; other threads hand
it replies through a queue.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import cv2
import numpy as np
import zmq
from prometheus_client import Counter, Histogram
from prometheus_client.core import Metric
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import CAMERA_ID, RequestsConfig
from ..entities import Request, RequestResult
from ..errors import PublishError
from ..pipeline.postprocess import PostprocessParams
from ..pipeline.requests import RequestQueue
from .metrics import LATENCY_BUCKETS, histogram

log = logging.getLogger("streamd.requests")

PROTOCOL_VERSION = 1


class RequestHeader(BaseModel):
    """What a client may send; anything else is refused by name."""

    model_config = ConfigDict(extra="forbid")
    v: int = PROTOCOL_VERSION
    request_id: str | int | None = Field(None, description="echoed in every reply")
    client_id: str | None = Field(None, description="names the client in metrics and the PUB topic")
    priority: int = Field(0, ge=-10, le=10, description="higher is served first")
    conf: float | None = Field(None, gt=0, lt=1)
    iou: float | None = Field(None, gt=0, le=1)
    max_det: int | None = Field(None, ge=1, le=10000)
    classes: list[int] | None = None


def request_params(header: RequestHeader, defaults: Callable[[], PostprocessParams]) -> PostprocessParams | None:
    """A request's own thresholds, the daemon's for what it leaves out; None when it sets none
    (every front door judges a picture by these same rules)."""
    if header.conf is None and header.iou is None and header.max_det is None and header.classes is None:
        return None
    d = defaults()
    return PostprocessParams(conf=d.conf if header.conf is None else header.conf,
                             iou=d.iou if header.iou is None else header.iou,
                             max_det=d.max_det if header.max_det is None else header.max_det,
                             classes=d.classes if header.classes is None else frozenset(header.classes))


class RequestMetrics:
    """Queue, inference and total time per request, and what happened to each; a collector
    for the daemon's metrics registry."""

    def __init__(self) -> None:
        self.queue_seconds = histogram("streamd_request_queue_seconds",
                                       "Seconds a request waited before its batch was assembled.", LATENCY_BUCKETS)
        self.inference_seconds = histogram("streamd_request_inference_seconds",
                                           "Seconds of inference for the batch that carried a request.",
                                           LATENCY_BUCKETS)
        self.total_seconds = histogram("streamd_request_total_seconds",
                                       "Seconds from receiving a request until its result was sent.", LATENCY_BUCKETS)
        self.outcomes = Counter("streamd_requests_total",
                                "Requests by outcome (accepted, busy, rejected, completed, failed).", ["outcome"],
                                registry=None)

    def outcome_counts(self) -> dict[str, int]:
        return {s.labels["outcome"]: int(s.value) for fam in self.outcomes.collect() for s in fam.samples
                if s.name == "streamd_requests_total"}

    def collect(self) -> list[Metric]:
        return [fam for m in self._metrics() for fam in m.collect()]

    def describe(self) -> list[Metric]:
        return [fam for m in self._metrics() for fam in m.describe()]

    def _metrics(self) -> tuple[Histogram, Histogram, Histogram, Counter]:
        return self.queue_seconds, self.inference_seconds, self.total_seconds, self.outcomes


class RequestServer(threading.Thread):
    """The thread that owns the ROUTER socket."""

    def __init__(self, cfg: RequestsConfig, requests: RequestQueue, names: dict[int, str],
                 default_params: Callable[[], PostprocessParams], context: zmq.Context | None = None) -> None:
        super().__init__(name="requests", daemon=True)
        self.cfg = cfg
        self.queue = requests
        self.metrics = RequestMetrics()
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self._names = names
        self._default_params = default_params
        self._outbox: queue.Queue[tuple[list[bytes], dict[str, Any]]] = queue.Queue()
        self._pending: dict[str, Request] = {}      # accepted, not yet answered
        self._lock = threading.Lock()
        self._accepting = True
        ctx = context or zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)    # a vanished client's reply is dropped, not an error
        # A picture over max_image_bytes must still be received to be answered with an error;
        # only beyond receive_limit does ZeroMQ drop the connection (no reply is possible then).
        sock.setsockopt(zmq.MAXMSGSIZE, cfg.receive_limit)
        try:
            sock.bind(cfg.endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise PublishError(f"cannot bind requests.endpoint {cfg.endpoint}: {exc}") from None
        self.bound_endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._sock = sock

    # ---- called from other threads (the ReplyChannel) ---------------------------------------------
    def answer(self, result: RequestResult, body: dict[str, Any]) -> bool:
        """The output stage delivers a result; False if this task was already answered."""
        req = result.request
        if not self._claim(req.task_id):
            return False
        self.metrics.queue_seconds.observe(result.queue_s)
        self.metrics.inference_seconds.observe(result.infer_s)
        self.metrics.total_seconds.observe(time.monotonic() - req.received_mono)
        self.metrics.outcomes.labels(outcome="completed").inc()
        self._outbox.put((req.route, body))
        return True

    def fail(self, request: Request, reason: str) -> None:
        if not self._claim(request.task_id):
            return
        self.metrics.outcomes.labels(outcome="failed").inc()
        self._outbox.put((request.route, {"type": "error", "task_id": request.task_id,
                                          "request_id": request.request_id, "error": reason}))

    def stop_accepting(self) -> None:
        self._accepting = False

    def fail_all_pending(self, reason: str) -> int:
        for req in self.queue.drain():
            req.reply_to.fail(req, reason)
        with self._lock:
            left = list(self._pending.values())
        for req in left:
            self.fail(req, reason)
        return len(left)

    def stop(self) -> None:
        self.stop_event.set()

    def close_socket(self) -> None:
        """For a server that never started (start-up failed after binding)."""
        if not self.is_alive():
            self._sock.close(0)

    def _claim(self, task_id: str) -> bool:
        with self._lock:
            return self._pending.pop(task_id, None) is not None

    # ---- the thread -------------------------------------------------------------------------------
    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        next_expiry = time.monotonic() + 0.5
        try:
            while True:
                if dict(poller.poll(20)).get(self._sock):
                    # Drain what arrived, bounded so replies are never starved.
                    for _ in range(100):
                        try:
                            parts = self._sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(parts)
                self._flush()
                now = time.monotonic()
                if now >= next_expiry:
                    next_expiry = now + 0.5
                    for req in self.queue.take_expired(now - self.cfg.timeout_s):
                        req.reply_to.fail(req, f"not processed within {self.cfg.timeout_s:g}s (the model is overloaded)")
                if self.stop_event.is_set() and self._outbox.empty():
                    break
        except BaseException as exc:  # noqa: BLE001 - recorded for the supervisor
            self.error = exc
            log.exception("request server failed")
        finally:
            self._flush()
            self._sock.close(linger=1000)

    def _flush(self) -> None:
        while True:
            try:
                envelope, body = self._outbox.get_nowait()
            except queue.Empty:
                return
            self._reply(envelope, body)

    def _reply(self, envelope: list[bytes], body: dict[str, Any]) -> None:
        body["v"] = PROTOCOL_VERSION
        try:
            self._sock.send_multipart([*envelope, json.dumps(body, separators=(",", ":")).encode()], zmq.NOBLOCK)
        except zmq.ZMQError as exc:   # the client is gone or not reading: its loss, not ours
            log.debug("reply to a client dropped: %s", exc)

    def _handle(self, parts: list[bytes]) -> None:
        # DEALER: [identity, header, image]; REQ: [identity, b"", header, image].
        if len(parts) >= 2 and parts[1] == b"":
            envelope, payload = parts[:2], parts[2:]
        else:
            envelope, payload = parts[:1], parts[1:]
        request_id = None

        def reject(msg: str) -> None:
            self.metrics.outcomes.labels(outcome="rejected").inc()
            self._reply(envelope, {"type": "error", "request_id": request_id, "error": msg})

        try:
            raw = json.loads(payload[0]) if payload else None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raw, bad_json = None, exc
        else:
            bad_json = None
        if isinstance(raw, dict):
            # Known as early as possible, so even a malformed request's error can be matched.
            request_id = raw.get("request_id") if isinstance(raw.get("request_id"), (str, int)) else None
        if len(payload) != 2:
            return reject(f"expected 2 message parts (header JSON, image bytes), got {len(payload)}")
        if bad_json is not None:
            return reject(f"header is not valid JSON ({bad_json})")
        try:
            header = RequestHeader.model_validate(raw)
        except ValidationError as exc:
            e = exc.errors()[0]
            where = ".".join(str(p) for p in e["loc"]) or "header"
            msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
            return reject(f"field '{where}': {msg}")
        if header.v != PROTOCOL_VERSION:
            return reject(f"protocol version {header.v} is not supported (this daemon speaks {PROTOCOL_VERSION})")
        if header.client_id is not None and not CAMERA_ID.match(header.client_id):
            return reject("field 'client_id': must be 1-64 characters of letters, digits, '_', '.', '-'")
        if header.classes is not None and any(c not in self._names for c in header.classes):
            return reject(f"field 'classes': the model's classes are {sorted(self._names)}")
        if not self._accepting:
            return reject("the daemon is shutting down")
        data = payload[1]
        if len(data) > self.cfg.max_image_bytes:
            return reject(f"image of {len(data)} bytes is larger than the limit of {self.cfg.max_image_bytes}")
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
        if image is None:
            return reject("the image could not be decoded (send JPEG or PNG bytes)")
        if image.shape[0] * image.shape[1] > self.cfg.max_pixels:
            return reject(f"image of {image.shape[1]}x{image.shape[0]} pixels is larger than the limit "
                          f"of {self.cfg.max_pixels} pixels")
        params = request_params(header, self._default_params)
        req = Request(uuid.uuid4().hex[:16], image, time.time(), time.monotonic(), reply_to=self, route=envelope,
                      params=params, priority=header.priority, client_id=header.client_id,
                      request_id=header.request_id)
        with self._lock:
            self._pending[req.task_id] = req
        if not self.queue.offer(req):
            with self._lock:
                self._pending.pop(req.task_id, None)
            self.metrics.outcomes.labels(outcome="busy").inc()
            self._reply(envelope, {"type": "busy", "request_id": request_id, "queue_size": self.cfg.queue_size})
            return None
        self.metrics.outcomes.labels(outcome="accepted").inc()
        self._reply(envelope, {"type": "accepted", "task_id": req.task_id, "request_id": request_id,
                               "queued": len(self.queue)})
        return None


@dataclass
class ClientResult:
    path: str
    task_id: str = ""
    reply: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0
