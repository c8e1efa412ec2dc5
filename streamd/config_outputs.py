"""The broker parts of the config: the ``outputs:`` section (transports beside the ZeroMQ
socket: MQTT, Redis Streams), the fleet request queue ``requests.redis``, and their
credentials. Kept beside config.py so the main schema stays readable; ``streamd.config``
re-exports these names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, Field, SecretStr, model_validator

from .config_loader import StrictModel, line_for, one_or_none, read_secret
from .errors import ConfigError
from .redact import redact_url, register_secret, register_url


def check_topic_prefix(v: str) -> str:
    # MQTT wildcards or an empty level would make topics nobody can subscribe to exactly.
    if not re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*", v):
        raise ValueError("must be words of letters, digits, '_', '.', '-' separated by '/'")
    return v


TopicPrefix = Annotated[str, AfterValidator(check_topic_prefix)]


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
        one_or_none(self, "password", "password_file")
        return self

    def read_password(self) -> str | None:
        """The password, read from ``password_file`` when that is how it was given."""
        return read_secret(self.password, self.password_file, "password")


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


def check_redis_url(v: str) -> str:
    if not re.match(r"^(redis|rediss|unix)://", v):
        raise ValueError(f"must start with redis://, rediss:// or unix:// (got {redact_url(v)})")
    return v


RedisUrl = Annotated[str, AfterValidator(check_redis_url)]
REDIS_URL_HELP = "redis://[[user]:password@]host:port/db, rediss:// for TLS, unix:///path.sock"


class RedisOutputConfig(PasswordSource):
    enabled: bool = True
    url: RedisUrl = Field("redis://127.0.0.1:6379/0", description=REDIS_URL_HELP)
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


class RedisRequestsConfig(PasswordSource):
    """``requests.redis``: take on-demand pictures from a stream that a fleet of daemons shares."""
    enabled: bool = True
    url: RedisUrl = Field("redis://127.0.0.1:6379/0", description=REDIS_URL_HELP)
    stream: str = Field("streamd:requests", pattern=r"^[A-Za-z0-9_.:{}-]+$",
                        description="the stream submitters XADD tasks to")
    group: str = Field("streamd", pattern=r"^[A-Za-z0-9_.:-]+$",
                       description="consumer group every daemon of the fleet joins")
    consumer: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:-]{1,128}$",
                                 description="this daemon's name in the group (default: <origin>-<pid>)")
    result_prefix: str = Field("result", pattern=r"^[A-Za-z0-9_.:{}-]+$",
                               description="results are stored at <result_prefix>:<task_id>")
    result_ttl_s: int = Field(3600, ge=1, le=30 * 86400, description="how long a stored result is kept")
    max_queued: int = Field(1000, ge=1, le=10_000_000, description="tasks submitted and not yet answered; "
                            "beyond this submitters get 'busy' (stored at <stream>:max_queued)")
    prefetch: int | None = Field(None, ge=1, le=1024, description="tasks this daemon holds at once "
                                 "(default: scheduler.max_batch, capped by the model's)")
    reclaim_idle_s: float = Field(30, ge=0.5, le=86400, description="a task a consumer has held this long "
                                  "without renewing it (its daemon died) is taken over by another")
    max_deliveries: int = Field(5, ge=1, le=1000, description="a task taken over this many times is answered "
                                "with an error instead (a picture that stops every daemon that takes it)")
    backoff_initial_s: float = Field(1, gt=0, le=600)
    backoff_max_s: float = Field(30, gt=0, le=3600)


class OutputsConfig(StrictModel):
    """Transports beside the ZeroMQ PUB socket; each is off unless its block is present."""
    mqtt: MqttOutputConfig | None = None
    redis: RedisOutputConfig | None = None



def resolve_output_secrets(outputs: OutputsConfig, source: str, base_dir: Path | None,
                           lines: dict[tuple[Any, ...], int], check_files: bool) -> OutputsConfig:
    """File paths follow the config file; every password (inline, in a file, in a URL) is
    registered so it is scrubbed from logs; with ``check_files`` the files are read now, so
    ``streamd check`` names a missing one."""
    update: dict[str, Any] = {}
    for name in ("mqtt", "redis"):
        out: MqttOutputConfig | RedisOutputConfig | None = getattr(outputs, name)
        if out is not None:
            update[name] = resolve_broker_secrets(out, ("outputs", name), source, base_dir, lines, check_files)
    return outputs.model_copy(update=update) if update else outputs


BrokerT = TypeVar("BrokerT", bound=PasswordSource)


def resolve_broker_secrets(out: BrokerT, where: tuple[str, ...], source: str, base_dir: Path | None,
                           lines: dict[tuple[Any, ...], int], check_files: bool) -> BrokerT:
    """One broker block (``where``: its path in the file) as ``resolve_output_secrets`` says."""
    def near(p: Path | None) -> Path | None:
        return base_dir / p if p is not None and not p.is_absolute() and base_dir is not None else p

    files: dict[str, Path | None] = {"password_file": out.password_file}
    changes: dict[str, Any] = {"password_file": near(out.password_file)}
    if isinstance(out, MqttOutputConfig) and out.tls is not None:
        tls_files = {k: near(getattr(out.tls, k)) for k in ("ca_file", "cert_file", "key_file")}
        changes["tls"] = out.tls.model_copy(update=tls_files)
        files.update({f"tls.{k}": v for k, v in tls_files.items()})
    out = out.model_copy(update=changes)
    if check_files and getattr(out, "enabled", True):
        for key, path in files.items():
            path = near(path)
            if path is not None and not path.is_file():
                raise ConfigError(f"file not found: {path}", source=source, field=".".join((*where, key)),
                                  line=line_for((*where, *key.split(".")), lines))
        register_secret(out.read_password())
    register_secret(out.password.get_secret_value() if out.password is not None else None)
    url = getattr(out, "url", None)
    if isinstance(url, str):
        register_url(url)
    return out
