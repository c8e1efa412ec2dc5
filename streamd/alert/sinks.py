"""Where alerts go: standard output, HTTP webhooks, local programs.

The subscriber thread must keep up with the daemon (a slow reader loses messages at the
ZeroMQ high-water mark), so a sink that can be slow - a webhook behind a flaky network, a
program that hangs - gets its own thread and a bounded queue. ``emit`` only appends; when
the queue is full the *oldest* waiting event is dropped and counted, since the newest one
says the most about what is happening now.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from typing import Any, Iterable, Protocol

from .. import __version__
from ..redact import redact_url, scrub
from .rules import CommandSinkConfig, SinksConfig, WebhookSinkConfig

log = logging.getLogger("streamd.alert")


class TextOut(Protocol):
    """Where the stdout sink writes: sys.stdout, or anything with write and flush."""

    def write(self, text: str, /) -> int: ...

    def flush(self) -> None: ...


def to_json(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"), allow_nan=False, default=str)


class Sink:
    name = "sink"

    def __init__(self, events: Iterable[str] | None = None) -> None:
        self.events = frozenset(events) if events is not None else None
        self.delivered = 0
        self.failed = 0
        self.dropped = 0

    def accepts(self, kind: str) -> bool:
        return self.events is None or kind in self.events

    def emit(self, event: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what is still waiting for at most ``timeout_s``, then stop."""

    def stats(self) -> dict[str, int]:
        return {"delivered": self.delivered, "failed": self.failed, "dropped": self.dropped}


class StdoutSink(Sink):
    """One JSON object per line, flushed at once so a pipe reader sees each alert as it happens."""

    name = "stdout"

    def __init__(self, out: TextOut, events: Iterable[str] | None = None) -> None:
        super().__init__(events)
        self.out = out
        self._lock = threading.Lock()
        self._broken = False

    def emit(self, event: dict[str, Any]) -> None:
        if self._broken:
            self.dropped += 1
            return
        line = to_json(event) + "\n"
        with self._lock:
            try:
                self.out.write(line)
                self.out.flush()
                self.delivered += 1
            except (BrokenPipeError, ValueError) as exc:   # reader went away / stream closed
                self._broken = True
                self.failed += 1
                log.warning("stdout sink stopped: %s", exc)


class QueuedSink(Sink):
    """A sink whose deliveries run on their own thread behind a bounded, drop-oldest queue."""

    def __init__(self, name: str, queue_size: int, events: Iterable[str] | None = None) -> None:
        super().__init__(events)
        self.name = name
        self.queue_size = queue_size
        self._queue: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition()
        self._stopping = False     # no more waiting for new events: drain, then end
        self._abandon = False      # stop now, even mid-retry
        self._busy = False
        self._last_drop_log = 0.0
        self._thread = threading.Thread(target=self._run, name=f"alert-{name}", daemon=True)
        self._thread.start()

    def emit(self, event: dict[str, Any]) -> None:
        with self._cond:
            if len(self._queue) >= self.queue_size:
                self._queue.popleft()
                self.dropped += 1
                now = time.monotonic()
                if now - self._last_drop_log >= 10:
                    self._last_drop_log = now
                    log.warning("%s: queue full (%d), dropping the oldest events (%d dropped so far)",
                                self.name, self.queue_size, self.dropped)
            self._queue.append(event)
            self._cond.notify_all()

    def pending(self) -> int:
        """Events waiting plus the one being delivered."""
        with self._cond:
            return len(self._queue) + (1 if self._busy else 0)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue) or self._stopping)
                if self._abandon or not self._queue:
                    return
                event = self._queue.popleft()
                self._busy = True
            try:
                ok = self._deliver(event)
            except Exception:   # a bug in one delivery must not end the sink's thread
                log.exception("%s: delivery failed", self.name)
                ok = False
            with self._cond:
                self._busy = False
                if ok:
                    self.delivered += 1
                else:
                    self.failed += 1
                self._cond.notify_all()

    def _pause(self, seconds: float) -> bool:
        """Wait between retries; False when the sink is being abandoned meanwhile."""
        with self._cond:
            return not self._cond.wait_for(lambda: self._abandon, timeout=seconds)

    def _deliver(self, event: dict[str, Any]) -> bool:
        raise NotImplementedError

    def _on_abandon(self) -> None:
        """Interrupt a delivery in progress (close ran out of time)."""

    def close(self, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._queue and not self._busy, timeout=max(0.0, timeout_s))
            left = len(self._queue) + (1 if self._busy else 0)
            self._abandon = True
            self._cond.notify_all()
        if left:
            log.warning("%s: %d event(s) not delivered at exit", self.name, left)
        self._on_abandon()
        self._thread.join(max(0.1, deadline - time.monotonic()))


class WebhookSink(QueuedSink):
    """POST each event as JSON; retry connection errors, timeouts, 408, 429 and 5xx with
    exponential backoff (other 4xx mean the request itself is wrong: no retry)."""

    def __init__(self, cfg: WebhookSinkConfig) -> None:
        self.cfg = cfg
        self.attempts = 0
        self.safe_url = redact_url(cfg.url)
        super().__init__(f"webhook {self.safe_url}", cfg.queue_size, cfg.events)

    def _deliver(self, event: dict[str, Any]) -> bool:
        data = to_json(event).encode()
        headers = {"Content-Type": "application/json", "User-Agent": f"streamd-alert/{__version__}",
                   **self.cfg.headers}
        error = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                delay = min(self.cfg.backoff_max_s, self.cfg.backoff_initial_s * 2 ** (attempt - 1))
                if not self._pause(delay):
                    return False
            self.attempts += 1
            try:
                req = urllib.request.Request(self.cfg.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                    resp.read()
                return True
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code} {exc.reason}"
                if exc.code < 500 and exc.code not in (408, 429):
                    log.warning("%s: %s for %s event; not retrying", self.name, error, event.get("event"))
                    return False
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                error = scrub(str(reason) or type(exc).__name__)
            log.info("%s: try %d of %d failed (%s)", self.name, attempt + 1, self.cfg.retries + 1, error)
        log.warning("%s: gave up on a %s event after %d tries (%s)", self.name, event.get("event"),
                    self.cfg.retries + 1, error)
        return False


class CommandSink(QueuedSink):
    """Run a program per event, the event JSON on its stdin; never through a shell, so
    nothing in an event (a rule or camera name) can become a command."""

    def __init__(self, cfg: CommandSinkConfig) -> None:
        self.cfg = cfg
        self._proc: subprocess.Popen[bytes] | None = None
        self._proc_lock = threading.Lock()
        super().__init__(f"command {os.path.basename(cfg.argv[0])}", cfg.queue_size, cfg.events)

    def _kill(self, proc: subprocess.Popen[bytes]) -> None:
        # Started in its own process group: killing the group ends whatever the program started too.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _deliver(self, event: dict[str, Any]) -> bool:
        env = {**os.environ, "STREAMD_EVENT": str(event.get("event", "")),
               "STREAMD_RULE": str(event.get("rule", "")), "STREAMD_CAMERA": str(event.get("camera", ""))}
        try:
            with self._proc_lock:
                if self._abandon:
                    return False
                proc = self._proc = subprocess.Popen(
                    self.cfg.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    env=env, start_new_session=True, close_fds=True)
        except OSError as exc:
            log.warning("%s: cannot run %s (%s)", self.name, self.cfg.argv[0], exc)
            return False
        try:
            output, _ = proc.communicate((to_json(event) + "\n").encode(), timeout=self.cfg.timeout_s)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            try:
                proc.communicate(timeout=2)
            except subprocess.TimeoutExpired:
                proc.wait()
            log.warning("%s: still running after %.1fs; killed", self.name, self.cfg.timeout_s)
            return False
        finally:
            with self._proc_lock:
                self._proc = None
        tail = scrub(output.decode(errors="replace").strip()[-500:])
        if proc.returncode != 0:
            log.warning("%s: exited with status %d%s", self.name, proc.returncode, f": {tail}" if tail else "")
            return False
        if tail:
            log.debug("%s: %s", self.name, tail)
        return True

    def _on_abandon(self) -> None:
        with self._proc_lock:
            if self._proc is not None and self._proc.poll() is None:
                self._kill(self._proc)


def build_sinks(cfg: SinksConfig, out: TextOut) -> list[Sink]:
    sinks: list[Sink] = [StdoutSink(out)] if cfg.stdout else []
    sinks += [WebhookSink(w) for w in cfg.webhooks]
    sinks += [CommandSink(c) for c in cfg.commands]
    return sinks
