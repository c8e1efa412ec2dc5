"""The thread that owns the ZeroMQ PUB socket.

Other threads hand it messages through a bounded queue and never wait: a full queue or
a subscriber at its high-water mark costs dropped (counted) messages, never a stalled
scheduler. Every message gets a publisher-wide ``seq`` and a per-camera ``cam_seq`` so
subscribers see exactly what they missed, plus the publisher's ``pub`` id so a restart
reads as a restart, not as a gap. An idle publisher sends heartbeats and, every
``stats_interval_s``, a stats message. It is one ``Output`` (``outputs.base``): the output
stage offers it the same ``Outbound`` records as every other transport.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from typing import Any, Callable

import zmq

from .. import protocol
from ..config import PublisherConfig
from ..errors import PublishError
from ..security import (KeyFileError, ServerSecurity, apply_server, endpoint_is_loopback, load_allowed_keys,
                        load_secret_key_file, publisher_exposure_problem)

from .base import Outbound

log = logging.getLogger("streamd.publisher")

# What a detections message's JSON takes at most, beside its snapshot (hundreds of detections).
DETECTIONS_BOUND = 64 * 1024
# However big the messages, a subscriber may fall this many behind before losing any.
MIN_SNDHWM = 8


def subscriber_hwm(cfg: PublisherConfig, snapshots: bool) -> int:
    """Messages one subscriber's queue holds. ZeroMQ bounds it in messages only, and takes the
    bound when a subscriber connects (from the value at bind), so with snapshots the bytes
    are bounded through their size cap: the budget over the largest message there can be."""
    if not snapshots:
        return cfg.sndhwm       # detections alone: a few KB each
    per_message = cfg.snapshot_max_bytes + DETECTIONS_BOUND
    return max(MIN_SNDHWM, min(cfg.sndhwm, int(cfg.subscriber_buffer_mb * 2**20) // per_message))


def topic_for(msg: Outbound) -> bytes:
    """The PUB topic of a message: ``cam/<id>/...`` for a camera's, ``req/<client>/result``
    for a request's result, ``sys/...`` for the daemon's own."""
    if msg.kind == "detections":
        return protocol.detections_topic(msg.key)
    if msg.kind == "health":
        return protocol.health_topic(msg.key)
    if msg.kind == "result":
        return f"req/{msg.key}/result".encode()
    if msg.kind == "stats":
        return protocol.TOPIC_STATS
    return protocol.camera_prefix(msg.key) + msg.kind.encode()


class Publisher(threading.Thread):
    def __init__(self, cfg: PublisherConfig, context: zmq.Context | None = None,
                 stats_provider: Callable[[], dict[str, Any]] | None = None,
                 on_stale: Callable[[str], None] | None = None, snapshots: bool = False) -> None:
        super().__init__(name="publisher", daemon=True)
        self.cfg = cfg
        self.sndhwm = subscriber_hwm(cfg, snapshots)
        self.publisher_id = uuid.uuid4().hex[:12]
        self.host = socket.gethostname()
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self._ctx = context or zmq.Context.instance()
        # A detections message carries the monotonic time after which it is too old to
        # send (the age bound, judged at the socket).
        self._queue: queue.Queue[Outbound] = queue.Queue(cfg.queue_size)
        self._on_stale = on_stale or (lambda camera_id: None)
        self._seq = 0
        self._cam_seq: dict[str, int] = {}
        self._stats_provider = stats_provider
        self._stats_interval = cfg.stats_interval_s
        self.sent = 0
        self.sent_detections: dict[str, int] = {}   # camera id -> detection messages sent
        self.dropped = 0            # lost before the socket (queue full)
        self.stale = 0              # detections not sent: older than the age bound at the socket
        self.bound_endpoint = ""
        self._sock: zmq.Socket | None = None
        self._bind()

    def _bind(self) -> None:
        # Bind in the constructor (caller's thread) so a bad endpoint fails start-up loudly;
        # the socket is then used only by this thread.
        curve = self.cfg.curve
        problem = publisher_exposure_problem(self.cfg.endpoint, curve is not None, self.cfg.allow_non_loopback)
        if problem is not None:
            raise PublishError(f"publisher.endpoint {problem}")
        if not endpoint_is_loopback(self.cfg.endpoint):
            if curve is not None:
                log.info("publishing on %s with CURVE: encrypted, only listed client keys may subscribe",
                         self.cfg.endpoint)
            else:
                log.warning("publishing on %s: reachable from the network, messages are not encrypted",
                            self.cfg.endpoint)
        self._security: ServerSecurity | None = None
        self._own_ctx: zmq.Context | None = None
        if curve is not None:
            try:
                server_keys = load_secret_key_file(curve.server_secret_key)
                allowed = load_allowed_keys(curve.allowed_clients_dir)
            except KeyFileError as exc:
                raise PublishError(f"publisher.curve: {exc}") from None
            # The ZAP handler is per context: a private one keeps this key list from applying
            # to, or clashing with, any other socket of the process.
            self._own_ctx = self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.SNDHWM, self.sndhwm)      # before bind: subscribers get the value of then
        sock.setsockopt(zmq.LINGER, 500)
        try:
            if curve is not None:
                self._security = apply_server(sock, server_keys, allowed)
            sock.bind(self.cfg.endpoint)
        except (zmq.ZMQError, KeyFileError) as exc:
            sock.close(0)
            self._close_security()
            raise PublishError(f"cannot bind publisher.endpoint {self.cfg.endpoint}: {exc}") from None
        if curve is not None and self._security is not None:
            log.info("CURVE on: %d allowed client key(s) from %s", self._security.allowed,
                     curve.allowed_clients_dir)
        self.bound_endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._sock = sock

    def close_socket(self) -> None:
        """For a publisher that never started (start-up failed after binding)."""
        if self._sock is not None and not self.is_alive():
            self._sock.close(0)
            self._sock = None
            self._close_security()

    def _close_security(self) -> None:
        """Stop the ZAP thread and end the private context; after the socket is closed."""
        if self._security is not None:
            self._security.stop()
            self._security = None
        if self._own_ctx is not None:
            self._own_ctx.term()
            self._own_ctx = None

    # ---- the Output interface (called from any thread) -------------------------------------
    def offer(self, msg: Outbound) -> None:
        """Queue ``msg`` and return at once; a full queue drops it (counted)."""
        try:
            self._queue.put_nowait(msg)
        except queue.Full:
            self.dropped += 1

    def counters(self) -> dict[str, int]:
        return {"sent": self.sent, "dropped": self.dropped, "stale": self.stale}

    def close(self, timeout_s: float = 2.0) -> None:
        """Send what is queued (within ``timeout_s``), then close the socket."""
        self.stop()
        if self.is_alive():
            self.join(timeout_s)
        else:
            self.close_socket()

    def stop(self) -> None:
        self.stop_event.set()

    # ---- the thread ------------------------------------------------------------------------
    def run(self) -> None:
        assert self._sock is not None
        sock = self._sock
        last_sent = time.monotonic()
        next_stats = time.monotonic() + self._stats_interval
        try:
            while True:
                try:
                    item = self._queue.get(timeout=min(0.1, self.cfg.heartbeat_s))
                except queue.Empty:
                    item = None
                now = time.monotonic()
                if item is not None:
                    if now > item.deadline:
                        self.stale += 1
                        self._on_stale(item.key)
                    else:
                        # A copy: the same body goes to every transport, each adds its own envelope.
                        body = dict(item.body)
                        if item.attachment is not None:
                            body["snapshot"] = {"format": "jpeg", "part": 2, "bytes": len(item.attachment)}
                        self._send(sock, topic_for(item), body, item.attachment)
                        last_sent = now
                elif self.stop_event.is_set():
                    break   # drained: everything accepted before stop went out
                if now - last_sent >= self.cfg.heartbeat_s:
                    self._send(sock, protocol.TOPIC_HEARTBEAT, {"type": protocol.TYPE_HEARTBEAT,
                                                               "host": self.host, "pid": os.getpid()})
                    last_sent = now
                if self._stats_provider is not None and now >= next_stats:
                    next_stats = now + self._stats_interval
                    try:
                        self._send(sock, protocol.TOPIC_STATS, {"type": protocol.TYPE_STATS,
                                                               **self._stats_provider()})
                    except Exception:  # stats are best effort; never kill the publisher
                        log.exception("building the stats message failed")
        except BaseException as exc:  # noqa: BLE001 - recorded for the supervisor
            self.error = exc
            log.error("publisher failed: %s", exc)
        finally:
            sock.close(linger=500)
            self._close_security()

    def _send(self, sock: zmq.Socket, topic: bytes, body: dict[str, Any], attachment: bytes | None = None) -> None:
        self._seq += 1
        body["v"] = protocol.PROTOCOL_VERSION
        body["seq"] = self._seq
        body["pub"] = self.publisher_id
        # Through a relay, many daemons share one stream: these say which box sent what.
        body["host"] = self.host
        body["origin"] = self.cfg.name or self.host
        cam = body.get("camera")
        if cam is not None:
            self._cam_seq[cam] = self._cam_seq.get(cam, 0) + 1
            body["cam_seq"] = self._cam_seq[cam]
        body["publish_ts"] = round(time.time(), 6)
        try:
            parts = protocol.encode(topic, body)
            if attachment is not None:
                parts.append(attachment)
            sock.send_multipart(parts, flags=zmq.NOBLOCK)
            self.sent += 1
            if body["type"] == protocol.TYPE_DETECTIONS:
                self.sent_detections[cam] = self.sent_detections.get(cam, 0) + 1
        except zmq.Again:
            # PUB drops silently at HWM; Again only appears on exotic transports. Count it.
            self.dropped += 1
