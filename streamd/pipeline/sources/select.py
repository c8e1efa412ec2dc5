"""Which decoder each camera gets: ``decoder`` / ``hwaccel`` from its config, ``auto`` resolved by
trying every child-decoder preset on a generated 1-second clip (what ``streamd doctor`` shows).

The trial runs each preset once per process (a few seconds at most, at daemon start, only when a
config says ``auto``); its results are kept for every camera after.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from ...config import CameraConfig, SourceDefaults
from .child import ChildCapture
from .presets import PRESETS, DecoderChoice

log = logging.getLogger("streamd.source")

CLIP_CODECS = {"h264": "libx264", "h265": "libx265"}
_TRIAL_TIMEOUT_S = 10.0
_lock = threading.Lock()
_trials: dict[tuple[str, str], "Trial"] | None = None


@dataclass(frozen=True)
class Trial:
    """One preset tried on the generated clips: ``problem`` is empty when it decoded every codec."""

    kind: str
    preset: str
    problem: str

    @property
    def works(self) -> bool:
        return not self.problem


def make_clip(directory: Path, codec: str, size: tuple[int, int] = (640, 360)) -> Path:
    """A 1-second ``codec`` clip of FFmpeg's test pattern (the decoders' trial input)."""
    if shutil.which("ffmpeg") is None:
        raise FileNotFoundError("ffmpeg is not installed")
    path = directory / f"trial-{codec}.mp4"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-f", "lavfi", "-i",
                    f"testsrc2=size={size[0]}x{size[1]}:rate=25:duration=1", "-c:v", CLIP_CODECS[codec],
                    "-pix_fmt", "yuv420p", str(path)],
                   check=True, timeout=60, capture_output=True)
    return path


def try_preset(kind: str, preset: str, clip: Path, defaults: SourceDefaults,
               fit: tuple[int, int] = (320, 320)) -> str:
    """Decode the clip scaled to fit ``fit``; return the problem, or '' when frames came out."""
    tool = "ffmpeg" if kind == "ffmpeg" else "gst-launch-1.0"
    if shutil.which(tool) is None:
        return f"{tool} is not installed"
    absent = hardware_absent(preset, defaults)
    if absent:
        return absent
    cam = CameraConfig(id="trial", url=str(clip), realtime=False)
    trial = defaults.model_copy(update={"open_timeout_s": _TRIAL_TIMEOUT_S, "read_timeout_s": _TRIAL_TIMEOUT_S})
    try:
        child = ChildCapture(cam, trial, DecoderChoice(kind, preset, fit))
    except (OSError, ValueError) as exc:
        return str(exc)
    try:
        if not child.open(_TRIAL_TIMEOUT_S):
            return child.error or "no stream"
        if not child.grab():
            return child.error or "no frame decoded"
        ok, image = child.retrieve()
        if not ok or image is None or max(image.shape[:2]) > max(fit):
            return f"frames of the wrong size ({None if image is None else image.shape})"
        return ""
    finally:
        child.release()


def hardware_absent(preset: str, defaults: SourceDefaults) -> str:
    """Why ``preset`` cannot work on this box without trying it, or ''."""
    if preset == "vaapi" and not Path(defaults.vaapi_device).exists():
        return f"no VA-API device ({defaults.vaapi_device} does not exist)"
    if preset == "nvidia" and not Path("/dev/nvidiactl").exists():
        return "no NVIDIA driver (/dev/nvidiactl does not exist)"
    return ""


def run_trials(defaults: SourceDefaults) -> list[Trial]:
    """Every child-decoder preset on an H.264 and an H.265 clip."""
    out: list[Trial] = []
    with tempfile.TemporaryDirectory(prefix="streamd-decoders-") as tmp:
        clips: dict[str, Path] = {}
        clip_problem = ""
        for codec in CLIP_CODECS:
            try:
                clips[codec] = make_clip(Path(tmp), codec)
            except (OSError, subprocess.SubprocessError) as exc:
                clip_problem = f"cannot make a trial clip ({type(exc).__name__})"
        for kind, presets in PRESETS.items():
            for preset in presets:
                problems = {codec: p for codec, clip in clips.items() if (p := try_preset(kind, preset, clip, defaults))}
                if not clips:
                    problem = clip_problem
                elif len(set(problems.values())) == 1 and len(problems) == len(clips):
                    problem = next(iter(problems.values()))        # the same for every codec
                else:
                    problem = "; ".join(f"{codec}: {p}" for codec, p in problems.items())
                out.append(Trial(kind, preset, problem))
    return out


def cached_trials(defaults: SourceDefaults) -> dict[tuple[str, str], Trial]:
    """Every preset's trial, run once per process."""
    global _trials
    with _lock:
        if _trials is None:
            _trials = {(t.kind, t.preset): t for t in run_trials(defaults)}
            log.info("decoder presets tried", extra={"working": " ".join(
                f"{k}/{p}" for (k, p), t in _trials.items() if t.works) or "-"})
        return _trials


def choose(cam: CameraConfig, defaults: SourceDefaults, fit: tuple[int, int] | None) -> DecoderChoice:
    """The decoder ``cam`` gets; ``fit`` is the (width, height) its frames are scaled to fit."""
    kind = cam.decoder or defaults.decoder
    hwaccel = cam.hwaccel or defaults.hwaccel
    if cam.kind == "usb" or kind == "opencv":
        return DecoderChoice("opencv")
    if kind != "auto" and hwaccel != "auto":
        return DecoderChoice(kind, hwaccel, fit)
    kind, preset = best(cached_trials(defaults), kind, hwaccel)
    return DecoderChoice(kind, preset, fit if kind != "opencv" else None)


def best(trials: dict[tuple[str, str], Trial], kind: str = "auto", hwaccel: str = "auto") -> tuple[str, str]:
    """(kind, preset) for ``decoder: kind`` / ``hwaccel: hwaccel`` given what the trials found:
    the first working hardware preset (NVDEC, Jetson, VA-API), else software."""
    kinds = [kind] if kind != "auto" else list(PRESETS)
    hardware = [(k, p) for k in kinds for p in PRESETS[k]
                if p != "none" and (hwaccel == "auto" or p == hwaccel) and trials[(k, p)].works]
    if hardware:
        return hardware[0]
    if kind == "auto":
        # No hardware: FFmpeg in software when it works (scaling in the decoder still saves the
        # daemon's CPU), else OpenCV in the daemon's own process.
        return ("ffmpeg", "none") if trials[("ffmpeg", "none")].works else ("opencv", "none")
    return kind, "none"
