"""Typed, validated configuration with errors that name the field and the YAML line.

The top-level schema and the cross-section checks of ``parse_config`` live here; ``cameras:``,
``outputs:``, ``http:`` and the decoder choices have modules of their own (config_cameras,
config_outputs, config_http, config_sources), whose names this module re-exports.

Loading goes: YAML text -> node tree (we keep every value's line) -> ``${ENV}`` expansion ->
pydantic models with ``extra="forbid"``. Any problem becomes one ``ConfigError`` per
offending field: ``streamd.yaml:14: cameras[1].fps: ...``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

# load_yaml, validate_model and parse_model are part of this module's interface too: the
# loading itself lives in config_loader, shared with the alert rules.
from .config_loader import (ModelT, StrictModel, dotted, line_for, load_file, load_yaml, parse_model,  # noqa: F401
                            validate_model, validation_error)
from .config_sources import Decoder, Hwaccel, check_decoder_preset
from .errors import ConfigError
from .redact import redact_url, register_secret, register_url
from .config_cameras import CAMERA_ID, CameraConfig, TrackingConfig  # noqa: F401
from .config_engine import check_names, check_trust_engine, resolve_names_file
from .config_http import HttpConfig, check_http
from .config_outputs import (HomeAssistantConfig, MqttOutputConfig, MqttTlsConfig,  # noqa: F401
                             OutputsConfig, PasswordSource, RedisOutputConfig, RedisRequestsConfig,
                             resolve_broker_secrets, resolve_output_secrets)
from .thresholds import DEFAULT_CONF, DEFAULT_IOU, DEFAULT_MAX_DET



def check_endpoint(v: str) -> str:
    if not re.match(r"^(tcp|ipc|inproc)://.+", v):
        raise ValueError("must look like tcp://HOST:PORT, ipc://PATH or inproc://NAME")
    return v


class ModelConfig(StrictModel):
    path: Path = Field(description="Model file (.onnx; .engine with the TensorRT backend). "
                                   "Relative paths are relative to the config file.")
    backend: Literal["auto", "onnxruntime", "openvino", "tensorrt"] = Field(
        "auto", description="auto: from the file suffix; for .onnx the fastest installed backend and "
                            "device, measured at start and remembered in cache_dir")
    device: Literal["auto", "cpu", "cuda", "gpu", "npu"] = Field(
        "auto", description="cuda: ONNX Runtime's CUDA provider; gpu (Intel iGPU), npu: OpenVINO's")
    threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads per worker (0: chosen with "
                                                "scheduler.workers)")
    conf: float = Field(DEFAULT_CONF, gt=0, lt=1, description="minimum confidence")
    iou: float = Field(DEFAULT_IOU, gt=0, le=1, description="NMS IoU threshold")
    max_det: int = Field(DEFAULT_MAX_DET, ge=1, le=10000)
    classes: list[int | str] | None = Field(None, description="keep only these class ids or names")
    verify_sha256: bool = True
    rebuild_engine: bool = Field(False, description="TensorRT: rebuild an engine that doesn't fit this "
                                                    "TensorRT/GPU from the ONNX its manifest records")
    cache_dir: Path | None = Field(None, description="OpenVINO's compiled models and backend: auto's "
                                   "measurements (default: .streamd-cache beside the model; relative "
                                   "paths are relative to the config file)")
    openvino_bf16: bool = Field(False, description="OpenVINO on a CPU with BF16: run an FP32 model in BF16 "
                                "(about 2x faster; boxes and scores move slightly)")
    # An engine built elsewhere without a manifest (config_engine.py says how these are checked).
    trust_engine: bool = Field(False, description="TensorRT: load an engine that has no manifest (built "
                               "with trtexec), its input and output read from the engine and its classes "
                               "from names or names_file; nothing checks its bytes (logged as a warning)")
    names: list[str] | None = Field(None, description="a trusted engine's class names, in class-id order")
    names_file: Path | None = Field(None, description="a trusted engine's class names, one per line "
                                    "(relative paths are relative to the config file)")

    @field_validator("trust_engine")
    @classmethod
    def _trust_engine(cls, v: bool, info: ValidationInfo) -> bool:
        return check_trust_engine(v, info.data.get("path"), info.data.get("backend"))

    @field_validator("names")
    @classmethod
    def _names(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        # trust_engine is absent from info.data only where it failed its own check: no second error.
        return check_names(v, info.data.get("trust_engine", True))

    @field_validator("device")
    @classmethod
    def _device(cls, v: str, info: ValidationInfo) -> str:
        backend = info.data.get("backend")
        if backend == "openvino" and v == "cuda":
            raise ValueError("'cuda' is not an OpenVINO device (auto, cpu, gpu, npu)")
        if backend == "onnxruntime" and v in ("gpu", "npu"):
            raise ValueError(f"'{v}' is an OpenVINO device; ONNX Runtime takes auto, cpu or cuda")
        return v


class SchedulerConfig(StrictModel):
    max_batch: int = Field(8, ge=1, le=256, description="capped by the model's own max batch")
    max_wait_ms: float = Field(0, ge=0, le=10000, description="how long a free worker waits for more frames "
                               "to join a batch it could already run (0: runs at once; 5-20 on a GPU, where "
                               "a fuller batch costs much less per image)")
    max_frame_age_ms: float = Field(1000, gt=0, description="no camera frame's detections are published "
                                    "older than this (frames that could not make it are dropped)")
    workers: int | Literal["auto"] = Field(
        "auto", description="inference workers (backend sessions/contexts), each closing and running its "
                            "own batches; auto: measured at start from the candidate layouts")
    autotune_s: float = Field(3.0, ge=0, le=60, description="seconds spent measuring worker layouts at "
                                                             "start (0: take the usual best without measuring)")
    pipeline_depth: int | None = Field(None, ge=1, le=4, description="no longer used: batches are closed "
                                       "when a worker is free (accepted so older configs still load)")

    @field_validator("workers")
    @classmethod
    def _workers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 64:
            raise ValueError("must be 'auto' or 1-64")
        return v


class CurveConfig(StrictModel):
    server_secret_key: Path = Field(description="this publisher's NAME.key_secret (streamd keys generate); "
                                                "relative paths are relative to the config file")
    allowed_clients_dir: Path = Field(description="folder of the public keys (*.key) of the clients "
                                                  "allowed to subscribe; relative to the config file")


class PublisherConfig(StrictModel):
    endpoint: str = "tcp://127.0.0.1:5555"
    name: str | None = Field(None, description="sent as 'origin' in every message (default: the host name)")
    curve: CurveConfig | None = Field(None, description="encrypt and admit only listed subscriber keys")
    heartbeat_s: float = Field(1.0, gt=0, le=60)
    stats_interval_s: float = Field(10.0, gt=0, le=3600, description="how often the stats message goes out")
    sndhwm: int = Field(10000, ge=1, description="messages queued per subscriber (at most; see subscriber_buffer_mb)")
    subscriber_buffer_mb: float = Field(
        64, gt=0, le=65536, description="with snapshots: what one subscriber that stops reading may make the daemon "
                                        "hold; its queue is cut to this / (snapshot_max_bytes + 64 KiB) messages")
    snapshot_max_bytes: int = Field(1_000_000, ge=10_000, le=50_000_000,
                                    description="a larger snapshot JPEG is re-encoded smaller to fit")
    queue_size: int = Field(10000, ge=1, description="messages buffered before the socket")
    allow_non_loopback: bool = False

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        return check_endpoint(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not CAMERA_ID.match(v):
            raise ValueError("must be 1-64 characters of letters, digits, '_', '.', '-'")
        return v


class SourceDefaults(StrictModel):
    open_timeout_s: float = Field(10, gt=0, le=120)
    read_timeout_s: float = Field(5, gt=0, le=120)
    stall_timeout_s: float = Field(10, gt=0, le=600, description="no frame this long -> stalled")
    backoff_initial_s: float = Field(1, gt=0, le=600)
    backoff_max_s: float = Field(30, gt=0, le=3600)
    decoder_threads: int = Field(1, ge=0, le=64, description="FFmpeg threads per camera (0: FFmpeg decides). "
                                 "One each scales best to many cameras on a small box.")
    count_corrupt_frames: bool = Field(True, description="count frames FFmpeg concealed errors in (corrupt_frames) "
                                       "from its log; each log line takes the GIL, a few ms a frame when busy")
    decoder: Decoder = Field(
        "opencv", description="opencv: in the daemon's process; ffmpeg / gstreamer: a child process per camera "
                              "that scales frames to the model's size; auto: the best that works here")
    hwaccel: Hwaccel = Field(
        "auto", description="child decoders' hardware preset (ffmpeg: nvidia, vaapi; gstreamer: jetson, vaapi); "
                            "auto: the best that `streamd doctor` finds working")
    vaapi_device: str = Field("/dev/dri/renderD128", description="the VA-API render node")

    @model_validator(mode="after")
    def _preset_fits_decoder(self) -> "SourceDefaults":
        check_decoder_preset(self.decoder, self.hwaccel)
        return self


class RequestsConfig(StrictModel):
    enabled: bool = Field(False, description="serve on-demand image requests on a ZeroMQ ROUTER socket")
    endpoint: str = "tcp://127.0.0.1:5556"
    queue_size: int = Field(32, ge=1, le=10000, description="accepted requests waiting; beyond: 'busy'")
    share: float = Field(0.25, ge=0, le=1, description="part of each batch kept for requests while cameras wait")
    max_image_bytes: int = Field(20_000_000, ge=1000, description="a larger picture gets an 'error' reply")
    max_message_bytes: int | None = Field(
        None, ge=2000, description="a request message larger than this is not received at all: ZeroMQ closes "
                                   "the client's connection, no reply (default: 4 x max_image_bytes + 64 KiB)")
    max_pixels: int = Field(50_000_000, ge=1000)
    timeout_s: float = Field(30, gt=0, description="an accepted request not inferred by then gets an error")
    redis: RedisRequestsConfig | None = Field(None, description="also take requests from a Redis stream "
                                              "shared by a fleet of daemons (docs/FLEET.md)")

    @property
    def receive_limit(self) -> int:
        """Bytes one request message may have to be received and answered (even with an error)."""
        return self.max_message_bytes or 4 * self.max_image_bytes + 65536

    @model_validator(mode="after")
    def _limits(self) -> RequestsConfig:
        if self.receive_limit <= self.max_image_bytes:
            raise ValueError("max_message_bytes must be larger than max_image_bytes, or an oversized picture "
                             "could not be told so")
        return self

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        return check_endpoint(v)


class MetricsConfig(StrictModel):
    """The older spelling of ``http:`` (``/metrics`` and ``/healthz`` only)."""
    enabled: bool = Field(True, description="older spelling of http.enabled")
    host: str = Field("127.0.0.1", description="older spelling of http.host")
    port: int = Field(9108, ge=0, le=65535, description="older spelling of http.port")


class LogConfig(StrictModel):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = Field("text", description="text: key=value lines (journald, grep); "
                                                                 "json: one JSON object per line")


class Config(StrictModel):
    model: ModelConfig
    scheduler: SchedulerConfig = SchedulerConfig()
    publisher: PublisherConfig = PublisherConfig()
    sources: SourceDefaults = SourceDefaults()
    cameras: list[CameraConfig] = Field(default_factory=list)
    requests: RequestsConfig = RequestsConfig()
    metrics: MetricsConfig = Field(MetricsConfig(), description="the older spelling of http: (metrics only)")
    http: HttpConfig = HttpConfig()
    outputs: OutputsConfig = OutputsConfig()
    log: LogConfig = LogConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="before")
    @classmethod
    def _metrics_is_http(cls, data: Any) -> Any:
        # A file written before http: existed keeps its server: same address, no API.
        if isinstance(data, dict) and data.get("metrics") is not None and "http" not in data:
            m = data["metrics"]
            m = m.model_dump() if isinstance(m, MetricsConfig) else m
            if isinstance(m, dict):
                data = {**data, "http": {**{k: m[k] for k in ("enabled", "host", "port") if k in m}, "api": False}}
        return data

    def camera(self, cam_id: str) -> CameraConfig:
        for cam in self.cameras:
            if cam.id == cam_id:
                return cam
        raise KeyError(cam_id)

    def tracking_for(self, cam_id: str) -> TrackingConfig:
        """The camera's tracking settings: the top-level ones, with the keys it names replaced."""
        own = self.camera(cam_id).tracking
        if own is None:
            return self.tracking
        return self.tracking.model_copy(update={k: getattr(own, k) for k in own.model_fields_set})


def parse_config(text: str, source: str = "<config>", base_dir: Path | None = None,
                 env: dict[str, str] | None = None, check_files: bool = True) -> Config:
    """Parse and validate config text. Raises ``ConfigError`` naming field and line."""
    data, lines = load_yaml(text, source, env, expected="a mapping with model:, cameras:, ... at the top level")
    if isinstance(data, dict) and "metrics" in data and "http" in data:
        raise ConfigError("metrics: is the older spelling of http: (one server); keep only http:",
                          source=source, field="metrics", line=line_for(("metrics",), lines))
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, lines, source) from None
    seen: dict[str, int] = {}
    for i, cam in enumerate(cfg.cameras):
        if cam.id in seen:
            raise ConfigError(f"duplicate camera id '{cam.id}' (first used by cameras[{seen[cam.id]}])",
                              source=source, field=f"cameras[{i}].id", line=line_for(("cameras", i, "id"), lines))
        seen[cam.id] = i
        try:
            check_decoder_preset(cam.decoder or cfg.sources.decoder, cam.hwaccel or cfg.sources.hwaccel)
        except ValueError as exc:
            key = "hwaccel" if cam.hwaccel else "decoder"
            raise ConfigError(str(exc), source=source, field=f"cameras[{i}].{key}",
                              line=line_for(("cameras", i, key), lines)) from None

    # Relative model paths follow the config file, so a service's cwd doesn't matter.
    model_path = cfg.model.path
    if not model_path.is_absolute() and base_dir is not None:
        model_path = (base_dir / model_path)
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": model_path})})
    if cfg.model.cache_dir is not None and not cfg.model.cache_dir.is_absolute() and base_dir is not None:
        cache = base_dir / cfg.model.cache_dir
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"cache_dir": cache})})
    if check_files and not cfg.model.path.is_file():
        raise ConfigError(f"model file not found: {cfg.model.path}", source=source, field="model.path",
                          line=line_for(("model", "path"), lines))
    cfg = cfg.model_copy(update={"model": resolve_names_file(cfg.model, source, base_dir, lines, check_files)})
    cfg = _resolve_curve_keys(cfg, source, base_dir, lines, check_files)
    cfg = cfg.model_copy(update={"http": check_http(cfg.http, source, base_dir, lines, check_files)})
    cfg = cfg.model_copy(update={"outputs": resolve_output_secrets(cfg.outputs, source, base_dir, lines,
                                                                    check_files)})
    if cfg.requests.redis is not None:
        fleet = resolve_broker_secrets(cfg.requests.redis, ("requests", "redis"), source, base_dir, lines, check_files)
        cfg = cfg.model_copy(update={"requests": cfg.requests.model_copy(update={"redis": fleet})})
    for i, cam in enumerate(cfg.cameras):
        if cam.kind == "file" and check_files and cam.enabled:
            path = cam.url[len("file://"):] if cam.url.startswith("file://") else cam.url
            p = Path(path)
            if not p.is_absolute() and base_dir is not None:
                p = base_dir / p
            if not p.exists():
                # "192.0.2.11:554/stream1" or "cam.local/h264" is a camera address without
                # its scheme far more often than a file name: say which it looks like.
                looks_like_host = "@" in path or re.match(r"^[\w.-]+:\d+(/|$)", path) \
                    or re.match(r"^\d{1,3}(\.\d{1,3}){3}(/|$)", path)
                why = (f"no scheme: write {redact_url('rtsp://' + path)} (or http://) for a camera; "
                       f"no video file of that name exists either") if looks_like_host \
                    else f"video file not found: {p}"
                raise ConfigError(why, source=source,
                                  field=f"cameras[{i}].url", line=line_for(("cameras", i, "url"), lines))
            cfg.cameras[i] = cam.model_copy(update={"url": str(p)})
    for cam in cfg.cameras:
        register_url(cam.url)
        register_secret(cam.password)
    _check_tracker_installed(cfg, source, lines)
    _check_startable(cfg, source, lines)
    return cfg


def _check_startable(cfg: Config, source: str, lines: dict[tuple[Any, ...], int]) -> None:
    """What the daemon refuses at start, before any camera opens, refused here already: so
    ``streamd check`` says OK only to a config ``streamd run`` accepts. (Whether a backend
    opens model.path is the backend registry's to say: ``streamd check`` asks it.)"""
    from .security import publisher_exposure_problem
    pub = cfg.publisher
    problem = publisher_exposure_problem(pub.endpoint, pub.curve is not None, pub.allow_non_loopback)
    if problem is not None:
        raise ConfigError(problem, source=source, field="publisher.endpoint",
                          line=line_for(("publisher", "endpoint"), lines))


def _check_tracker_installed(cfg: Config, source: str, lines: dict[tuple[Any, ...], int]) -> None:
    """ByteTrack comes with the optional 'tracking' extra: say so at load, not at the first frame."""
    import importlib.util
    wanted = [("tracking",)] if cfg.tracking.tracker == "bytetrack" else []
    wanted += [("cameras", i, "tracking") for i, cam in enumerate(cfg.cameras)
               if cam.enabled and cfg.tracking_for(cam.id).tracker == "bytetrack"]
    if not wanted:
        return
    if importlib.util.find_spec("trackers") is None:
        key = wanted[0] + ("tracker",)
        raise ConfigError("bytetrack needs the tracker library: pip install 'streamd[tracking]'",
                          source=source, field=dotted(key), line=line_for(key, lines))


def _resolve_curve_keys(cfg: Config, source: str, base_dir: Path | None,
                        lines: dict[tuple[Any, ...], int], check_files: bool) -> Config:
    """Key paths follow the config file like model.path; with ``check_files`` the keys are
    read now, so a bad key fails ``streamd check`` rather than the daemon's start."""
    curve = cfg.publisher.curve
    if curve is None:
        return cfg
    from .security import KeyFileError, load_allowed_keys, load_secret_key_file
    update: dict[str, Path] = {}
    for name in ("server_secret_key", "allowed_clients_dir"):
        p: Path = getattr(curve, name)
        if not p.is_absolute() and base_dir is not None:
            update[name] = base_dir / p
    curve = curve.model_copy(update=update)
    cfg = cfg.model_copy(update={"publisher": cfg.publisher.model_copy(update={"curve": curve})})
    if check_files:
        checks = (("server_secret_key", load_secret_key_file), ("allowed_clients_dir", load_allowed_keys))
        for name, load in checks:
            try:
                load(getattr(curve, name))
            except KeyFileError as exc:
                raise ConfigError(str(exc), source=source, field=f"publisher.curve.{name}",
                                  line=line_for(("publisher", "curve", name), lines)) from None
    return cfg


def load_config(path: str | os.PathLike[str], env: dict[str, str] | None = None,
                check_files: bool = True) -> Config:
    return load_file(path, parse_config, "config file", env=env, check_files=check_files)


