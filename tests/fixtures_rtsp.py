"""pytest plugin: real RTSP cameras for tests, served by ``tools/rtsp_test_server.py``.

Fixtures:

* ``test_media`` (session): moving JPEG sequences and H.264 clips made from real photos by
  ``tools/make_test_media.py``, cached under ``.cache/test-media`` in the repository.
* ``rtsp_server`` (function): a factory that starts a test server process and returns an
  :class:`RtspServer` handle; every process it started is stopped at teardown.

Helpers: :func:`open_capture` and :func:`wait_for_frames` read a stream the way the
daemon does (OpenCV's FFmpeg backend over RTSP/TCP).

The server needs the system Python with GStreamer's RTSP server bindings; where that is
missing, the fixtures skip with the packages to install.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import IO, Protocol

import cv2
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVER_SCRIPT = REPO_ROOT / "tools" / "rtsp_test_server.py"
MEDIA_TOOL = REPO_ROOT / "tools" / "make_test_media.py"
MEDIA_CACHE = REPO_ROOT / ".cache" / "test-media"
# The server imports GStreamer through gi, which only the distribution's Python has.
GST_PYTHON = os.environ.get("STREAMD_TEST_GST_PYTHON", "/usr/bin/python3")
INSTALL_HINT = (
    "GStreamer RTSP server not installed: apt-get install python3-gi gir1.2-gst-rtsp-server-1.0 "
    "gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad "
    "gstreamer1.0-plugins-ugly gstreamer1.0-libav"
)
PASSWORD_ENV = "STREAMD_RTSP_TEST_PASSWORD"

# Exit statuses of the server (see its docstring).
EXIT_BIND = 3

READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
RESTART_TIMEOUT_S = 15.0


class MediaSetLike(Protocol):
    """What tests use of ``make_test_media.MediaSet`` (loaded by path, so not importable)."""

    name: str
    source: Path
    frames_dir: Path
    frame_count: int
    size: tuple[int, int]  # (width, height)
    fps: int  # nominal rate written into the clips
    mp4: Path | None
    h264: Path | None

    @property
    def pattern(self) -> str: ...

    def images_spec(self, fps: float | None = None) -> str: ...

    def h264_spec(self) -> str: ...


@functools.cache
def load_make_test_media() -> ModuleType:
    """``tools/make_test_media.py`` as a module (``tools/`` is not a package)."""
    name = "streamd_tools_make_test_media"
    spec = importlib.util.spec_from_file_location(name, MEDIA_TOOL)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {MEDIA_TOOL}")
    module = importlib.util.module_from_spec(spec)
    # Registered before running it: dataclasses look their module up in sys.modules.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@functools.cache
def gst_rtsp_unavailable_reason() -> str | None:
    """Why the test server cannot run here, or None when it can."""
    if not Path(GST_PYTHON).is_file():
        return f"{GST_PYTHON} not found; {INSTALL_HINT}"
    probe = (
        "import gi\n"
        "gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0')\n"
        "from gi.repository import Gst, GstRtspServer\n"
        "Gst.init(None)\n"
        "need = ['multifilesrc', 'jpegdec', 'videoconvert', 'videoscale', 'identity',\n"
        "        'x264enc', 'h264parse', 'rtph264pay']\n"
        "missing = [e for e in need if Gst.ElementFactory.find(e) is None]\n"
        "print(' '.join(missing))\n"
    )
    try:
        proc = subprocess.run([GST_PYTHON, "-c", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {GST_PYTHON}: {exc}; {INSTALL_HINT}"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"{INSTALL_HINT} ({last})"
    if proc.stdout.strip():
        return f"GStreamer elements missing: {proc.stdout.strip()}; {INSTALL_HINT}"
    return None


def redact(url: str) -> str:
    """The URL with any password masked, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@" + (f"[{host}]" if ":" in host else host)
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class RtspServer:
    """One test server process, restartable on the same port."""

    def __init__(
        self,
        mounts: Mapping[str, str],
        user: str | None = None,
        password: str | None = None,
        width: int = 640,
        height: int = 480,
        host: str = "127.0.0.1",
        port: int = 0,
        ready_timeout: float = READY_TIMEOUT_S,
    ) -> None:
        if not mounts:
            raise ValueError("at least one mount is needed")
        if (user is None) != (password is None):
            raise ValueError("user and password go together")
        self.mounts = dict(mounts)
        self.user = user
        self._password = password
        self.width = width
        self.height = height
        self.host = host
        self.port = port
        self.ready_timeout = ready_timeout
        self.ready_seconds: float | None = None  # how long the last start took
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._paused = False
        self._past: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []

    # -- process control -------------------------------------------------------------

    def _command(self, port: int) -> list[str]:
        cmd = [GST_PYTHON, str(SERVER_SCRIPT), "--host", self.host, "--port", str(port),
               "--width", str(self.width), "--height", str(self.height), "--exit-on-stdin-eof"]
        for path, spec in self.mounts.items():
            cmd += ["--mount", f"{path}={spec}"]
        if self.user is not None:
            # Through the environment, so the password is in no argv or error message.
            cmd += ["--user", self.user, "--password-env", PASSWORD_ENV]
        return cmd

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env.pop(PASSWORD_ENV, None)
        if self._password is not None:
            env[PASSWORD_ENV] = self._password
        stderr = tempfile.TemporaryFile(prefix="rtsp-test-server-", suffix=".log")
        proc = subprocess.Popen(
            self._command(port),
            # The server stops when this pipe closes: if the test process dies without
            # tearing down, its servers go with it.
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # A file, not a pipe: GStreamer may log more than a pipe holds while nobody reads.
            stderr=stderr,
            env=env,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        self._past.append((proc, stderr))
        self._proc, self._stderr, self._paused = proc, stderr, False
        return proc

    def _await_ready(self, proc: subprocess.Popen[bytes], deadline: float) -> str | None:
        """The READY URL, or None if the process exited first. Raises on timeout."""
        assert proc.stdout is not None
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"RTSP test server (pid {proc.pid}) not ready after {self.ready_timeout:.0f} s; "
                        f"stdout {buf!r}; stderr:\n{self.stderr_text()}"
                    )
                if not sel.select(timeout=min(left, 0.5)):
                    continue
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    proc.wait(timeout=STOP_TIMEOUT_S)
                    return None
                buf += chunk
        line = buf.split(b"\n", 1)[0].decode(errors="replace").strip()
        if not line.startswith("READY rtsp://"):
            raise RuntimeError(f"unexpected first line from the RTSP test server: {line!r}")
        return line.split(" ", 1)[1]

    def start(self, retry_bind: bool = False) -> RtspServer:
        """Start the server (on ``self.port``; 0 picks a free one) and wait until it listens.

        With ``retry_bind``, a fixed port that is still taken is tried again until the
        ready deadline (used by restart).
        """
        if self.running:
            raise RuntimeError(f"server already running (pid {self.pid})")
        t0 = time.monotonic()
        deadline = t0 + self.ready_timeout
        while True:
            proc = self._spawn(self.port)
            ready = self._await_ready(proc, deadline)
            if ready is not None:
                break
            # The port of a restart can still be held for a moment (by the old process
            # being reaped, or a connection of a reader); other failures are final.
            if (not retry_bind or proc.returncode != EXIT_BIND or self.port == 0
                    or time.monotonic() > deadline):
                raise RuntimeError(
                    f"RTSP test server exited with status {proc.returncode} before it was ready; "
                    f"stderr:\n{self.stderr_text()}"
                )
            threading.Event().wait(0.2)  # retry pacing within the deadline loop
        self.ready_seconds = time.monotonic() - t0
        self.port = urllib.parse.urlsplit(ready).port or self.port
        return self

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("server not started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def _signal(self, sig: int) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.kill(self._proc.pid, sig)
            except ProcessLookupError:
                pass

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but sends nothing, like a hung camera."""
        self._signal(signal.SIGSTOP)
        self._paused = self.running

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        self._paused = False

    def kill(self) -> int | None:
        """SIGKILL, like a camera losing power; returns the exit status."""
        return self._finish(self._proc, graceful=False)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited after ``timeout``; returns the exit status."""
        return self._finish(self._proc, graceful=True, timeout=timeout)

    def _finish(self, proc: subprocess.Popen[bytes] | None, graceful: bool,
                timeout: float = STOP_TIMEOUT_S) -> int | None:
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                if graceful:
                    # A stopped process keeps SIGTERM pending until it is continued.
                    os.kill(proc.pid, signal.SIGCONT)
                os.kill(proc.pid, signal.SIGTERM if graceful else signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT_S)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()
        if proc is self._proc:
            self._paused = False
        return proc.returncode

    def restart(self, timeout: float = RESTART_TIMEOUT_S) -> RtspServer:
        """Stop (if running) and start again on the same port, so reader URLs stay valid."""
        if self.port == 0:
            raise RuntimeError("server never started, so it has no port to restart on")
        self.stop()
        saved = self.ready_timeout
        self.ready_timeout = timeout
        try:
            return self.start(retry_bind=True)
        finally:
            self.ready_timeout = saved

    def close(self) -> None:
        """Stop every process this handle started (also ones replaced by restart)."""
        for proc, stderr in self._past:
            self._finish(proc, graceful=True)
            stderr.close()
        self._past.clear()
        self._proc = self._stderr = None

    # -- information -----------------------------------------------------------------

    def url(self, mount: str | None = None, credentials: bool = True) -> str:
        """``rtsp://[user:password@]host:port/mount``; the first mount when none is named."""
        if self.port == 0:
            raise RuntimeError("server not started")
        path = next(iter(self.mounts)) if mount is None else mount
        if not path.startswith("/"):
            path = "/" + path
        host = f"[{self.host}]" if ":" in self.host else self.host
        auth = ""
        if credentials and self.user is not None and self._password is not None:
            auth = (urllib.parse.quote(self.user, safe="") + ":"
                    + urllib.parse.quote(self._password, safe="") + "@")
        return f"rtsp://{auth}{host}:{self.port}{path}"

    def stderr_text(self) -> str:
        """What the current process wrote to stderr so far."""
        if self._stderr is None or self._stderr.closed:
            return ""
        pos = self._stderr.tell()
        try:
            self._stderr.seek(0)
            return self._stderr.read().decode(errors="replace")
        finally:
            self._stderr.seek(pos)

    def __repr__(self) -> str:
        state = "paused" if self._paused else ("running" if self.running else "stopped")
        pid = self._proc.pid if self._proc else None
        return f"<RtspServer {state} pid={pid} port={self.port} mounts={list(self.mounts)}>"


class RtspServerFactory(Protocol):
    def __call__(
        self,
        mounts: Mapping[str, str],
        user: str | None = None,
        password: str | None = None,
        width: int = 640,
        height: int = 480,
        port: int = 0,
    ) -> RtspServer: ...


@pytest.fixture(scope="session")
def test_media() -> dict[str, MediaSetLike]:
    """Media for the default photos: keys ``"bus"`` and ``"zidane"``, 640x480, 45 frames."""
    tool = load_make_test_media()
    try:
        return tool.make_media(MEDIA_CACHE, h264=shutil.which("ffmpeg") is not None)
    except FileNotFoundError as exc:
        pytest.skip(f"cannot make test media: {exc}")


@pytest.fixture
def rtsp_server() -> Iterator[RtspServerFactory]:
    """Factory: ``rtsp_server(mounts={"/cam1": "images:PATTERN@10"}, user=None, password=None)``."""
    reason = gst_rtsp_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    servers: list[RtspServer] = []

    def start(
        mounts: Mapping[str, str],
        user: str | None = None,
        password: str | None = None,
        width: int = 640,
        height: int = 480,
        port: int = 0,
    ) -> RtspServer:
        server = RtspServer(mounts, user, password, width, height, port=port)
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.close()


# -- reading streams ---------------------------------------------------------------------

_env_lock = threading.Lock()


def open_capture(
    url: str,
    open_timeout_ms: int = 5000,
    read_timeout_ms: int = 5000,
    ffmpeg_options: str = "rtsp_transport;tcp",
) -> cv2.VideoCapture:
    """Open an RTSP URL with OpenCV's FFmpeg backend over TCP, as the daemon does.

    The result may not be opened (check ``isOpened()``): a wrong password or an
    unreachable server fails here, after at most ``open_timeout_ms``. With the default
    options FFmpeg probes about 2 s of a 10 frames/s stream before the open returns
    (``"rtsp_transport;tcp|analyzeduration;500000"`` cuts that to about 0.6 s).
    """
    with _env_lock:
        # OpenCV reads this variable at each open; set it only around this open so other
        # code in the process keeps its own setting.
        saved = os.environ.get("OPENCV_FFMPEG_CAPTURE_OPTIONS")
        os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = ffmpeg_options
        try:
            return cv2.VideoCapture(url, cv2.CAP_FFMPEG, [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, open_timeout_ms,
                cv2.CAP_PROP_READ_TIMEOUT_MSEC, read_timeout_ms,
            ])
        finally:
            if saved is None:
                del os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"]
            else:
                os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = saved


def wait_for_frames(url: str, n: int = 5, timeout: float = 20.0) -> list[np.ndarray]:
    """Read ``n`` frames from ``url``, reopening after failures, within ``timeout`` seconds.

    Raises TimeoutError (with the URL's password masked) when they do not all come.
    """
    deadline = time.monotonic() + timeout
    frames: list[np.ndarray] = []
    attempts = 0
    while time.monotonic() < deadline:
        attempts += 1
        cap = open_capture(url)
        try:
            while cap.isOpened() and len(frames) < n and time.monotonic() < deadline:
                ok, frame = cap.read()
                if not ok or frame is None:
                    break
                frames.append(frame)
        finally:
            cap.release()
        if len(frames) >= n:
            return frames
        # An open that fails at once (e.g. connection refused) would otherwise spin.
        threading.Event().wait(min(0.2, max(0.0, deadline - time.monotonic())))
    raise TimeoutError(
        f"got {len(frames)} of {n} frames from {redact(url)} within {timeout:.0f} s ({attempts} opens)"
    )


def read_times(cap: cv2.VideoCapture, until: Callable[[int, float], bool]) -> list[float]:
    """Monotonic times of successful reads, until ``until(count, now)`` or a failed read."""
    times: list[float] = []
    while True:
        ok = cap.grab()
        now = time.monotonic()
        if not ok:
            return times
        times.append(now)
        if until(len(times), now):
            return times


__all__: list[str] = [
    "RtspServer",
    "RtspServerFactory",
    "MediaSetLike",
    "gst_rtsp_unavailable_reason",
    "load_make_test_media",
    "open_capture",
    "read_times",
    "redact",
    "wait_for_frames",
]

