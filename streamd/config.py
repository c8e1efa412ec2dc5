"""Typed, validated configuration with errors that name the field and the YAML line.

One schema for the whole file (the outputs' blocks included), so it runs past 400 lines.

Loading goes: YAML text -> node tree (we keep every value's line) -> ``${ENV}`` expansion ->
pydantic models with ``extra="forbid"``. Any problem becomes one ``ConfigError`` per
offending field: ``streamd.yaml:14: cameras[1].fps: ...``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.types import FiniteFloat

# load_yaml, validate_model and parse_model are part of this module's interface too: the
# loading itself lives in config_loader, shared with the alert rules.
from .config_loader import (ModelT, StrictModel, dotted, line_for, load_file, load_yaml, parse_model,  # noqa: F401
                            validate_model, validation_error)
from .errors import ConfigError
from .geometry import polygon_problem
from .redact import redact_url, register_secret, register_url
from .thresholds import DEFAULT_CONF, DEFAULT_IOU, DEFAULT_MAX_DET

CAMERA_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
URL_SCHEMES = ("rtsp", "rtsps", "http", "https", "file", "usb")


def check_topic_prefix(v: str) -> str:
    # MQTT wildcards or an empty level would make topics nobody can subscribe to exactly.
    if not re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*", v):
        raise ValueError("must be words of letters, digits, '_', '.', '-' separated by '/'")
    return v


TopicPrefix = Annotated[str, AfterValidator(check_topic_prefix)]


def check_endpoint(v: str) -> str:
    if not re.match(r"^(tcp|ipc|inproc)://.+", v):
        raise ValueError("must look like tcp://HOST:PORT, ipc://PATH or inproc://NAME")
    return v


class ModelConfig(StrictModel):
    path: Path = Field(description="Model file (.onnx; .engine with the TensorRT backend). "
                                   "Relative paths are relative to the config file.")
    backend: Literal["auto", "onnxruntime", "tensorrt"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads per worker (0: chosen with "
                                                "scheduler.workers)")
    conf: float = Field(DEFAULT_CONF, gt=0, lt=1, description="minimum confidence")
    iou: float = Field(DEFAULT_IOU, gt=0, le=1, description="NMS IoU threshold")
    max_det: int = Field(DEFAULT_MAX_DET, ge=1, le=10000)
    classes: list[int | str] | None = Field(None, description="keep only these class ids or names")
    verify_sha256: bool = True
    rebuild_engine: bool = Field(False, description="TensorRT: rebuild an engine that doesn't fit this "
                                                    "TensorRT/GPU from the ONNX its manifest records")


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
    sndhwm: int = Field(10000, ge=1)
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


class RequestsConfig(StrictModel):
    enabled: bool = Field(False, description="serve on-demand image requests on a ZeroMQ ROUTER socket")
    endpoint: str = "tcp://127.0.0.1:5556"
    queue_size: int = Field(32, ge=1, le=10000, description="accepted requests waiting; beyond: 'busy'")
    share: float = Field(0.25, ge=0, le=1, description="part of each batch kept for requests while cameras wait")
    max_image_bytes: int = Field(20_000_000, ge=1000)
    max_pixels: int = Field(50_000_000, ge=1000)
    timeout_s: float = Field(30, gt=0, description="an accepted request not inferred by then gets an error")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        return check_endpoint(v)


class MetricsConfig(StrictModel):
    enabled: bool = True
    host: str = Field("127.0.0.1", description="Prometheus endpoint address; loopback by default")
    port: int = Field(9108, ge=0, le=65535, description="0 picks a free port (logged at start)")


class PasswordSource(StrictModel):
    """A broker password given inline (``${ENV}`` expands) or read from a file (first line)."""
    username: str | None = None
    # SecretStr: the value never shows in a repr, a log line or an error.
    password: SecretStr | None = Field(None, description="inline, or '${ENV_NAME}' to take it from the "
                                                         "environment; instead of password_file")
    password_file: Path | None = Field(None, description="a file holding the password (first line), instead "
                                                         "of password; relative to the config file")

    @model_validator(mode="after")
    def _one_password(self) -> "PasswordSource":
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        return self

    def read_password(self) -> str | None:
        """The password, read from ``password_file`` when that is how it was given."""
        if self.password_file is None:
            return self.password.get_secret_value() if self.password is not None else None
        try:
            lines = self.password_file.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read password_file {self.password_file} ({exc.strerror})") from None
        return lines[0].strip() if lines else ""


class MqttTlsConfig(StrictModel):
    ca_file: Path | None = Field(None, description="CA bundle that signed the broker's certificate "
                                                   "(default: the system's)")
    cert_file: Path | None = Field(None, description="client certificate, for brokers that require one")
    key_file: Path | None = None
    insecure: bool = Field(False, description="skip the host name check of the broker's certificate")


class HomeAssistantConfig(StrictModel):
    enabled: bool = Field(False, description="publish Home Assistant MQTT discovery: per camera, a binary "
                                             "sensor 'present' and a sensor 'count' per class")
    discovery_prefix: TopicPrefix = "homeassistant"
    classes: list[str] | None = Field(None, description="class names to make entities for (default: "
                                                        "model.classes if set, else every class of the model)")


class MqttOutputConfig(PasswordSource):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    client_id: str | None = Field(None, description="default: streamd-<origin>")
    topic_prefix: TopicPrefix = Field("streamd", description="topics are <topic_prefix>/<origin>/<camera>/<kind>")
    qos: Literal[0, 1, 2] = 0
    retain: bool = Field(False, description="retain detections and events (health, stats, availability and "
                                            "Home Assistant states are always retained)")
    only_non_empty: bool = Field(False, description="publish detections messages only when something was found")
    snapshots: bool = Field(False, description="publish each attached JPEG on <camera>/snapshot (retained)")
    keepalive_s: int = Field(30, ge=5, le=3600)
    tls: MqttTlsConfig | None = Field(None, description="connect with TLS (set port to the broker's TLS port)")
    queue_size: int = Field(1000, ge=1, le=1_000_000, description="messages held while the broker is away; "
                                                                  "beyond this the oldest are dropped")
    backoff_initial_s: float = Field(1, gt=0, le=600)
    backoff_max_s: float = Field(30, gt=0, le=3600)
    homeassistant: HomeAssistantConfig = HomeAssistantConfig()


class RedisOutputConfig(PasswordSource):
    enabled: bool = True
    url: str = Field("redis://127.0.0.1:6379/0", description="redis://[[user]:password@]host:port/db, "
                                                              "rediss:// for TLS, unix:///path.sock")
    key_prefix: str = Field("streamd", pattern=r"^[A-Za-z0-9_.:-]+$",
                            description="streams are <key_prefix>:<origin>:<kind>")
    maxlen: int = Field(100_000, ge=1, description="each stream is trimmed to about this many entries "
                                                   "(XADD MAXLEN ~)")
    kinds: list[Literal["detections", "event", "health", "stats"]] = Field(
        ["detections", "event", "health"], description="what to append")
    only_non_empty: bool = Field(False, description="append detections only when something was found")
    snapshots: bool = Field(False, description="store an attached JPEG in the entry's 'snapshot' field")
    queue_size: int = Field(10000, ge=1, le=1_000_000, description="entries held while Redis is away; "
                                                                   "beyond this the oldest are dropped")
    backoff_initial_s: float = Field(1, gt=0, le=600)
    backoff_max_s: float = Field(30, gt=0, le=3600)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^(redis|rediss|unix)://", v):
            raise ValueError(f"must start with redis://, rediss:// or unix:// (got {redact_url(v)})")
        return v


class OutputsConfig(StrictModel):
    """Transports beside the ZeroMQ PUB socket; each is off unless its block is present."""
    mqtt: MqttOutputConfig | None = None
    redis: RedisOutputConfig | None = None


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
    metrics: MetricsConfig = MetricsConfig()
    outputs: OutputsConfig = OutputsConfig()
    log: LogConfig = LogConfig()
    tracking: TrackingConfig = TrackingConfig()

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

    # Relative model paths follow the config file, so a service's cwd doesn't matter.
    model_path = cfg.model.path
    if not model_path.is_absolute() and base_dir is not None:
        model_path = (base_dir / model_path)
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": model_path})})
    if check_files and not cfg.model.path.is_file():
        raise ConfigError(f"model file not found: {cfg.model.path}", source=source, field="model.path",
                          line=line_for(("model", "path"), lines))
    cfg = _resolve_curve_keys(cfg, source, base_dir, lines, check_files)
    cfg = _resolve_output_secrets(cfg, source, base_dir, lines, check_files)
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
    return cfg


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


def _resolve_output_secrets(cfg: Config, source: str, base_dir: Path | None,
                            lines: dict[tuple[Any, ...], int], check_files: bool) -> Config:
    """File paths follow the config file; every password (inline, in a file, in a URL) is
    registered so it is scrubbed from logs; with ``check_files`` the files are read now, so
    ``streamd check`` names a missing one."""
    def near(p: Path | None) -> Path | None:
        return base_dir / p if p is not None and not p.is_absolute() and base_dir is not None else p

    update: dict[str, Any] = {}
    for name in ("mqtt", "redis"):
        out: MqttOutputConfig | RedisOutputConfig | None = getattr(cfg.outputs, name)
        if out is None:
            continue
        files: dict[str, Path | None] = {"password_file": out.password_file}
        changes: dict[str, Any] = {"password_file": near(out.password_file)}
        if isinstance(out, MqttOutputConfig) and out.tls is not None:
            tls_files = {k: near(getattr(out.tls, k)) for k in ("ca_file", "cert_file", "key_file")}
            changes["tls"] = out.tls.model_copy(update=tls_files)
            files.update({f"tls.{k}": v for k, v in tls_files.items()})
        out = out.model_copy(update=changes)
        if check_files and out.enabled:
            for key, path in files.items():
                path = near(path)
                if path is not None and not path.is_file():
                    raise ConfigError(f"file not found: {path}", source=source, field=f"outputs.{name}.{key}",
                                      line=line_for(("outputs", name, *key.split(".")), lines))
            register_secret(out.read_password())
        register_secret(out.password.get_secret_value() if out.password is not None else None)
        if isinstance(out, RedisOutputConfig):
            register_url(out.url)
        update[name] = out
    if not update:
        return cfg
    return cfg.model_copy(update={"outputs": cfg.outputs.model_copy(update=update)})


def load_config(path: str | os.PathLike[str], env: dict[str, str] | None = None,
                check_files: bool = True) -> Config:
    return load_file(path, parse_config, "config file", env=env, check_files=check_files)


