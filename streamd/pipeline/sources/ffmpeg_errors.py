"""Count, per decoder thread, the errors FFmpeg reports while it decodes.

A damaged H.264/H.265 frame is usually *concealed*: FFmpeg patches the broken macroblocks
from their neighbours and hands the picture over as if nothing happened, so OpenCV's
``grab()``/``retrieve()`` succeed and nothing in OpenCV's API says the frame was corrupt.
FFmpeg only tells its log ("error while decoding MB ...", "concealing N DC ... errors").
OpenCV exposes neither that log nor the frame's error flags, so this module installs an
``av_log`` callback (through ctypes) on the libavutil that OpenCV's FFmpeg backend loaded,
and counts error-level and concealment messages per thread. A decoder thread compares its
count around a grab: more means FFmpeg found errors in that frame.

Nothing is printed: messages are only counted (FFmpeg's messages may quote URLs with
credentials). Attribution is by thread, which holds with the default ``decoder_threads:
1`` (FFmpeg then decodes on the calling thread); with more threads FFmpeg's own workers
log, and their messages count for nobody. Where the library cannot be found (not Linux,
an OpenCV without FFmpeg) nothing is counted and ``install`` says so.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import threading
from collections import defaultdict

log = logging.getLogger("streamd.source")

_AV_LOG_ERROR = 16
_CONCEALING = b"concealing"     # error_resilience.c: "concealing %d DC, %d AC, %d MV errors in %c frame"
# av_log's callback: (void *avcl, int level, const char *fmt, va_list vl); the va_list is
# passed on as a pointer on the ABIs we run on, and is never read here.
_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)

_counts: defaultdict[int, int] = defaultdict(int)     # thread ident -> errors FFmpeg reported on it
_installed: object | None = None                      # the ctypes callback, kept alive while installed
_lock = threading.Lock()


def _on_log(avcl: int | None, level: int, fmt: bytes | None, vl: int | None) -> None:
    if level <= _AV_LOG_ERROR or (fmt is not None and fmt.startswith(_CONCEALING)):
        _counts[threading.get_ident()] += 1


def _libavutil_path() -> str | None:
    """The libavutil this process has loaded (OpenCV's own copy in a wheel)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rsplit(None, 1)[-1] if line.count(" ") >= 5 else ""
                if "libavutil" in path.rsplit("/", 1)[-1]:
                    return path
    except OSError:
        return None
    return None


def install() -> bool:
    """Install the counting callback once; True when FFmpeg's errors are being counted.
    Call it after a capture was opened: OpenCV installs its own callback at its first open
    (when OPENCV_FFMPEG_LOGLEVEL is set, as the daemon does), which would replace ours."""
    global _installed
    with _lock:
        if _installed is not None:
            return True
        path = _libavutil_path()
        if path is None:
            log.info("FFmpeg's decode errors are not counted: its library was not found in this process")
            return False
        try:
            lib = ctypes.CDLL(path)
            callback = _CALLBACK(_on_log)
            lib.av_log_set_callback(callback)
        except (OSError, AttributeError) as exc:
            log.info("FFmpeg's decode errors are not counted: %s", exc)
            return False
        _installed = callback
        # FFmpeg's own callback again before the interpreter goes: a decoder thread still in
        # a native read must not call into a finalised Python.
        atexit.register(lib.av_log_set_callback, lib.av_log_default_callback)
        return True


def errors_on_this_thread() -> int:
    """Errors FFmpeg has reported on the calling thread so far (0 when not installed)."""
    return _counts.get(threading.get_ident(), 0)


def forget_this_thread() -> None:
    """A decoder thread ending: its ident may be reused by another thread."""
    _counts.pop(threading.get_ident(), None)
