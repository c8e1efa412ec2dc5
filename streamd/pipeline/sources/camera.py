"""One decoder thread per camera, as a small state machine.

    connecting -> streaming -> (lost | stalled) -> backoff -> connecting ...
                          +-> ended (a file that does not loop)
    any state -> stopped

Nothing here blocks without a timeout: OpenCV's FFmpeg backend gets open/read timeouts,
waits are on the stop Event, and the supervisor flags a decoder that stops returning even
so (``check_stall``). Only this thread touches its ``cv2.VideoCapture``.

The module runs a little over 400 lines on purpose: every transition of the state machine
(opening in process or as a child, reading a stream or a file, retiring) happens here, so
one thread's life reads in one place; the child process, its presets and the RTSP probe
live in their own modules.
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np

from ...config import CameraConfig, SourceDefaults
from ...entities import Frame
from ..queues import RingQueue
from ...redact import scrub
from . import ffmpeg_errors
from .child import ChildCapture
from .presets import DecoderChoice
from .rtsp_probe import diagnose

log = logging.getLogger("streamd.source")

# OpenCV reads this when a capture opens; the transport is per camera, so an open with a
# non-default transport swaps it under a lock (all-TCP configs never take the lock).
_FFMPEG_ENV = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
# FFmpeg studies 5 s of a stream by default before the open returns; one second is plenty
# for a single video stream and makes (re)connecting several seconds faster.
_PROBE_OPTIONS = "analyzeduration;1000000"
_DEFAULT_FFMPEG_OPTIONS = f"rtsp_transport;tcp|{_PROBE_OPTIONS}"
_open_lock = threading.Lock()
_DECODE_WARN_EVERY_S = 10.0
# Each decoder instance is numbered: a reload that changes or re-adds a camera starts a new
# one, and health names it, so a subscriber tells a successor from a predecessor.
_instances = itertools.count(1)


def configure_ffmpeg_defaults() -> None:
    """TCP for RTSP unless the user set their own options; quiet FFmpeg/OpenCV logs
    (their messages can carry URLs with credentials)."""
    os.environ.setdefault(_FFMPEG_ENV, _DEFAULT_FFMPEG_OPTIONS)
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    os.environ.setdefault("OPENCV_LOG_LEVEL", "SILENT")
    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    except AttributeError:  # pragma: no cover - very old OpenCV
        pass
    # OpenCV's own thread pool would split each small resize across every core and fight
    # the inference threads for them; one resize per frame on its own thread is cheaper.
    cv2.setNumThreads(1)


class State(str, enum.Enum):
    STARTING = "starting"
    CONNECTING = "connecting"
    STREAMING = "streaming"
    STALLED = "stalled"
    LOST = "lost"
    BACKOFF = "reconnecting"
    ENDED = "ended"
    STOPPED = "stopped"


@dataclass
class CameraStats:
    """Counters this camera's stages update; read by metrics and the stats message."""

    decoded: int = 0
    skipped: int = 0            # decoded but not converted: the scheduler would not take it in time
    dropped_fps_cap: int = 0
    dropped_too_old: int = 0
    inferred: int = 0
    published: int = 0
    reconnects: int = 0
    decode_errors: int = 0      # frames the decoder could not give (skipped; a file goes on after them)
    corrupt_frames: int = 0     # frames given with errors FFmpeg found and concealed (see ffmpeg_errors)
    state: str = State.STARTING.value
    state_since: float = field(default_factory=time.time)
    last_frame_mono: float = 0.0
    width: int = 0
    height: int = 0


HealthCallback = Callable[[str, str, str, str, int], None]   # camera_id, state, previous, reason, decoder


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Capped exponential backoff with jitter in [50%, 100%] of the step, so a fleet of
    cameras that dropped together doesn't reconnect in lock-step."""
    step = min(maximum, initial * (2 ** min(attempt, 30)))
    return step * (0.5 + 0.5 * rng.random())


class CameraSource(threading.Thread):
    def __init__(self, cam: CameraConfig, defaults: SourceDefaults, queue: RingQueue,
                 on_health: HealthCallback, decoder: DecoderChoice | None = None) -> None:
        super().__init__(name=f"cam-{cam.id}", daemon=True)
        self.cam = cam
        self.decoder = decoder or DecoderChoice("opencv")
        self.instance = next(_instances)
        self.defaults = defaults
        self.queue = queue
        self.stats = CameraStats()
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self._on_health = on_health
        self._rng = random.Random()
        self._frame_no = 0
        self._in_read_since = 0.0           # monotonic time a read began; 0 when not reading
        self._last_grab_mono = 0.0          # the last frame of this connection came then; 0: none yet
        self.in_native_open = False         # inside cv2.VideoCapture(...): cannot be interrupted
        self._stall_reported = False
        self._lock = threading.Lock()
        self._retired = False               # retire() ran: this instance announces nothing more
        self._stop_reason = "daemon stopping"
        self._decode_warned_at = -_DECODE_WARN_EVERY_S     # the first decode error is logged at once
        self._decode_errors_unlogged = 0

    # ---- state ------------------------------------------------------------------------
    @property
    def state(self) -> State:
        return State(self.stats.state)

    def _set_state(self, new: State, reason: str = "", retire: bool = False) -> None:
        reason = scrub(reason)
        # One lock over the change and its announcement (retire() takes it too): health leaves
        # in the order of the changes, and nothing follows a retired decoder's "stopped".
        with self._lock:
            if self._retired:   # a successor may own the camera id now: this one speaks no more
                return
            self._retired = retire
            old = self.stats.state
            if old == new.value and not reason:
                return
            self.stats.state = new.value
            self.stats.state_since = time.time()
            # Failures (lost, stalled, reconnecting, ended) at WARNING: `journalctl -p warning` shows them.
            level = logging.INFO if new in (State.STREAMING, State.CONNECTING, State.STOPPED) else logging.WARNING
            log.log(level, "camera state", extra={"camera": self.cam.id, "state": new.value, "previous": old,
                                                  "reason": reason or "-", "decoder": self.instance})
            try:
                self._on_health(self.cam.id, new.value, old, reason, self.instance)
            except Exception:  # a broken listener must not take the camera down
                log.exception("camera health listener failed", extra={"camera": self.cam.id})

    def check_stall(self, now: float | None = None) -> bool:
        """Supervisor hook: flag a stream whose last frame is older than the stall timeout
        (counted from that frame, not from the start of a read), returning reads or not."""
        now = time.monotonic() if now is None else now
        last = self._last_grab_mono
        if last and now - last > self.defaults.stall_timeout_s and not self._stall_reported \
                and self.state == State.STREAMING:
            self._stall_reported = True
            self._set_state(State.STALLED, f"no frame for {now - last:.1f}s"
                            + (" (decoder not returning)" if self._in_read_since else ""))
            return True
        return False

    def stop(self, reason: str = "daemon stopping") -> None:
        self._stop_reason = reason
        self.stop_event.set()

    def retire(self, reason: str) -> None:
        """Stop for good and announce ``stopped`` now, from the caller's thread: a decoder in
        a native read notices only later, when its last word would be a ghost's."""
        self.stop(reason)
        if self.is_alive():
            self._set_state(State.STOPPED, reason, retire=True)
        else:       # never started, or already said its last word (ended, died)
            with self._lock:
                self._retired = True

    # ---- thread -----------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - recorded for the supervisor
            self.error = exc
            log.error("camera thread failed", extra={"camera": self.cam.id,
                                                      "error": scrub(f"{type(exc).__name__}: {exc}")})
        finally:
            ffmpeg_errors.forget_this_thread()
            if self.stop_event.is_set():
                self._set_state(State.STOPPED, self._stop_reason)
            elif self.state != State.ENDED:
                self._set_state(State.STOPPED, "decoder thread ended" if self.error is None else
                                f"decoder thread died ({type(self.error).__name__})")

    def _run(self) -> None:
        attempt = 0
        while not self.stop_event.is_set():
            self._set_state(State.CONNECTING, f"opening {self.cam.safe_url}")
            began = time.monotonic()
            cap, reason = self._open()
            if cap is None:
                # The open's own timeout and a diagnosis probe add up: say what the attempt took.
                took = time.monotonic() - began
                if took >= 1:
                    reason += f"; gave up {took:.1f}s after the attempt began"
                self._backoff(attempt, reason)
                attempt += 1
                continue
            try:
                outcome, reason, got_frames = self._stream(cap)
            finally:
                self._last_grab_mono = 0.0
                cap.release()
            if got_frames:
                attempt = 0
            if outcome == "stop":
                return
            if outcome == "ended":
                self._set_state(State.ENDED, reason)
                return
            self._set_state(State.STALLED if outcome == "stalled" else State.LOST, reason)
            self._backoff(attempt, reason)
            attempt += 1

    def _backoff(self, attempt: int, reason: str) -> None:
        delay = backoff_delay(attempt, self.defaults.backoff_initial_s, self.defaults.backoff_max_s, self._rng)
        self.stats.reconnects += 1
        self._set_state(State.BACKOFF, f"{reason}; retry in {delay:.1f}s")
        self.stop_event.wait(delay)

    def _decode_error(self, what: str) -> None:
        """Count a frame the decoder could not give us; warn at most every
        ``_DECODE_WARN_EVERY_S`` so a broken stream cannot flood the journal."""
        self.stats.decode_errors += 1
        self._decode_errors_unlogged += 1
        now = time.monotonic()
        if now - self._decode_warned_at >= _DECODE_WARN_EVERY_S:
            log.warning("camera decode errors", extra={"camera": self.cam.id, "error": what,
                                                       "count": self._decode_errors_unlogged,
                                                       "total": self.stats.decode_errors})
            self._decode_warned_at = now
            self._decode_errors_unlogged = 0

    def _open(self) -> tuple[cv2.VideoCapture | ChildCapture | None, str]:
        if self.decoder.kind != "opencv":
            return self._open_child()
        self.in_native_open = True
        try:
            return self._open_capture()
        finally:
            self.in_native_open = False

    @property
    def blocked_in_decoder(self) -> bool:
        """Inside a native open or read that only its own timeout ends."""
        return self.in_native_open or bool(self._in_read_since)

    def _open_capture(self) -> tuple[cv2.VideoCapture | None, str]:
        kind = self.cam.kind
        url = self.cam.open_url()
        open_ms = int(self.defaults.open_timeout_s * 1000)
        read_ms = int(self.defaults.read_timeout_s * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, open_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, read_ms]
        if self.defaults.decoder_threads and hasattr(cv2, "CAP_PROP_N_THREADS"):
            params += [cv2.CAP_PROP_N_THREADS, self.defaults.decoder_threads]
        try:
            if kind == "usb":
                index = int(url.split(":", 1)[1]) if url.startswith("usb:") else url
                cap = cv2.VideoCapture(index, cv2.CAP_V4L2)
            elif kind == "rtsp" and self.cam.transport != "tcp":
                with _open_lock:
                    saved = os.environ.get(_FFMPEG_ENV)
                    os.environ[_FFMPEG_ENV] = f"rtsp_transport;{self.cam.transport}|{_PROBE_OPTIONS}"
                    try:
                        cap = cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)
                    finally:
                        if saved is None:
                            os.environ.pop(_FFMPEG_ENV, None)
                        else:
                            os.environ[_FFMPEG_ENV] = saved
            else:
                cap = cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)
        except cv2.error as exc:
            return None, scrub(f"decoder error while opening ({exc})")
        if self.defaults.count_corrupt_frames:     # after an open: OpenCV sets its own log callback then
            ffmpeg_errors.install()
        if cap.isOpened():
            return cap, ""
        cap.release()
        return None, self._why_not_opened(url)

    def _open_child(self) -> tuple[ChildCapture | None, str]:
        """Start a child decoder; it is killed if it reports no stream within the open timeout."""
        try:
            child = ChildCapture(self.cam, self.defaults, self.decoder)
        except (OSError, ValueError) as exc:
            return None, scrub(f"cannot start the {self.decoder.name} decoder ({exc})")
        if child.open(self.defaults.open_timeout_s, self.stop_event):
            return child, ""
        if self.stop_event.is_set():
            return None, "stopping"
        # An RTSP camera gets the same diagnosis as with OpenCV (refused, bad password, wrong
        # path); otherwise the child's own last error says most.
        why = self._why_not_opened(self.cam.open_url()) if self.cam.kind == "rtsp" else ""
        if why and not why.startswith("the camera answers"):
            return None, why
        return None, f"{self.decoder.name} decoder: {child.error or 'no stream'}"

    def _why_not_opened(self, url: str) -> str:
        """Why a decoder could not open the camera, in words a person can act on."""
        kind = self.cam.kind
        if kind == "rtsp":
            why = diagnose(url, timeout=min(5.0, self.defaults.open_timeout_s))
            if why == "reachable":
                why = "the camera answers but its stream could not be decoded"
            return why
        if kind == "file":
            return "the video file could not be opened (unsupported or corrupt)"
        return "could not be opened"

    def _skip_undecodable(self, cap: cv2.VideoCapture, skipped_to: float) -> float:
        """A failed grab inside a file is an undecodable frame, not the end (the index knows
        where that is): count it, seek past it. Returns the frame sought, or -1 at the end."""
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0.0
        # Never back: FFmpeg may report the failed frame's position as an earlier one.
        target = max(cap.get(cv2.CAP_PROP_POS_FRAMES) or 0.0, skipped_to) + 1
        if not 0 < target < count:
            return -1.0
        self._decode_error("undecodable frame in the file, skipped")
        return target if cap.set(cv2.CAP_PROP_POS_FRAMES, target) else -1.0

    def _stream(self, cap: cv2.VideoCapture) -> tuple[str, str, bool]:
        """Read until stop, end of stream, or failure: returns (outcome, reason, got_frames)."""
        is_file = self.cam.kind == "file"
        native_fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        pace = 1.0 / native_fps if (is_file and self.cam.realtime and 0 < native_fps < 1000) else 0.0
        cap_interval = 1.0 / self.cam.fps if self.cam.fps else 0.0
        next_due = 0.0          # monotonic time the next frame may be kept (fps cap)
        next_pace = time.monotonic()
        got_frames = False
        bad_in_row = 0
        frame_interval = 0.0    # smoothed time between two decoded frames
        last_grab = 0.0
        read_timeout = self.defaults.read_timeout_s
        opened = time.monotonic()
        skipped_to = -1.0       # the frame a failed grab in a file last skipped to
        while not self.stop_event.is_set():
            if pace:
                # Files replay at their own rate, like the camera that recorded them.
                delay = next_pace - time.monotonic()
                if delay > 0 and self.stop_event.wait(delay):
                    break
                next_pace = max(next_pace + pace, time.monotonic() - 1.0)
            t0 = time.monotonic()
            self._in_read_since = t0
            ffmpeg_before = ffmpeg_errors.errors_on_this_thread()
            try:
                ok = cap.grab()
            except cv2.error:
                ok = False
            finally:
                self._in_read_since = 0.0
            now = time.monotonic()
            if not ok:
                if is_file and got_frames:
                    skipped_to = self._skip_undecodable(cap, skipped_to)
                    if skipped_to >= 0:
                        continue
                    if self.cam.loop and cap.set(cv2.CAP_PROP_POS_FRAMES, 0):
                        continue
                    return ("ended" if not self.cam.loop else "lost"), "end of file", got_frames
                if now - t0 >= 0.8 * read_timeout:
                    # Since the last frame, not since this read began: that is what went missing.
                    return "stalled", f"no frame for {now - (last_grab or opened):.1f}s (stream stalled)", got_frames
                return "lost", "stream ended or connection dropped", got_frames
            if last_grab:
                gap = now - last_grab
                frame_interval = gap if not frame_interval else 0.9 * frame_interval + 0.1 * gap
            last_grab = self._last_grab_mono = now
            if ffmpeg_errors.errors_on_this_thread() != ffmpeg_before:
                self.stats.corrupt_frames += 1
            if cap_interval:
                if now < next_due:
                    self.stats.dropped_fps_cap += 1
                    continue
                # Schedule from the ideal time, not from now, so the average rate holds;
                # after a gap (first frame, reconnect) start afresh instead of bursting.
                next_due = next_due + cap_interval if now - next_due < cap_interval else now + cap_interval
            # Every packet must be decoded (H.264/H.265 frames depend on each other), but a
            # frame the scheduler will not take before a newer one arrives need not be
            # converted to BGR and copied: pull it only when its slot will be taken.
            if got_frames and not self.queue.wants_frame(now, frame_interval):
                self.stats.skipped += 1
                continue
            try:
                ok, image = cap.retrieve()
            except cv2.error:
                ok, image = False, None
            if not ok or image is None or image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
                self._decode_error("broken frame")
                bad_in_row += 1
                if bad_in_row >= 50:
                    return "lost", "decoder keeps returning broken frames", got_frames
                continue
            bad_in_row = 0
            if image.dtype != np.uint8:
                self._decode_error(f"frame of {image.dtype}, not 8-bit")
                continue
            # A child decoder scales in the decoder: the frame keeps the camera's own size so
            # boxes come out in the camera's pixels.
            source_size = getattr(cap, "source_size", None)
            if not got_frames:
                got_frames = True
                w, h = source_size or (image.shape[1], image.shape[0])
                self.stats.width, self.stats.height = w, h
                self._stall_reported = False
                self._set_state(State.STREAMING, f"connected {w}x{h}"
                                + (f" @ {native_fps:.1f} fps" if 0 < native_fps < 1000 else "")
                                + ("" if source_size is None else
                                   f" ({self.decoder.name}, {image.shape[1]}x{image.shape[0]} to the model)"))
            elif self._stall_reported:
                self._stall_reported = False
                self._set_state(State.STREAMING, "frames flowing again")
            self._frame_no += 1
            self.stats.decoded += 1
            self.stats.last_frame_mono = now
            self.queue.put(Frame(self.cam.id, self._frame_no, time.time(), now, image, source_size))
        return "stop", "", got_frames
