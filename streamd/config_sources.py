"""How cameras are decoded (``sources.decoder`` / ``hwaccel`` and each camera's own): the choices,
and which hardware preset each child decoder has (streamd/pipeline/sources/presets.py builds them)."""

from __future__ import annotations

from typing import Literal

Decoder = Literal["auto", "opencv", "ffmpeg", "gstreamer"]
Hwaccel = Literal["auto", "none", "nvidia", "vaapi", "jetson"]


def check_decoder_preset(decoder: str, hwaccel: str) -> None:
    """FFmpeg's presets are nvidia and vaapi; GStreamer's jetson and vaapi; OpenCV has none."""
    if hwaccel in ("auto", "none"):
        return
    if decoder == "ffmpeg" and hwaccel == "jetson":
        raise ValueError("hwaccel 'jetson' needs decoder: gstreamer (nvv4l2decoder)")
    if decoder == "gstreamer" and hwaccel == "nvidia":
        raise ValueError("hwaccel 'nvidia' needs decoder: ffmpeg (NVDEC); on a Jetson use 'jetson'")
    if decoder == "opencv":
        raise ValueError(f"hwaccel '{hwaccel}' needs decoder: ffmpeg or gstreamer (opencv decodes in software)")
