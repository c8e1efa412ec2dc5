"""The broker outputs a config asks for (a registry by config key), built and started; the
output stage then offers them every message beside the ZeroMQ publisher.

Each output owns its connection in its own thread and only queues in :meth:`offer`, so
fanning out costs the caller a few appends, whatever the brokers are doing.
"""

from __future__ import annotations

from typing import Any, Callable

from ..config import MqttOutputConfig, OutputsConfig, RedisOutputConfig
from ..errors import ConfigError
from .base import Output


def _mqtt(cfg: MqttOutputConfig, origin: str, labels: list[str]) -> Output:
    from .mqtt import MqttOutput   # paho-mqtt is an optional dependency: imported only when used
    chosen = cfg.homeassistant.classes
    if chosen is not None:
        known = {label.lower() for label in labels}
        for i, c in enumerate(chosen):
            if c.lower() not in known:
                raise ConfigError(f"class '{c}' is not in the model ({', '.join(labels)})",
                                  field=f"outputs.mqtt.homeassistant.classes[{i}]")
    return MqttOutput(cfg, origin, chosen if chosen is not None else labels)


def _redis(cfg: RedisOutputConfig, origin: str, labels: list[str]) -> Output:
    from .redis_streams import RedisStreamsOutput   # redis-py is optional too
    return RedisStreamsOutput(cfg, origin)


# config key under outputs: -> (builder, the pip extra that installs its library)
BUILDERS: dict[str, tuple[Callable[[Any, str, list[str]], Output], str]] = {
    "mqtt": (_mqtt, "mqtt"),
    "redis": (_redis, "redis"),
}


def build_outputs(cfg: OutputsConfig, origin: str, labels: list[str]) -> list[Output]:
    """Make and start every enabled output. ``labels``: the class names the model reports
    (after ``model.classes``). Raises ``ConfigError`` for a missing library or a bad value."""
    made: list[Output] = []
    try:
        for key, (build, extra) in BUILDERS.items():
            sub = getattr(cfg, key)
            if sub is None or not sub.enabled:
                continue
            try:
                out = build(sub, origin, labels)
            except ImportError as exc:
                raise ConfigError(f"needs a library that is not installed ({exc.name}): "
                                  f"pip install 'streamd[{extra}]'", field=f"outputs.{key}") from None
            made.append(out)
        for out in made:
            out.start()     # type: ignore[attr-defined]  # every registered output is a thread
    except BaseException:
        for out in made:
            out.close(0.1)
        raise
    return made
