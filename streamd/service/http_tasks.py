"""The HTTP front door for on-demand pictures: ``POST /api/v1/detect`` and
``GET /api/v1/tasks/{id}``.

A sibling of the ZeroMQ door (``streamd.service.requests``): accepted pictures become
``Request`` records in the same ``RequestQueue`` the scheduler takes from, and the output
stage answers them here through ``ReplyChannel.answer``/``fail``, exactly once each. The
answer is kept as a task (pending -> running -> done | failed) for ``result_ttl_s``, then
reads as ``expired``; a poll with ``?wait=SECONDS`` is held until the task ends or the wait
runs out. ``answer`` and ``fail`` run on pipeline threads: they only take a lock and hand a
wake-up to the server's loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import cv2
import numpy as np
from aiohttp import BodyPartReader, web
from pydantic import ValidationError

from ..config import CAMERA_ID
from ..config_http import HttpConfig
from ..entities import Request, RequestResult
from ..pipeline.postprocess import PostprocessParams
from ..pipeline.requests import RequestQueue
from . import openapi
from .requests import RequestHeader, request_params

log = logging.getLogger("streamd.http.tasks")

FINAL = ("done", "failed")
EXPIRED_KEPT = 10000          # ids remembered as expired (beyond: unknown, 404)
RESULTS_KEPT = 100000         # finished tasks kept at most; beyond, the oldest expire early
SWEEP_S = 0.5


@dataclass
class Task:
    request: Request | None             # while unanswered; dropped then, with its picture
    client_id: str | None
    request_id: str | int | None
    status: str = "pending"             # pending | done | failed (running is derived from the queue)
    body: dict[str, Any] | None = None
    error: str | None = None
    done_mono: float = 0.0
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


class HttpTasks:
    """The ``ReplyChannel`` of HTTP requests and their routes."""

    def __init__(self, cfg: HttpConfig, queue: RequestQueue, names: dict[int, str],
                 default_params: Callable[[], PostprocessParams], timeout_s: float) -> None:
        self.cfg = cfg
        self.queue = queue
        self._names = names
        self._default_params = default_params
        self._timeout_s = timeout_s
        self._tasks: dict[str, Task] = {}
        self._expired: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._accepting = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self.counts = {"accepted": 0, "busy": 0, "rejected": 0, "completed": 0, "failed": 0}

    public_paths: tuple[str, ...] = ()

    # ---- HttpPart --------------------------------------------------------------------------------------
    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/api/v1/detect", self._detect)
        app.router.add_get("/api/v1/tasks/{task_id}", self._task)
        app.router.add_get(openapi.PATH, openapi.serve)

    def started(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.create_task(self._sweep())

    # ---- ReplyChannel (pipeline threads) ----------------------------------------------------------------
    def answer(self, result: RequestResult, body: dict[str, Any]) -> bool:
        return self._finish(result.request.task_id, "done", body=body)

    def fail(self, request: Request, reason: str) -> None:
        self._finish(request.task_id, "failed", error=reason)

    def _finish(self, task_id: str, status: str, body: dict[str, Any] | None = None,
                error: str | None = None) -> bool:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None or task.status in FINAL:
                return False
            task.status, task.body, task.error, task.done_mono = status, body, error, time.monotonic()
            task.request = None
            waiters, task.waiters = task.waiters, []
            self.counts["completed" if status == "done" else "failed"] += 1
        if waiters and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(_wake, waiters)
            except RuntimeError:      # the server already stopped: nobody is waiting any more
                pass
        return True

    def stop_accepting(self) -> None:
        self._accepting = False

    def fail_all_pending(self, reason: str) -> int:
        """At shutdown, after the pipeline drained: every task not yet answered fails."""
        with self._lock:
            left = [t.request for t in self._tasks.values() if t.request is not None]
        for req in left:
            self.fail(req, reason)
        return len(left)

    # ---- routes -------------------------------------------------------------------------------------
    async def _detect(self, request: web.Request) -> web.Response:
        if not self._accepting:
            return _error(503, "the daemon is shutting down")
        fields = dict(request.query)
        ctype = request.content_type
        try:
            if ctype.startswith("image/") or ctype == "application/octet-stream":
                data: bytes | None = await request.read()
            elif ctype == "multipart/form-data":
                data, form = await _read_multipart(request, self.cfg.max_body_bytes)
                fields.update(form)
            else:
                return self._reject(415, f"send a picture (Content-Type image/jpeg or image/png) or "
                                         f"multipart/form-data with an 'image' part, not '{ctype}'")
        except web.HTTPRequestEntityTooLarge:
            return self._reject(413, f"the body is larger than the limit of {self.cfg.max_body_bytes} bytes")
        if data is None:
            return self._reject(400, "multipart body has no 'image' part")
        header, problem = self._parse_fields(fields)
        if header is None:
            return self._reject(400, problem)
        image = await asyncio.get_running_loop().run_in_executor(None, _decode, data)
        if image is None:
            return self._reject(415, "the body is not a picture OpenCV can decode (send JPEG or PNG bytes)")
        if image.shape[0] * image.shape[1] > self.cfg.max_pixels:
            return self._reject(413, f"picture of {image.shape[1]}x{image.shape[0]} pixels is larger than the "
                                     f"limit of {self.cfg.max_pixels}")
        req = Request(uuid.uuid4().hex[:16], image, time.time(), time.monotonic(), reply_to=self,
                      params=request_params(header, self._default_params), priority=header.priority, client_id=header.client_id,
                      request_id=header.request_id)
        with self._lock:
            self._tasks[req.task_id] = Task(req, req.client_id, req.request_id)
        if not self.queue.offer(req):
            with self._lock:
                self._tasks.pop(req.task_id, None)
                self.counts["busy"] += 1
            return _error(429, f"the request queue is full ({self.queue.size}); retry later", **{"Retry-After": "1"})
        with self._lock:
            self.counts["accepted"] += 1
        location = f"/api/v1/tasks/{req.task_id}"
        return web.json_response({"task_id": req.task_id, "status": "pending", "location": location},
                                 status=202, headers={"Location": location})

    def _reject(self, status: int, message: str) -> web.Response:
        with self._lock:
            self.counts["rejected"] += 1
        return _error(status, message)

    def _parse_fields(self, fields: dict[str, str]) -> tuple[RequestHeader | None, str]:
        raw: dict[str, Any] = dict(fields)
        if "classes" in raw:
            raw["classes"] = [c for c in raw["classes"].split(",") if c]
        try:
            header = RequestHeader.model_validate(raw)    # the ZeroMQ door's fields, by the same rules
        except ValidationError as exc:
            e = exc.errors()[0]
            where = ".".join(str(p) for p in e["loc"]) or "query"
            return None, f"'{where}': {'unknown field' if e['type'] == 'extra_forbidden' else e['msg']}"
        if header.client_id is not None and not CAMERA_ID.match(header.client_id):
            return None, "'client_id': must be 1-64 characters of letters, digits, '_', '.', '-'"
        unknown = [c for c in header.classes or [] if c not in self._names]
        if unknown:
            return None, f"'classes': {unknown} not among the model's classes {sorted(self._names)}"
        return header, ""

    async def _task(self, request: web.Request) -> web.Response:
        task_id = request.match_info["task_id"]
        try:
            wait = min(float(request.query.get("wait", 0)), self.cfg.max_wait_s)
        except ValueError:
            return _error(400, "'wait': must be a number of seconds")
        with self._lock:
            task = self._tasks.get(task_id)
            fut: asyncio.Future[None] | None = None
            if task is not None and task.status not in FINAL and wait > 0:
                fut = asyncio.get_running_loop().create_future()
                task.waiters.append(fut)
        if fut is not None:
            try:
                await asyncio.wait_for(fut, wait)
            except asyncio.TimeoutError:
                pass
        return self._view(task_id)

    def _view(self, task_id: str) -> web.Response:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                if task_id in self._expired:
                    return web.json_response({"task_id": task_id, "status": "expired"})
                return _error(404, f"no task {task_id!r}")
            status, body, error, req = task.status, task.body, task.error, task.request
        if req is not None and not self.queue.holds(req):
            status = "running"           # taken into a batch, not answered yet
        out: dict[str, Any] = {"task_id": task_id, "status": status, "client_id": task.client_id,
                               "request_id": task.request_id}
        if body is not None:
            t = body["timings_ms"]
            out.update(width=body["width"], height=body["height"], detections=body["detections"],
                       timings_ms={"queue": t["queue"], "inference": t["infer"], "total": t["total"]})
        if error is not None:
            out["error"] = error
        return web.json_response(out)

    # ---- upkeep on the loop -------------------------------------------------------------------------------
    async def _sweep(self) -> None:
        """Requests waiting past the timeout fail (whatever door they came through: the
        ZeroMQ door may be off); finished tasks older than ``result_ttl_s`` expire."""
        while True:
            await asyncio.sleep(SWEEP_S)
            now = time.monotonic()
            for req in self.queue.take_expired(now - self._timeout_s):
                req.reply_to.fail(req, f"not processed within {self._timeout_s:g}s (the model is overloaded)")
            with self._lock:
                done = [(t.done_mono, k) for k, t in self._tasks.items() if t.status in FINAL]
                if len(done) > RESULTS_KEPT:      # a flood: the oldest go first (sorted only then)
                    done.sort()
                    old = [k for i, (at, k) in enumerate(done)
                           if i < len(done) - RESULTS_KEPT or now - at > self.cfg.result_ttl_s]
                else:
                    old = [k for at, k in done if now - at > self.cfg.result_ttl_s]
                for k in old:
                    del self._tasks[k]
                    self._expired[k] = None
                while len(self._expired) > EXPIRED_KEPT:
                    self._expired.popitem(last=False)


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    for fut in waiters:
        if not fut.done():
            fut.set_result(None)


def _decode(data: bytes) -> np.ndarray | None:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None


async def _read_multipart(request: web.Request, limit: int) -> tuple[bytes | None, dict[str, str]]:
    """The 'image' part's bytes and the other parts as text fields. A multipart body is read
    as a stream, past aiohttp's own body limit: the size is counted here."""
    data: bytes | None = None
    form: dict[str, str] = {}
    size = 0
    async for part in await request.multipart():
        if not isinstance(part, BodyPartReader) or part.name is None:
            continue
        buf = bytearray()
        while chunk := await part.read_chunk():
            size += len(chunk)
            if size > limit:
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
            buf += chunk
        if part.name == "image":
            data = bytes(buf)
        else:
            form[part.name] = buf.decode("utf-8", "replace")
    return data, form
