"""A decoder in a child process (FFmpeg or gst-launch) that writes raw BGR frames to a pipe.

``ChildCapture`` offers the calls of ``cv2.VideoCapture`` the camera thread uses (``grab``,
``retrieve``, ``get``, ``set``, ``release``), so ``camera.CameraSource`` runs its one state machine
(timeouts, stall detection, reconnect backoff) over either decoder. What the child process adds:
every wait here is a ``select`` with a deadline, and a child that hangs (in a native open, or
stopped) is killed by its PID, which an in-process decoder cannot be.

The pipe protocol is written here because no library reads a raw-video pipe with deadlines and
kills its producer; the child's text output is parsed only for the stream's sizes and errors.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import select
import selectors
import signal
import subprocess
import threading
import time
from collections import deque

import cv2
import numpy as np

from ...config import CameraConfig, SourceDefaults
from ...redact import scrub
from .presets import DecoderChoice, StreamInfo, ffmpeg_command, gstreamer_command

log = logging.getLogger("streamd.source")

_KILL_WAIT_S = 1.0
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_PIPE_MAX = 1 << 20                         # /proc/sys/fs/pipe-max-size's default
_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s'\"]*@")
_ERROR_WORDS = ("error", "erroneous", "no element", "failed", "invalid", "unauthorized", "refused", "not found", "could not", "no such",
                "timed out", "unsupported", "not supported")


class ChildCapture:
    """One child decoder process; owned by one camera thread."""

    def __init__(self, cam: CameraConfig, defaults: SourceDefaults, choice: DecoderChoice) -> None:
        self.choice = choice
        self.info = StreamInfo()
        self.error = ""                       # the child's last error line, scrubbed
        self._tail: deque[str] = deque(maxlen=20)
        self._partial: dict[int, bytes] = {}
        self._read_timeout = defaults.read_timeout_s
        self._img: np.ndarray | None = None
        self._ready: np.ndarray | None = None
        frame_r = frame_w = -1
        if choice.kind == "ffmpeg":
            cmd = ffmpeg_command(cam, defaults, choice.preset, choice.fit)
        else:
            frame_r, frame_w = os.pipe()
            cmd = gstreamer_command(cam, defaults, choice.preset, choice.fit, frame_w)
        self._feed = self.info.feed_ffmpeg if choice.kind == "ffmpeg" else self.info.feed_gstreamer
        try:
            self.proc = subprocess.Popen(
                cmd.argv, stdin=subprocess.PIPE if cmd.stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=() if frame_w < 0 else (frame_w,),
                start_new_session=True)        # a Ctrl-C at the terminal is the daemon's to handle
        finally:
            if frame_w >= 0:
                os.close(frame_w)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._frame_fd = self.proc.stdout.fileno() if cmd.frames_on_stdout else frame_r
        self._own_fd = frame_r
        self._text_fds = [self.proc.stderr.fileno()] + ([] if cmd.frames_on_stdout else [self.proc.stdout.fileno()])
        self._sel = selectors.DefaultSelector()
        for fd in {self._frame_fd, *self._text_fds}:
            os.set_blocking(fd, False)
            self._sel.register(fd, selectors.EVENT_READ)
        if cmd.stdin is not None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write(cmd.stdin)
                self.proc.stdin.close()
            except OSError:
                pass                               # it died already: open() reports why

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def source_size(self) -> tuple[int, int] | None:
        """(width, height) of the camera's own pictures, as the child reported them."""
        return self.info.source

    # ---- open --------------------------------------------------------------------------------------
    def open(self, timeout: float, stop: threading.Event | None = None) -> bool:
        """Wait until the child reports the output size (True), or dies / times out / ``stop`` is
        set (False, then ``error`` says why and the child is gone)."""
        deadline = time.monotonic() + timeout
        while self.info.output is None:
            left = deadline - time.monotonic()
            if stop is not None and stop.is_set():
                self.release()
                return False
            if left <= 0:
                self.error = self.error or f"no stream within {timeout:.0f}s"
                self.release()
                return False
            # Only the text streams: frames that arrive meanwhile wait in their pipe.
            if self._text_fds:
                ready = select.select(self._text_fds, [], [], min(left, 0.5))[0]
            else:                           # its text streams closed: it is exiting
                ready = []
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(min(left, 0.5))
            for fd in ready:
                if not self._read_text(fd):
                    self._sel.unregister(fd)
                    self._text_fds.remove(fd)
            if self.proc.poll() is not None and self.info.output is None:
                self._drain_text()
                self.error = self.error or f"decoder exited with status {self.proc.returncode}"
                self.release()
                return False
        w, h = self.info.output
        self._frame_bytes = w * h * 3
        try:
            # A pipe holds 64 KiB by default: a 640x360 frame would take a dozen wake-ups to read.
            fcntl.fcntl(self._frame_fd, _F_SETPIPE_SZ, min(self._frame_bytes, _PIPE_MAX))
        except OSError:
            pass                            # above the system's pipe-max-size: the default works
        return True

    # ---- cv2.VideoCapture's calls ------------------------------------------------------------------
    def isOpened(self) -> bool:  # noqa: N802 - VideoCapture's name
        return self.proc.poll() is None

    def grab(self) -> bool:
        """Read the next whole frame within the read timeout; False at end, death or timeout."""
        if self._img is None:
            w, h = self.info.output or (0, 0)
            self._img = np.empty((h, w, 3), np.uint8)
        view = memoryview(self._img).cast("B")
        got, deadline = 0, time.monotonic() + self._read_timeout
        while got < self._frame_bytes:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            events = self._sel.select(left)
            for key, _ in events:
                if key.fd != self._frame_fd:
                    if not self._read_text(key.fd):
                        self._sel.unregister(key.fd)
                        self._text_fds.remove(key.fd)
                    continue
                try:
                    n = os.readv(self._frame_fd, [view[got:]])
                except BlockingIOError:
                    continue
                if n == 0:
                    return False
                got += n
        self._ready = self._img
        return True

    def retrieve(self) -> tuple[bool, np.ndarray | None]:
        """The frame ``grab`` read; handed over, so the next grab reads into a fresh array."""
        img, self._ready, self._img = self._ready, None, None
        return img is not None, img

    def get(self, prop: int) -> float:
        if prop == cv2.CAP_PROP_FPS:
            return self.info.fps
        w, h = self.info.source or (0, 0)
        return {cv2.CAP_PROP_FRAME_WIDTH: w, cv2.CAP_PROP_FRAME_HEIGHT: h}.get(prop, 0.0)

    def set(self, prop: int, value: float) -> bool:
        return False            # no seeking: FFmpeg loops files itself (-stream_loop), GStreamer reconnects

    def release(self) -> None:
        """Stop the child by its PID: SIGTERM, then SIGKILL (which also ends a stopped one)."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(_KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(_KILL_WAIT_S * 5)
            except ProcessLookupError:
                pass
        self._sel.close()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None and not f.closed:
                f.close()
        if self._own_fd >= 0:
            os.close(self._own_fd)
            self._own_fd = -1

    # ---- the child's text --------------------------------------------------------------------------
    def _read_text(self, fd: int) -> bool:
        """Take what the child wrote on a text stream; False once it is closed."""
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        self._take_text(fd, chunk)
        return True

    def _take_text(self, fd: int, chunk: bytes) -> None:
        data = self._partial.pop(fd, b"") + chunk
        *lines, rest = data.replace(b"\r", b"\n").split(b"\n")
        if rest:
            self._partial[fd] = rest[-4096:]
        for raw in lines:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            self._feed(line)
            self._tail.append(line)
            low = line.lower()
            if any(w in low for w in _ERROR_WORDS):
                self.error = scrub(_USERINFO.sub(r"\1***@", line))[:300]

    def _drain_text(self) -> None:
        """After the child exited: everything it still had to say."""
        for fd in list(self._text_fds):
            for _ in range(64):
                try:
                    chunk = os.read(fd, 65536)
                except (BlockingIOError, OSError):
                    break
                if not chunk:
                    break
                self._take_text(fd, chunk)
