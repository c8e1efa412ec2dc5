"""The systemd notify protocol (``sd_notify``) and a health-gated watchdog, stdlib only.

systemd hands a ``Type=notify`` service a datagram socket in ``$NOTIFY_SOCKET``; the service
reports ``READY=1`` when it is serving, ``RELOADING=1``/``STOPPING=1`` around reloads and
shutdown, free-form ``STATUS=`` lines for ``systemctl status``, and ``WATCHDOG=1`` keep-alives
when the unit sets ``WatchdogSec=``.

Everything here is best effort: the daemon must run the same with or without systemd, so a
missing socket makes every call a no-op and a failing send is logged once, never raised.
Nothing reads the environment at import time; a ``Notifier`` reads it when it is built.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("streamd.service")

HealthCheck = Callable[[], tuple[bool, str]]

# STATUS= is one line of a newline-separated assignment list: anything longer than this is not
# useful in "systemctl status" and only risks the datagram being refused.
_MAX_STATUS_CHARS = 1024

# While unhealthy, the health check runs this often (or every interval, if that is shorter).
_UNHEALTHY_RECHECK_S = 1.0


def _monotonic_usec() -> int:
    # systemd compares this with its own CLOCK_MONOTONIC reading to tell a fresh RELOADING=1
    # from a stale one, so it must be that exact clock (time.monotonic() does not promise it).
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _one_line(text: str) -> str:
    # A newline inside a value would start a new assignment: "x\nREADY=1" must not turn a
    # status text into a readiness report.
    flat = " ".join(text.splitlines())
    return flat[:_MAX_STATUS_CHARS]


def _socket_address(value: str) -> str | None:
    """``NOTIFY_SOCKET`` as an AF_UNIX address, or None when it is not one we can use."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        # Abstract namespace: a leading NUL instead of the '@' systemd writes for readability.
        return "\0" + value[1:]
    return None


class Notifier:
    """Sends ``sd_notify`` messages to the socket systemd gave this process.

    Safe to call from any thread. Every method returns True when a datagram went out, False
    when there was nothing to send to or the send failed; none of them raises or blocks.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._send_failed_logged = False
        self._closed = False

        raw = env.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(raw) if raw else None
        if raw and self._address is None:
            # systemd >= 254 can also hand out vsock addresses; those are for VMs, not us.
            log.warning("NOTIFY_SOCKET=%r is not a unix socket address; systemd notifications are off", raw)

        self._watchdog_usec = self._parse_watchdog(env)

    @staticmethod
    def _parse_watchdog(env: Mapping[str, str]) -> int | None:
        raw_usec = env.get("WATCHDOG_USEC", "")
        if not raw_usec:
            return None
        try:
            usec = int(raw_usec)
        except ValueError:
            log.warning("WATCHDOG_USEC=%r is not a number; watchdog pings are off", raw_usec)
            return None
        if usec <= 0:
            return None
        raw_pid = env.get("WATCHDOG_PID", "")
        if raw_pid:
            # The variables are inherited by children: a process systemd did not start must not
            # keep the service alive on the real daemon's behalf.
            try:
                pid = int(raw_pid)
            except ValueError:
                log.warning("WATCHDOG_PID=%r is not a number; watchdog pings are off", raw_pid)
                return None
            if pid != os.getpid():
                return None
        return usec

    # ---- what the daemon calls ----------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        """True when systemd gave us a notify socket."""
        return self._address is not None and not self._closed

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send ``WATCHDOG=1``: half the unit's ``WatchdogSec=``, as systemd
        recommends, so one late ping is not yet a timeout. None when no watchdog is ours."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    def ready(self, status: str = "") -> bool:
        """Start-up is complete: the model is loaded and the publisher is bound."""
        return self._send("READY=1", status)

    def reloading(self) -> bool:
        """A configuration reload begins. MONOTONIC_USEC is what systemd >= 253 expects for
        ``Type=notify-reload``; older versions ignore it."""
        return self._send("RELOADING=1", "", f"MONOTONIC_USEC={_monotonic_usec()}")

    def ready_after_reload(self, status: str = "") -> bool:
        """The reload finished, successfully or not: the daemon is serving again."""
        return self._send("READY=1", status)

    def stopping(self, status: str = "") -> bool:
        """Shutdown has begun; systemd stops expecting watchdog pings."""
        return self._send("STOPPING=1", status)

    def status(self, text: str) -> bool:
        """One line for ``systemctl status``."""
        return self._send("", text)

    def watchdog(self) -> bool:
        """One keep-alive ping; does nothing unless the watchdog is configured for us."""
        if self._watchdog_usec is None:
            return False
        return self._send("WATCHDOG=1", "")

    def extend_timeout(self, seconds: float, status: str = "") -> bool:
        """Ask for ``seconds`` more before the current start/stop/reload timeout fires, e.g.
        while a TensorRT engine is built at start-up. Repeat before it runs out."""
        usec = max(1, int(seconds * 1_000_000))
        return self._send(f"EXTEND_TIMEOUT_USEC={usec}", status)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    # ---- the wire -------------------------------------------------------------------------------
    def _send(self, head: str, status: str, *extra: str) -> bool:
        lines = [line for line in (head, *extra) if line]
        if status:
            lines.append(f"STATUS={_one_line(status)}")
        if not lines or self._address is None:
            return False
        payload = ("\n".join(lines) + "\n").encode("utf-8", "replace")
        with self._lock:
            if self._closed:
                return False
            try:
                if self._sock is None:
                    # CLOEXEC: decoder or helper processes must not inherit a way to talk to
                    # systemd. Non-blocking: a stalled manager must never stall the daemon; a
                    # full queue loses this one message instead.
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    self._sock.setblocking(False)
                self._sock.sendto(payload, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, self._address)
                return True
            except OSError as exc:
                self._log_send_error(exc, lines[0])
                return False

    def _log_send_error(self, exc: OSError, first: str) -> None:
        # A manager that went away would otherwise log on every watchdog tick.
        if not self._send_failed_logged:
            self._send_failed_logged = True
            log.warning("systemd notification %r failed (%s); further failures are logged at debug level",
                        first, exc)
        else:
            log.debug("systemd notification %r failed: %s", first, exc)


class Watchdog(threading.Thread):
    """Pings ``WATCHDOG=1`` every ``watchdog_interval_s`` while ``healthy()`` says so.

    ``healthy()`` returns ``(ok, reason)``. While it returns False (or raises), the pings stop
    and ``STATUS=<reason>`` is sent once, so systemd kills and restarts the daemon after
    ``WatchdogSec=``: a hung inference call cannot be cancelled from inside the process, a
    restart is the only cure. While unhealthy it asks again every second; if the answer turns
    healthy before systemd gives up, a ping goes out at once, the schedule restarts from there,
    and the reason given with the healthy answer (or "running") becomes the status line. A
    healthy answer whose reason changed (a degraded state, such as a camera being restarted,
    and its end) is sent as the status line too, the pings going on.

    ``healthy()`` runs on this thread and must not block; if it ever does, the pings stop too,
    which is the safe failure. Without a configured watchdog the thread exits at once.
    """

    def __init__(self, notifier: Notifier, healthy: HealthCheck, *, name: str = "sd-watchdog") -> None:
        super().__init__(name=name, daemon=True)
        self.notifier = notifier
        self.healthy = healthy
        self.interval_s = notifier.watchdog_interval_s
        self.stop_event = threading.Event()
        self.pings = 0
        self.unhealthy_since: float | None = None   # monotonic, None while healthy
        self._healthy_reason: str | None = None     # the last healthy answer's reason

    def run(self) -> None:
        interval = self.interval_s
        if interval is None or not self.notifier.enabled:
            return
        next_ping = time.monotonic()
        while not self.stop_event.is_set():
            ok, reason = self._check()
            now = time.monotonic()
            if ok:
                if self.notifier.watchdog():
                    self.pings += 1
                if self.unhealthy_since is not None:
                    log.warning("healthy again after %.1f s: watchdog pings resume", now - self.unhealthy_since)
                    self.unhealthy_since = None
                    self.notifier.status(reason or "running")
                elif self._healthy_reason is not None and reason != self._healthy_reason:
                    # Healthy but degraded, or no longer (a camera being restarted): the
                    # status line follows without the pings stopping.
                    self.notifier.status(reason or "running")
                self._healthy_reason = reason
                # A fixed schedule rather than "interval after the last ping", so a slow health
                # check does not push pings later and later. If this thread was held up for
                # more than an interval, start afresh instead of sending the missed pings back
                # to back.
                next_ping += interval
                if next_ping <= now:
                    next_ping = now + interval
                self.stop_event.wait(next_ping - now)
            else:
                if self.unhealthy_since is None:
                    self.unhealthy_since = now
                    log.error("unhealthy: %s; watchdog pings stop, systemd will restart the service", reason)
                    self.notifier.status(f"unhealthy: {reason}")
                # Look again soon rather than one full interval later: after a short blip
                # (a pipeline being swapped during a reload) the next ping must still reach
                # systemd well before WatchdogSec runs out, and it goes out at once.
                next_ping = now
                self.stop_event.wait(min(interval, _UNHEALTHY_RECHECK_S))

    def _check(self) -> tuple[bool, str]:
        try:
            ok, reason = self.healthy()
        except Exception as exc:  # noqa: BLE001 - a broken check must stop the pings, not the thread
            return False, f"health check failed: {type(exc).__name__}: {exc}"
        return bool(ok), str(reason)

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop pinging and join; True when the thread has ended."""
        self.stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)
        return not self.is_alive()
