"""The ``cameras:`` entries of the config (and the ``tracking:`` settings a camera can
override); ``streamd.config`` re-exports these names."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator
from pydantic.types import FiniteFloat

from .config_loader import StrictModel
from .config_sources import Decoder, Hwaccel
from .geometry import polygon_problem
from .redact import redact_url

CAMERA_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
URL_SCHEMES = ("rtsp", "rtsps", "http", "https", "file", "usb")


class TrackingConfig(StrictModel):
    """Object tracking and lifecycle events (streamd.pipeline.tracking, .events). Set at the top
    level as every camera's default; a camera's own ``tracking:`` overrides the keys it names."""

    tracker: Literal["bytetrack", "off"] = Field(
        "off", description="bytetrack: track ids and object events (needs the 'tracking' extra)")
    # Confidences: the first matching pass takes detections of at least high_conf (weaker ones
    # only continue tracks left over); an unmatched one of at least new_track_conf starts a track.
    high_conf: float = Field(0.5, gt=0, lt=1, description="matched to tracks first from this confidence")
    new_track_conf: float = Field(0.5, gt=0, lt=1, description="starts a track from this confidence")
    match_iou: float = Field(0.1, gt=0, lt=1, description="least IoU with a track's predicted box to continue it")
    confirm_frames: int = Field(2, ge=1, le=100, description="frames in a row before a new track gets an id")
    track_buffer_s: float = Field(1.0, gt=0, le=600, description="seconds a track that lost its object "
                                  "waits for it to come back (by capture time, whatever the frame rate)")
    update_interval_s: float = Field(5.0, ge=0, le=86400, description="at most one 'update' event per "
                                     "object per this many seconds (0: none)")
    snapshot_max_bytes: int = Field(200_000, ge=0, le=20_000_000, description="an 'end' event's JPEG of "
                                    "the object's best frame is scaled down to fit (0: no JPEG)")


class CameraConfig(StrictModel):
    id: str
    url: str = Field(description="rtsp://, rtsps://, http(s)://, file path or file://, usb:N or /dev/videoN")
    username: str | None = None
    password: str | None = None
    fps: float | None = Field(None, gt=0, le=240, description="cap: extra frames dropped at decode")
    queue_depth: int = Field(1, ge=1, le=256, description="frames kept waiting for inference; 1 keeps only "
                                                           "the newest (freshest); more smooths bursty sources")
    transport: Literal["tcp", "udp"] = "tcp"
    loop: bool = Field(False, description="files: start again at the end")
    realtime: bool = Field(True, description="files: pace at the file's own frame rate")
    enabled: bool = True
    snapshot: Literal["off", "always", "on_detection"] = Field(
        "off", description="attach a JPEG of the frame to its detection message")
    snapshot_interval_s: float = Field(0, ge=0, description="at most one snapshot per this many seconds")
    snapshot_quality: int = Field(80, ge=10, le=100)
    tracking: TrackingConfig | None = Field(None, description="overrides of the top-level tracking: keys")
    decoder: Decoder | None = Field(None, description="this camera's own sources.decoder")
    hwaccel: Hwaccel | None = Field(None, description="this camera's own sources.hwaccel")
    zones: dict[str, list[tuple[FiniteFloat, FiniteFloat]]] = Field(
        default_factory=dict, description="named polygons in frame pixels, [[x, y], ...]; object events "
                                          "report the time each object's bottom-centre spent in each")

    @field_validator("zones")
    @classmethod
    def _zones(cls, v: dict[str, list[tuple[float, float]]]) -> dict[str, list[tuple[float, float]]]:
        for name, poly in v.items():
            if not CAMERA_ID.match(name):
                raise ValueError(f"zone name '{name}' must be 1-64 letters, digits, '_', '.', '-'")
            problem = polygon_problem(poly)
            if problem:
                raise ValueError(f"zone '{name}' {problem}")
        return v

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not CAMERA_ID.match(v):
            raise ValueError("must be 1-64 characters of letters, digits, '_', '.', '-'")
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("is empty")
        m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*):", v)
        scheme = m.group(1).lower() if m and "://" in v or (m and m.group(1).lower() == "usb") else None
        if scheme is not None and scheme not in URL_SCHEMES:
            raise ValueError(f"scheme '{scheme}' is not supported (use {', '.join(URL_SCHEMES)})")
        if scheme in ("rtsp", "rtsps", "http", "https"):
            from urllib.parse import urlsplit
            try:
                parts = urlsplit(v)
                parts.port  # noqa: B018 - raises on a bad port
            except ValueError as exc:
                raise ValueError(f"is not a valid URL ({exc})") from None
            if not parts.hostname:
                raise ValueError(f"has no host: {redact_url(v)}")
        if scheme == "usb" and not re.fullmatch(r"usb:\d+", v):
            raise ValueError("USB cameras are written usb:N (N = device index)")
        return v

    @property
    def kind(self) -> str:
        """rtsp | http | file | usb"""
        low = self.url.lower()
        if low.startswith(("rtsp://", "rtsps://")):
            return "rtsp"
        if low.startswith(("http://", "https://")):
            return "http"
        if low.startswith("usb:") or low.startswith("/dev/video"):
            return "usb"
        return "file"

    def open_url(self) -> str:
        """The URL with credentials filled in: only ever handed to the decoder."""
        if not (self.username or self.password) or self.kind not in ("rtsp", "http"):
            return self.url
        from urllib.parse import quote, urlsplit, urlunsplit
        p = urlsplit(self.url)
        user = quote(self.username or "", safe="")
        pw = quote(self.password or "", safe="")
        netloc = f"{user}:{pw}@{p.netloc.rsplit('@', 1)[-1]}"
        return urlunsplit((p.scheme, netloc, p.path, p.query, p.fragment))

    @property
    def safe_url(self) -> str:
        return redact_url(self.url)
