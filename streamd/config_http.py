"""The ``http:`` section: the daemon's one HTTP server (``/metrics``, ``/healthz``, the detect
and cameras API, the WebSocket and the live view). Kept beside config.py so the main schema
stays readable; ``streamd.config`` re-exports these names.

``metrics:`` (host, port, enabled) is the older spelling of the same server: a file that has
only ``metrics:`` keeps what it had (``/metrics`` and ``/healthz``, on any address, no API).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, model_validator

from .config_loader import StrictModel, line_for, one_or_none, read_secret
from .errors import ConfigError
from .redact import register_secret


def is_loopback(host: str) -> bool:
    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False            # a host name other than localhost may resolve anywhere


class HttpConfig(StrictModel):
    enabled: bool = True
    host: str = Field("127.0.0.1", description="listen address; loopback by default")
    port: int = Field(9108, ge=0, le=65535, description="0 picks a free port (logged at start)")
    api: bool = Field(True, description="serve /api/v1 (detect, tasks, cameras, WebSocket) and the live view "
                                        "at /; false: only /metrics and /healthz")
    allow_non_loopback: bool = Field(False, description="needed (with a token) to listen beyond loopback")
    token: SecretStr | None = Field(None, description="bearer token every request must carry; inline or "
                                                      "'${ENV_NAME}'; instead of token_file")
    token_file: Path | None = Field(None, description="a file holding the token (first line), instead of "
                                                      "token; relative to the config file")
    max_body_bytes: int = Field(20_000_000, ge=1000, description="larger request bodies get 413")
    max_pixels: int = Field(50_000_000, ge=1000, description="larger pictures get 413")
    result_ttl_s: float = Field(300, gt=0, description="a finished task's result is kept this long, then "
                                                       "'expired'")
    max_wait_s: float = Field(30, gt=0, le=300, description="the longest ?wait= a task poll may ask for")
    ws_queue: int = Field(256, ge=1, le=100000, description="messages queued per WebSocket client; a client "
                                                            "that falls this far behind is dropped")
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed to call the API from "
                                                                      "a browser; none by default")

    def read_token(self) -> str | None:
        """The bearer token, read from ``token_file`` when that is how it was given."""
        value = read_secret(self.token, self.token_file, "token")
        register_secret(value)
        return value

    @model_validator(mode="after")
    def _one_token(self) -> "HttpConfig":
        one_or_none(self, "token", "token_file")
        return self


def check_http(cfg: HttpConfig, source: str, base_dir: Path | None, lines: dict[tuple[Any, ...], int],
               check_files: bool) -> HttpConfig:
    """Resolve ``token_file`` against the config's folder and enforce the exposure rule: the API
    beyond loopback only with ``allow_non_loopback: true`` and a token of 16 characters or more."""
    def fail(msg: str, key: str) -> ConfigError:
        return ConfigError(msg, source=source, field=f"http.{key}", line=line_for(("http", key), lines))
    if cfg.token_file is not None and not cfg.token_file.is_absolute() and base_dir is not None:
        cfg = cfg.model_copy(update={"token_file": base_dir / cfg.token_file})
    # /metrics and /healthz alone may be served anywhere, as ``metrics:`` always could.
    if cfg.enabled and cfg.api and not is_loopback(cfg.host):
        if not cfg.allow_non_loopback:
            raise fail(f"{cfg.host} is not a loopback address: set allow_non_loopback: true and a token "
                       "to serve beyond this machine", "host")
        if cfg.token is None and cfg.token_file is None:
            raise fail("serving beyond loopback needs a bearer token (token: or token_file:)", "token")
    if check_files and (cfg.token is not None or cfg.token_file is not None):
        key = "token" if cfg.token is not None else "token_file"
        try:
            token = cfg.read_token()
        except ConfigError as exc:
            raise fail(exc.reason, key) from None
        if not token or len(token) < 16:
            raise fail("the token must be at least 16 characters", key)
    return cfg
