"""The subscriber loop behind ``streamd alert -c RULES.yaml``: subscribe to a daemon and raise
alerts by rules (the command's arguments are in ``streamd.cli.alert``).

Events go to the configured sinks; standard output carries only event JSON lines (one per
line), and logs go to standard error, so ``streamd alert ... | jq`` works.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import Event
    from .rules import AlertConfig
    from .sinks import TextOut

log = logging.getLogger("streamd.alert")

# How many queued messages one loop turn handles before checking the clock again: keeps
# silence detection and stop requests responsive under a burst.
BURST = 500
POLL_MS = 100
CLOSE_S = 5.0   # at exit, how long queued webhook/command deliveries may still take


class AlertRunner:
    """The subscriber loop: socket -> engine -> snapshots -> sinks."""

    def __init__(self, cfg: AlertConfig, endpoint: str | None = None, snapshots_dir: Path | None = None,
                 out: TextOut | None = None, server_key: Path | None = None, client_key: Path | None = None) -> None:
        from ..client.subscriber import curve_client_keys
        from .engine import AlertEngine
        from .sinks import build_sinks
        self.cfg = cfg
        self.endpoint = endpoint or cfg.endpoint
        # Keys from the command line replace the file's as a pair; loaded now so a bad key
        # file stops the command before anything starts.
        if server_key is not None or client_key is not None:
            self.curve = curve_client_keys(server_key, client_key)
        else:
            self.curve = curve_client_keys(cfg.server_key, cfg.client_key)
        self.snapshots_dir = snapshots_dir if snapshots_dir is not None else cfg.snapshots_dir
        self.engine = AlertEngine(cfg)
        self.sinks = build_sinks(cfg.sinks, out if out is not None else sys.stdout)
        self.received = 0
        self.invalid = 0
        self.stop_event = threading.Event()

    def handle(self, event: Event) -> None:
        # The snapshot is written here, on the subscriber thread, because its path belongs
        # in the alert before any sink sees it; cooldowns keep alerts (and so this) rare.
        if event.kind == "alert" and self.snapshots_dir is not None:
            from .snapshots import save_alert_snapshot
            try:
                path = save_alert_snapshot(event, self.snapshots_dir)
            except OSError as exc:
                log.warning("cannot save the snapshot for rule %s: %s", event.data.get("rule"), exc)
                path = None
            if path is not None:
                event.data["snapshot"] = str(path)
        d = event.data
        if event.kind == "alert":
            log.info("alert", extra={"rule": d["rule"], "camera": d["camera"], "frame": d["frame"],
                                     "count": d["count"]})
        else:
            log.info(event.kind, extra={k: v for k, v in d.items() if k not in ("event", "time")})
        for sink in self.sinks:
            if sink.accepts(event.kind):
                sink.emit(d)

    def run(self, until: float | None = None) -> int:
        """Run until ``stop_event`` is set (or the monotonic time ``until``); returns 0."""
        import zmq

        from .. import protocol
        from ..errors import StreamdError
        ctx = zmq.Context()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, 100000)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")   # everything: health and heartbeats matter as much as detections
        if self.curve is not None:
            from ..security import apply_client
            apply_client(sock, *self.curve)
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            ctx.term()
            self._close_sinks(0.0)
            raise StreamdError(f"cannot connect to {self.endpoint}: {exc}") from None
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        log.info("alert: listening to %s%s; %d rule(s); sinks: %s; snapshots: %s", self.endpoint,
                 " (CURVE)" if self.curve is not None else "",
                 len([r for r in self.cfg.rules if r.enabled]), ", ".join(s.name for s in self.sinks) or "none",
                 self.snapshots_dir or "off")
        try:
            while not self.stop_event.is_set() and (until is None or time.monotonic() < until):
                if poller.poll(POLL_MS):
                    for _ in range(BURST):
                        try:
                            parts = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self.received += 1
                        try:
                            topic, body = protocol.decode(parts)
                        except protocol.ProtocolError as exc:
                            self.invalid += 1
                            log.warning("invalid message: %s", exc)
                            topic, body = "!invalid", {"type": "invalid", "error": str(exc)}
                        for event in self.engine.feed(topic, body):
                            self.handle(event)
                for event in self.engine.tick():
                    self.handle(event)
        finally:
            sock.close(0)
            ctx.term()
            self._close_sinks(CLOSE_S)
            e = self.engine
            log.info("alert: stopped; %d messages, %d alerts, %d lost; %s", e.messages, e.alerts, e.lost,
                     "; ".join(f"{s.name}: " + ", ".join(f"{k} {v}" for k, v in s.stats().items())
                               for s in self.sinks) or "no sinks")
        return 0

    def _close_sinks(self, timeout_s: float) -> None:
        # One deadline for all: a dead webhook must not add its own wait to every other sink's.
        deadline = time.monotonic() + timeout_s
        for sink in self.sinks:
            sink.close(timeout_s=max(0.0, deadline - time.monotonic()))


def run_alert(config: str | Path, endpoint: str | None = None, snapshots_dir: Path | None = None,
              out: TextOut | None = None, until: float | None = None,
              server_key: Path | None = None, client_key: Path | None = None) -> int:
    """Load the rules and run until SIGINT/SIGTERM (or the monotonic time ``until``)."""
    from .rules import load_rules
    cfg = load_rules(config)
    runner = AlertRunner(cfg, endpoint, snapshots_dir, out, server_key, client_key)
    restore: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        def stop(signum: int, frame: FrameType | None) -> None:
            runner.stop_event.set()
        for sig in (signal.SIGINT, signal.SIGTERM):
            restore[sig] = signal.signal(sig, stop)
    try:
        return runner.run(until=until)
    finally:
        for signum, handler in restore.items():
            signal.signal(signum, handler)
