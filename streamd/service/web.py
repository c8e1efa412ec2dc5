"""The daemon's HTTP server assembled from its parts (``http:`` in the config): metrics and
health always; with ``api: true`` the detect/tasks door and the live hub too."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .http import HttpServer
from .http_live import LiveHub
from .http_tasks import HttpTasks
from .metrics import Registry

if TYPE_CHECKING:
    from ..config import Config
    from .daemon import Daemon


def api_enabled(cfg: Config) -> bool:
    return cfg.http.enabled and cfg.http.api


def build_http_server(d: Daemon, registry: Registry) -> tuple[HttpServer, HttpTasks | None]:
    """The server (bound, not started) and its request door, if the API is on."""
    h = d.cfg.http
    tasks = None
    parts: list[HttpTasks | LiveHub] = []
    if api_enabled(d.cfg) and d.request_queue is not None and d.live is not None:
        tasks = HttpTasks(h, d.request_queue, d.backend.info.names, default_params=lambda: d.pipeline.params,
                          timeout_s=d.cfg.requests.timeout_s)
        parts = [tasks, d.live]
    server = HttpServer(registry, h.host, h.port, health=d.health_problem, parts=parts, token=h.read_token(),
                        max_body_bytes=h.max_body_bytes, cors_origins=h.cors_origins)
    return server, tasks
