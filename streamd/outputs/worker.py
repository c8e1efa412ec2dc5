"""What every broker output shares: a bounded drop-oldest queue, one thread that owns the
connection, reconnects with capped backoff and drains on close.

The caller's side (:meth:`QueuedOutput.offer`) only appends to a deque under a lock: it never
waits for the broker. While the broker is away the queue keeps the newest ``queue_size``
messages; older ones are dropped and counted. Subclasses implement the connection
(:meth:`_open`, :meth:`_serve`, :meth:`_release`) and run entirely in this thread.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time
from collections import deque

from .. import protocol
from ..redact import scrub
from .base import Outbound

log = logging.getLogger("streamd.outputs")


class ConnectionLost(Exception):
    """Raised by :meth:`QueuedOutput._serve` when the broker connection ended."""


def capped_backoff(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Exponential, capped, jittered to 50-100% of the step so boxes that lost the same broker
    do not all come back in the same instant."""
    return min(maximum, initial * 2 ** min(attempt, 30)) * (0.5 + 0.5 * rng.random())


class QueuedOutput(threading.Thread):
    """An :class:`~streamd.outputs.base.Output` whose connection lives in this thread."""

    name: str

    def __init__(self, name: str, origin: str, queue_size: int, backoff_initial_s: float,
                 backoff_max_s: float) -> None:
        # The thread's name is the output's name (the Output protocol's ``name``): "mqtt", "redis".
        super().__init__(name=name, daemon=True)
        self.origin = origin
        self.host = socket.gethostname()
        self.stop_event = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._queue: deque[Outbound] = deque()
        self._queue_size = queue_size
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._rng = random.Random()
        self._close_deadline = float("inf")
        self._seq = 0
        self.connected = False
        self.sent = 0
        self.dropped = 0        # lost before the broker took them: queue full, connection lost
        self.stale = 0          # detections older than their deadline when their turn came
        self.reconnects = 0
        self.last_error: str | None = None
        self._bad_body_logged = False

    # ---- the caller's side (any thread) ----------------------------------------------------------
    def offer(self, msg: Outbound) -> None:
        if not self.wants(msg):
            return
        with self._lock:
            if len(self._queue) >= self._queue_size:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(msg)
        self._wake.set()

    def close(self, timeout_s: float = 2.0) -> None:
        self._close_deadline = time.monotonic() + timeout_s
        self.stop_event.set()
        self._wake.set()
        if self.is_alive():
            # A little beyond the deadline: the goodbye (MQTT's offline) follows the drain. A
            # thread still inside a connect attempt is a daemon thread: it cannot hold the exit.
            self.join(timeout_s + 0.5)

    def counters(self) -> dict[str, int]:
        with self._lock:
            queued = len(self._queue)
        return {"sent": self.sent, "dropped": self.dropped, "stale": self.stale,
                "reconnects": self.reconnects, "connected": int(self.connected), "queued": queued}

    # ---- for subclasses ----------------------------------------------------------------------------
    def wants(self, msg: Outbound) -> bool:
        """Whether ``msg`` is for this output at all (not counted either way)."""
        return True

    def take(self, limit: int) -> list[Outbound]:
        """Up to ``limit`` queued messages, oldest first; those past their deadline are
        counted as stale and left out."""
        out: list[Outbound] = []
        now = time.monotonic()
        with self._lock:
            while self._queue and len(out) < limit:
                msg = self._queue.popleft()
                if now > msg.deadline:
                    self.stale += 1
                else:
                    out.append(msg)
        return out

    def put_back(self, msgs: list[Outbound]) -> None:
        """Return messages a lost connection did not deliver to the front of the queue (the
        bound still holds: what no longer fits is the oldest, and is dropped)."""
        with self._lock:
            self._queue.extendleft(reversed(msgs))
            while len(self._queue) > self._queue_size:
                self._queue.popleft()
                self.dropped += 1

    def draining_done(self) -> bool:
        """Stopping, and either everything went out or the close deadline passed."""
        if not self.stop_event.is_set():
            return False
        with self._lock:
            empty = not self._queue
        return empty or time.monotonic() >= self._close_deadline

    def wait_for_work(self, timeout: float) -> None:
        self._wake.wait(timeout)
        self._wake.clear()

    def encode(self, msg: Outbound) -> str | None:
        """The body as JSON, with what a reader of any transport needs to tell boxes and gaps
        apart; None (dropped, counted, said once) for a body JSON cannot carry (NaN, bytes)."""
        self._seq += 1
        body = {**msg.body, "v": protocol.PROTOCOL_VERSION, "origin": self.origin, "host": self.host,
                "seq": self._seq, "publish_ts": round(time.time(), 6)}
        try:
            return json.dumps(body, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            self.dropped += 1
            if not self._bad_body_logged:
                log.error("output=%s cannot encode a %s message (%s); such messages are dropped",
                          self.name, msg.kind, exc)
                self._bad_body_logged = True
            return None

    def _open(self) -> None:
        """Connect; raise on failure (the message is logged, scrubbed)."""
        raise NotImplementedError

    def _serve(self) -> None:
        """Send until :meth:`draining_done`; raise :class:`ConnectionLost` when the link dies."""
        raise NotImplementedError

    def _release(self, clean: bool) -> None:
        """Close the connection (``clean``: after a drained stop, say goodbye properly)."""
        raise NotImplementedError

    def _where(self) -> str:
        raise NotImplementedError

    # ---- the thread ---------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - a bug here must not pass silently
            log.exception("output=%s thread failed: %s", self.name, scrub(str(exc)))
            self.connected = False

    def _run(self) -> None:
        attempt = 0
        ever_connected = False
        while not self.stop_event.is_set() or (self.connected and not self.draining_done()):
            try:
                self._open()
            except Exception as exc:  # noqa: BLE001 - any failure to connect is retried
                self._release(clean=False)
                delay = capped_backoff(attempt, *self._backoff, self._rng)
                attempt += 1
                self._note_error(f"cannot connect to {self._where()}: {exc}; retry in {delay:.1f}s",
                                 first=attempt == 1)
                self.stop_event.wait(delay)
                continue
            self.connected = True
            if ever_connected:
                self.reconnects += 1
            ever_connected, attempt = True, 0
            log.info("output=%s connected to %s", self.name, self._where())
            try:
                self._serve()
                self._release(clean=True)
                self.connected = False
                break
            except Exception as exc:  # noqa: BLE001 - the link died: reconnect
                self.connected = False
                self._release(clean=False)
                self._note_error(f"connection to {self._where()} lost: {exc}", first=True)
        with self._lock:
            left = len(self._queue)
            self._queue.clear()
            self.dropped += left
        if left:
            log.warning("output=%s stopped with %d message(s) unsent (broker unreachable)", self.name, left)

    def _note_error(self, text: str, first: bool) -> None:
        text = scrub(text)
        # The first failure of an outage is a warning; its repeats while it lasts are debug noise.
        log.log(logging.WARNING if first else logging.DEBUG, "output=%s %s", self.name, text)
        self.last_error = text
