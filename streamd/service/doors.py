"""Front doors built from the config whose libraries are optional: imported only when the
config asks for them, so a daemon-only install without them still runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..config import RequestsConfig
from ..errors import ConfigError
from ..pipeline.requests import RequestQueue

if TYPE_CHECKING:
    from .redis_requests import RedisRequestDoor


def open_fleet_door(cfg: RequestsConfig, requests: RequestQueue, *args: Any) -> RedisRequestDoor:
    """The Redis front door of ``requests.redis`` (arguments as ``RedisRequestDoor`` after the configs)."""
    try:
        from .redis_requests import RedisRequestDoor
    except ImportError as exc:
        raise ConfigError(f"needs a library that is not installed ({exc.name}): pip install 'streamd[redis]'",
                          field="requests.redis") from None
    assert cfg.redis is not None
    return RedisRequestDoor(cfg.redis, cfg, requests, *args)
