"""The alert rules file: typed, validated, with errors that name the rule, field and line.

Loaded with the same machinery as the daemon's config (``streamd.config_loader``): YAML with
line numbers, ``${ENV}`` expansion, pydantic models with ``extra="forbid"``. A problem in a
rule reads ``alerts.yaml:14: rule 'door' (rules[1]).zone: needs at least 3 points``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Literal, get_args

from pydantic import Field, FiniteFloat, field_validator

from ..config import CAMERA_ID
from ..config_loader import StrictModel, dotted, line_for, load_file, load_yaml, validate_model
from ..errors import ConfigError
from ..redact import register_secret, register_url
from ..geometry import crossing_edges, polygon_area

EventName = Literal["alert", "camera_health", "camera_recovered", "daemon_silent", "daemon_back",
                    "messages_lost", "publisher_restarted"]
EVENT_NAMES: tuple[EventName, ...] = get_args(EventName)
# Header values that are credentials: kept out of every log line.
_SECRET_HEADER = re.compile(r"(?i)auth|token|key|secret|cookie|pass")
# What a rule watches: "frames" judges each detections message (no tracking needed); the
# others follow tracked objects (track_id) one by one, each firing once per object per cooldown.
Trigger = Literal["frames", "dwell", "present", "enter", "leave", "cross"]
Direction = Literal["any", "left_to_right", "right_to_left", "top_to_bottom", "bottom_to_top"]
HealthState = Literal["starting", "connecting", "streaming", "stalled", "lost", "reconnecting", "ended", "stopped"]


def _all_events() -> list[EventName]:
    return list(EVENT_NAMES)


def _alerts_only() -> list[EventName]:
    return ["alert"]


def _outages() -> list[HealthState]:
    return ["lost", "stalled", "reconnecting"]


class Rule(StrictModel):
    name: str = Field(min_length=1, max_length=100, description="shown in alerts and snapshot file names")
    enabled: bool = True
    cameras: list[str] = Field(default_factory=lambda: ["*"], min_length=1,
                               description='camera ids, or "*" for every camera')
    classes: list[int | str] = Field(default_factory=list, description="names or ids; empty: any class")
    min_confidence: float = Field(0.0, ge=0, le=1)
    zone: list[tuple[FiniteFloat, FiniteFloat]] | None = Field(
        None, description="polygon in frame pixels, [[x, y], ...], at least 3 points")
    zone_test: Literal["bottom_center", "overlap"] = Field(
        "bottom_center", description="bottom_center: the box's bottom middle is in the zone; "
                                     "overlap: at least min_overlap of the box's area is")
    min_overlap: float = Field(0.5, gt=0, le=1, description="zone_test overlap: fraction of the box area")
    min_duration_s: float = Field(0.0, ge=0, le=86400, description="the match must last this long")
    min_frames: int = Field(1, ge=1, le=100000, description="... and hold for this many consecutive frames")
    cooldown_s: float = Field(10.0, ge=0, le=86400, description="quiet time per rule and camera after firing")
    min_count: int = Field(1, ge=1, le=10000, description="at least this many matching objects in the frame")
    trigger: Trigger = Field("frames", description="frames: per message (min_count, min_frames); per tracked "
                             "object: dwell (in the zone min_duration_s), present (matching min_duration_s, "
                             "zone optional), enter / leave (the zone), cross (the line)")
    line: list[tuple[FiniteFloat, FiniteFloat]] | None = Field(
        None, description="trigger cross: [[x1, y1], [x2, y2]] in frame pixels, crossed by the box's bottom-centre")
    direction: Direction = Field("any", description="trigger cross: which way counts (as seen in the picture)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("is blank")
        return v.strip()

    @field_validator("cameras", mode="before")
    @classmethod
    def _star(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("cameras")
    @classmethod
    def _cameras(cls, v: list[str]) -> list[str]:
        for c in v:
            if c != "*" and not CAMERA_ID.match(c):
                raise ValueError(f"'{c}' is not a camera id (1-64 letters, digits, '_', '.', '-') or \"*\"")
        return v

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[int | str]) -> list[int | str]:
        for c in v:
            if isinstance(c, int) and c < 0:
                raise ValueError(f"class id {c} is negative")
            if isinstance(c, str) and not c.strip():
                raise ValueError("a class name is blank")
        return v

    @field_validator("zone", mode="before")
    @classmethod
    def _points(cls, v: Any) -> Any:
        if isinstance(v, list):
            for i, pt in enumerate(v):
                if not isinstance(pt, (list, tuple)) or len(pt) != 2:
                    raise ValueError(f"point {i} must be [x, y], got {pt!r}")
        return v

    @field_validator("zone")
    @classmethod
    def _zone(cls, v: list[tuple[float, float]] | None) -> list[tuple[float, float]] | None:
        if v is None:
            return v
        if len(v) < 3:
            raise ValueError(f"needs at least 3 points [x, y], got {len(v)}")
        if polygon_area(v) <= 0:
            raise ValueError("encloses no area (its points are on one line)")
        crossing = crossing_edges(v)
        if crossing is not None:
            i, j = crossing
            n = len(v)
            raise ValueError(f"edges cross each other (points {i}->{(i + 1) % n} and {j}->{(j + 1) % n}); "
                             "list the points in order around the area")
        return v

    @field_validator("line")
    @classmethod
    def _line(cls, v: list[tuple[float, float]] | None) -> list[tuple[float, float]] | None:
        if v is not None and (len(v) != 2 or v[0] == v[1]):
            raise ValueError("needs two different points [[x1, y1], [x2, y2]]")
        return v

    @property
    def per_object(self) -> bool:
        return self.trigger != "frames"

    def trigger_problem(self) -> tuple[str, str] | None:
        """(field, why) when the trigger lacks what it needs or has what it ignores."""
        t = self.trigger
        if t in ("dwell", "enter", "leave") and self.zone is None:
            return "zone", f"trigger {t} needs a zone: [[x, y], ...]"
        if (t == "cross") != (self.line is not None):
            return ("line", "trigger cross needs a line: [[x1, y1], [x2, y2]]") if t == "cross" else \
                ("line", "only used with trigger: cross")
        if t == "cross" and self.zone is not None:
            return "zone", "trigger cross follows the line, not a zone"
        if "direction" in self.model_fields_set and t != "cross":
            return "direction", "only used with trigger: cross"
        if self.line is not None and self.direction != "any":
            (x1, y1), (x2, y2) = self.line
            if self.direction in ("left_to_right", "right_to_left") and y1 == y2:
                return "direction", "a horizontal line has no left and right: top_to_bottom or bottom_to_top"
            if self.direction in ("top_to_bottom", "bottom_to_top") and x1 == x2:
                return "direction", "a vertical line has no top and bottom: left_to_right or right_to_left"
        if t in ("enter", "leave", "cross") and "min_duration_s" in self.model_fields_set:
            return "min_duration_s", f"trigger {t} fires at the moment it happens: use dwell or present"
        if self.per_object:
            for key in ("min_count", "min_frames"):
                if key in self.model_fields_set:
                    return key, "counts frames: only used with trigger: frames"
        return None

    @property
    def all_cameras(self) -> bool:
        return "*" in self.cameras


class WebhookSinkConfig(StrictModel):
    url: str = Field(description="http:// or https:// address the alert JSON is POSTed to")
    headers: dict[str, str] = Field(default_factory=dict, description="extra request headers")
    events: list[EventName] = Field(default_factory=_all_events)
    timeout_s: float = Field(5.0, gt=0, le=300, description="per request")
    retries: int = Field(5, ge=0, le=100, description="tries after the first one fails")
    backoff_initial_s: float = Field(0.5, gt=0, le=600, description="wait before the first retry; doubles each time")
    backoff_max_s: float = Field(30.0, gt=0, le=3600)
    queue_size: int = Field(1000, ge=1, le=1_000_000, description="alerts waiting; beyond it the oldest is dropped")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http:// or https:// URL")
        return v


class CommandSinkConfig(StrictModel):
    argv: list[str] = Field(min_length=1, description="program and arguments, run without a shell; "
                                                      "the event JSON arrives on its stdin")
    events: list[EventName] = Field(default_factory=_alerts_only)
    timeout_s: float = Field(10.0, gt=0, le=3600, description="killed after this long")
    queue_size: int = Field(100, ge=1, le=1_000_000)

    @field_validator("argv")
    @classmethod
    def _argv(cls, v: list[str]) -> list[str]:
        if not v[0].strip():
            raise ValueError("the program (first item) is blank")
        return v


class SinksConfig(StrictModel):
    stdout: bool = Field(True, description="one JSON object per line on standard output")
    webhooks: list[WebhookSinkConfig] = Field(default_factory=list)
    commands: list[CommandSinkConfig] = Field(default_factory=list)


class AlertConfig(StrictModel):
    endpoint: str = Field("tcp://127.0.0.1:5555", description="the daemon's publisher.endpoint")
    server_key: Path | None = Field(None, description="CURVE: the daemon's public key file (NAME.key)")
    client_key: Path | None = Field(None, description="CURVE: this subscriber's secret key file (NAME.key_secret)")
    silence_s: float = Field(5.0, gt=0, le=3600, description="no message this long -> daemon_silent")
    health_alerts: bool = Field(False, description="camera_health events when a camera enters health_states")
    health_states: list[HealthState] = Field(default_factory=_outages)
    snapshots_dir: Path | None = Field(None, description="annotated JPEG per alert (relative to this file)")
    rules: list[Rule] = Field(default_factory=list)
    sinks: SinksConfig = SinksConfig()

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if not re.match(r"^(tcp|ipc|inproc)://.+", v):
            raise ValueError("must look like tcp://HOST:PORT, ipc://PATH or inproc://NAME")
        return v


def _field_namer(data: dict[str, Any]) -> Callable[[tuple[Any, ...]], str]:
    """Name rule fields by the rule's own name as well as its index: people find
    ``rule 'door' (rules[3])`` in a long file faster than ``rules[3]``."""
    raw_rules = data.get("rules")

    def name(loc: tuple[Any, ...]) -> str:
        if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int) and isinstance(raw_rules, list) \
                and loc[1] < len(raw_rules) and isinstance(raw_rules[loc[1]], dict) \
                and isinstance(raw_rules[loc[1]].get("name"), str):
            head = f"rule '{raw_rules[loc[1]]['name']}' ({dotted(loc[:2])})"
            rest = dotted(loc[2:]) if len(loc) > 2 else ""
            return head + (f".{rest}" if rest and not rest.startswith("[") else rest)
        return dotted(loc)

    return name


def _rule_field(cfg: AlertConfig, i: int, key: str) -> str:
    return f"rule '{cfg.rules[i].name}' (rules[{i}]).{key}"


def parse_rules(text: str, source: str = "<rules>", base_dir: Path | None = None,
                env: dict[str, str] | None = None) -> AlertConfig:
    """Parse and validate a rules file's text. Raises ``ConfigError`` naming rule, field and line."""
    data, lines = load_yaml(text, source, env, expected="a mapping with rules:, sinks:, ... at the top level")
    cfg = validate_model(AlertConfig, data, lines, source, _field_namer(data))

    def fail(i: int, key: str, message: str) -> ConfigError:
        return ConfigError(message, source=source, field=_rule_field(cfg, i, key),
                           line=line_for(("rules", i, key), lines))

    seen: dict[str, int] = {}
    for i, rule in enumerate(cfg.rules):
        if rule.name in seen:
            raise fail(i, "name", f"duplicate rule name '{rule.name}' (first used by rules[{seen[rule.name]}])")
        seen[rule.name] = i
        problem = rule.trigger_problem()
        if problem is not None:
            raise fail(i, *problem)
        if rule.zone is None:
            for key in ("zone_test", "min_overlap"):
                if key in rule.model_fields_set:
                    raise fail(i, key, "only means something with a zone: add zone: [[x, y], ...]")
        elif "min_overlap" in rule.model_fields_set and rule.zone_test != "overlap":
            raise fail(i, "min_overlap", "only used with zone_test: overlap")

    for have, need in (("server_key", "client_key"), ("client_key", "server_key")):
        if getattr(cfg, have) is not None and getattr(cfg, need) is None:
            raise ConfigError(f"CURVE needs {need} as well", source=source, field=have,
                              line=line_for((have,), lines))

    # Paths follow the rules file, so a service's working directory doesn't matter.
    if base_dir is not None:
        for key in ("snapshots_dir", "server_key", "client_key"):
            value = getattr(cfg, key)
            if value is not None and not value.is_absolute():
                cfg = cfg.model_copy(update={key: base_dir / value})
        commands = []
        for c in cfg.sinks.commands:
            prog = c.argv[0]
            if "/" in prog and not os.path.isabs(prog):
                c = c.model_copy(update={"argv": [str(base_dir / prog), *c.argv[1:]]})
            commands.append(c)
        cfg = cfg.model_copy(update={"sinks": cfg.sinks.model_copy(update={"commands": commands})})
    for hook in cfg.sinks.webhooks:
        register_url(hook.url)
        for key, value in hook.headers.items():
            if _SECRET_HEADER.search(key):
                register_secret(value)
    return cfg


def load_rules(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> AlertConfig:
    return load_file(path, parse_rules, "rules file", env=env)
