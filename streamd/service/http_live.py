"""What the HTTP server shows live: the cameras API, each camera's latest annotated picture
(one JPEG, or an MJPEG stream), the WebSocket push and the live view page.

:class:`LiveHub` is an ``Output`` of the output stage (``offer`` never blocks) and its frame
tap. On the pipeline's thread it only keeps a reference to each camera's newest frame and
hands messages to the server's loop with ``call_soon_threadsafe``; there every WebSocket
client has a bounded queue, and a client whose queue is full is dropped, never waited for.
Pictures are drawn and encoded only when someone asks, in the loop's worker threads, once
per frame whoever asks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable

import cv2
from aiohttp import WSMsgType, web

from ..annotate import draw
from ..entities import Frame, FrameResult
from ..outputs.base import Outbound
from ..pipeline.output.messages import detection_json

log = logging.getLogger("streamd.http.live")

CAMERAS_EVERY_S = 1.0           # the "cameras" summary pushed to WebSocket clients
SEND_TIMEOUT_S = 5.0            # one message not accepted by a client's socket in this time: dropped
# Per WebSocket client: what the kernel and the transport may hold before writes wait. A client
# that falls behind shows as a full queue within a few hundred kilobytes, not megabytes.
SOCKET_SNDBUF = 32 * 1024
TRANSPORT_HIGH_WATER = 16 * 1024
WRITER_LIMIT = 16 * 1024        # aiohttp's own: bytes written before a send waits for the socket
KINDS = ("detections", "health", "event", "result", "stats", "cameras")
UNFILTERED = ("result", "stats", "cameras")
JPEG_QUALITY = 80


@dataclass
class CameraView:
    """The newest frame of one camera and the rates measured where results leave."""

    result: FrameResult | None = None
    frame: Frame | None = None
    fps: float = 0.0
    latency_ms: float | None = None
    last_error: str | None = None
    jpeg: tuple[int, bytes] | None = None        # (frame number, encoded) cache


@dataclass(eq=False)
class Client:
    ws: web.WebSocketResponse
    transport: asyncio.Transport | None
    queue: asyncio.Queue[str]
    cameras: set[str] | None = None              # None: every camera
    kinds: set[str] = field(default_factory=lambda: set(KINDS))
    dropped: bool = False

    def wants(self, kind: str, key: str) -> bool:
        # Results, stats and the camera summary are about no one camera: only the type filters them.
        return kind in self.kinds and (self.cameras is None or kind in UNFILTERED or key in self.cameras)


def _split(value: Any) -> set[str] | None:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    return {str(v).strip() for v in items if str(v).strip()}


class LiveHub:
    """Output + frame tap + routes: ``/``, ``/api/v1/cameras``, ``/api/v1/ws``."""

    name = "http"
    public_paths = ("/", "/live.js", "/live.css")     # the page only: its data needs the token

    def __init__(self, stats: Callable[[], dict[str, Any]], ws_queue: int = 256) -> None:
        self._stats = stats
        self._ws_queue = ws_queue
        self._views: dict[str, CameraView] = {}
        self._lock = threading.Lock()            # the views: pipeline thread writes, loop reads
        self._clients: set[Client] = set()       # the loop's only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._counters = {"sent": 0, "dropped": 0, "clients_dropped": 0}

    # ---- Output + frame tap (pipeline threads) -------------------------------------------------------
    def offer(self, msg: Outbound) -> None:
        if msg.kind == "health":
            with self._lock:
                view = self._views.setdefault(msg.key, CameraView())
                view.last_error = None if msg.body.get("state") == "streaming" else (msg.body.get("reason") or None)
        loop = self._loop
        if loop is not None and self._clients:
            try:
                loop.call_soon_threadsafe(self._dispatch, msg.kind, msg.key, msg.body)
            except RuntimeError:      # the server stopped (shutdown): nobody is listening
                pass

    def frame(self, result: FrameResult, frame: Frame) -> None:
        now = time.time()
        with self._lock:
            view = self._views.setdefault(result.camera_id, CameraView())
            if view.result is not None and result.capture_ts > view.result.capture_ts:
                rate = 1.0 / (result.capture_ts - view.result.capture_ts)
                view.fps = rate if view.fps == 0 else 0.8 * view.fps + 0.2 * rate
            view.result, view.frame = result, frame
            view.latency_ms = round(1000 * (now - result.capture_ts), 1)

    def forget(self, camera_id: str) -> None:
        with self._lock:
            self._views.pop(camera_id, None)

    def close(self, timeout_s: float = 2.0) -> None:
        """Nothing queued to send: the server closes the sockets when it stops."""

    def counters(self) -> dict[str, int]:
        return {**self._counters, "clients": len(self._clients)}

    # ---- HttpPart ----------------------------------------------------------------------------------------
    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._index)
        app.router.add_get("/live.js", self._static)
        app.router.add_get("/live.css", self._static)
        app.router.add_get("/api/v1/cameras", self._cameras)
        app.router.add_get("/api/v1/cameras/{camera}/latest.jpg", self._latest)
        app.router.add_get("/api/v1/cameras/{camera}/stream.mjpg", self._mjpeg)
        app.router.add_get("/api/v1/ws", self._ws)
        app.on_shutdown.append(self._close_clients)

    def started(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.create_task(self._push_cameras())

    # ---- the loop: WebSocket fan-out ------------------------------------------------------------------
    def _dispatch(self, kind: str, key: str, body: dict[str, Any]) -> None:
        text: str | None = None
        for c in list(self._clients):
            if c.dropped or not c.wants(kind, key):
                continue
            text = text or json.dumps(body, separators=(",", ":"))
            self._enqueue(c, text)

    def _enqueue(self, c: Client, text: str) -> None:
        """Every message to a client goes through its queue, in order, by its one sender."""
        if c.dropped:
            return
        try:
            c.queue.put_nowait(text)
            self._counters["sent"] += 1
        except asyncio.QueueFull:
            self._drop(c, f"more than {self._ws_queue} messages behind")

    def _drop(self, c: Client, why: str) -> None:
        c.dropped = True
        self._clients.discard(c)
        self._counters["clients_dropped"] += 1
        self._counters["dropped"] += c.queue.qsize()
        log.info("websocket client dropped: %s", why)
        asyncio.get_running_loop().create_task(self._hang_up(c))

    @staticmethod
    async def _hang_up(c: Client) -> None:
        """Say why (1013: try again later) if the socket still takes it; else cut it."""
        try:
            await asyncio.wait_for(c.ws.close(code=1013, message=b"too slow: dropped"), 1.0)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        if c.transport is not None and not c.transport.is_closing():
            c.transport.abort()

    async def _push_cameras(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(CAMERAS_EVERY_S)
            if any("cameras" in c.kinds for c in self._clients):
                try:
                    body = await loop.run_in_executor(None, self.cameras_body)
                except Exception:  # noqa: BLE001 - the next round tries again
                    log.debug("camera summary failed", exc_info=True)
                    continue
                self._dispatch("cameras", "", body)

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=20, writer_limit=WRITER_LIMIT)
        await ws.prepare(request)
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_SNDBUF)
            transport.set_write_buffer_limits(high=TRANSPORT_HIGH_WATER)
        c = Client(ws, transport, asyncio.Queue(self._ws_queue))
        self._subscribe(c, {"cameras": request.query.get("cameras"), "types": request.query.get("types")})
        self._clients.add(c)
        sender = asyncio.get_running_loop().create_task(self._send(c))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    sub = json.loads(msg.data)
                except json.JSONDecodeError:
                    sub = None
                if isinstance(sub, dict) and sub.get("type") == "subscribe":
                    self._subscribe(c, sub)
                    reply = {"type": "subscribed", "cameras": None if c.cameras is None else sorted(c.cameras),
                             "types": sorted(c.kinds)}
                else:
                    reply = {"type": "error", "error": 'send {"type": "subscribe", "cameras": [...], "types": [...]}'}
                self._enqueue(c, json.dumps(reply))
        finally:
            self._clients.discard(c)
            sender.cancel()
        return ws

    @staticmethod
    def _subscribe(c: Client, sub: dict[str, Any]) -> None:
        c.cameras = _split(sub.get("cameras"))
        kinds = _split(sub.get("types"))
        c.kinds = set(KINDS) if kinds is None else kinds & set(KINDS)

    async def _send(self, c: Client) -> None:
        while not c.ws.closed:
            text = await c.queue.get()
            try:
                await asyncio.wait_for(c.ws.send_str(text), SEND_TIMEOUT_S)
            except asyncio.TimeoutError:
                if not c.dropped:
                    self._drop(c, f"a message not taken within {SEND_TIMEOUT_S:g}s")
                return
            except ConnectionError:
                return

    async def _close_clients(self, app: web.Application) -> None:
        for c in list(self._clients):
            await c.ws.close(code=1001, message=b"the daemon is stopping")

    # ---- the loop: cameras and pictures --------------------------------------------------------------
    def cameras_body(self) -> dict[str, Any]:
        stats = self._stats()
        with self._lock:
            views = {cid: (v.fps, v.latency_ms, v.last_error, v.result) for cid, v in self._views.items()}
        cams = []
        for cid, s in stats.get("cameras", {}).items():
            fps, latency, error, result = views.get(cid, (0.0, None, None, None))
            cams.append({"id": cid, "state": s["state"], "fps": round(fps, 2), "latency_ms": latency,
                         "dropped": sum(n for k, n in s["dropped"].items() if k != "fps_cap"),
                         "dropped_by_cause": s["dropped"],
                         "decoded": s["decoded"], "inferred": s["inferred"], "reconnects": s["reconnects"],
                         "width": s["width"], "height": s["height"], "last_error": error,
                         "frame": result.frame_no if result is not None else None,
                         "detections": len(result.detections) if result is not None else 0})
        return {"type": "cameras", "uptime_s": stats.get("uptime_s"), "cameras": cams}

    async def _cameras(self, request: web.Request) -> web.Response:
        return web.json_response(await asyncio.get_running_loop().run_in_executor(None, self.cameras_body))

    def _jpeg(self, camera_id: str) -> tuple[int, bytes] | None:
        """The newest frame of a camera with its boxes drawn, encoded once per frame."""
        with self._lock:
            view = self._views.get(camera_id)
            if view is None or view.result is None or view.frame is None:
                return None
            result, frame, cached = view.result, view.frame, view.jpeg
        if cached is not None and cached[0] == result.frame_no:
            return cached
        picture = draw(frame.image, [detection_json(d) for d in result.detections])
        ok, buf = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            return None
        out = (result.frame_no, buf.tobytes())
        with self._lock:
            if camera_id in self._views:
                self._views[camera_id].jpeg = out
        return out

    async def _latest(self, request: web.Request) -> web.Response:
        cid = request.match_info["camera"]
        got = await asyncio.get_running_loop().run_in_executor(None, self._jpeg, cid)
        if got is None:
            return web.json_response({"error": f"no picture from camera {cid!r} yet"}, status=404)
        return web.Response(body=got[1], content_type="image/jpeg",
                            headers={"Cache-Control": "no-store", "X-Frame": str(got[0])})

    async def _mjpeg(self, request: web.Request) -> web.StreamResponse:
        """One part per new frame, at most ``?fps=`` (default 5) a second: a slow viewer
        gets fewer frames, and the writes are bounded in time, so nothing waits on it."""
        cid = request.match_info["camera"]
        try:
            period = 1.0 / min(max(float(request.query.get("fps", 5)), 0.1), 30)
        except ValueError:
            return web.json_response({"error": "'fps': must be a number"}, status=400)
        loop = asyncio.get_running_loop()
        resp = web.StreamResponse(headers={"Content-Type": "multipart/x-mixed-replace; boundary=frame",
                                           "Cache-Control": "no-store"})
        await resp.prepare(request)
        last = -1
        while True:
            got = await loop.run_in_executor(None, self._jpeg, cid)
            if got is not None and got[0] != last:
                last = got[0]
                head = f"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {len(got[1])}\r\n\r\n".encode()
                try:
                    await asyncio.wait_for(resp.write(head + got[1] + b"\r\n"), SEND_TIMEOUT_S)
                except (asyncio.TimeoutError, ConnectionError):
                    break
            await asyncio.sleep(period)     # the frame rate cap of this stream
        return resp

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(body=_asset("index.html"), content_type="text/html", charset="utf-8")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.path.lstrip("/")
        ctype = "text/javascript" if name.endswith(".js") else "text/css"
        return web.Response(body=_asset(name), content_type=ctype, charset="utf-8")


def _asset(name: str) -> bytes:
    return (resources.files("streamd.service") / "static" / name).read_bytes()
