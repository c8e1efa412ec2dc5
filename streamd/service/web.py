"""The daemon's HTTP server assembled from its parts (``http:`` in the config): metrics and
health always; with ``api: true`` the detect/tasks door and the live hub too, and their
counters on the metrics page."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

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
        registry.register(HttpCollector(tasks, d.live))
    server = HttpServer(registry, h.host, h.port, health=d.health_problem, parts=parts, token=h.read_token(),
                        max_body_bytes=h.max_body_bytes, cors_origins=h.cors_origins)
    return server, tasks


class HttpCollector:
    """The HTTP door's request outcomes and the WebSocket clients, read at scrape time."""

    def __init__(self, tasks: HttpTasks, live: LiveHub) -> None:
        self._tasks, self._live = tasks, live

    def describe(self) -> list[Metric]:
        return self._families()

    def _families(self) -> list[Metric]:
        return [CounterMetricFamily("streamd_http_requests", "Pictures posted to /api/v1/detect, by outcome "
                                    "(accepted, busy, rejected, completed, failed).", labels=["outcome"]),
                GaugeMetricFamily("streamd_websocket_clients", "WebSocket clients connected."),
                CounterMetricFamily("streamd_websocket_clients_dropped", "WebSocket clients dropped for "
                                    "falling behind."),
                CounterMetricFamily("streamd_websocket_messages_sent", "Messages queued to WebSocket clients."),
                CounterMetricFamily("streamd_websocket_messages_dropped", "Messages lost with a dropped client.")]

    def collect(self) -> list[Metric]:
        outcomes, clients, dropped, sent, lost = fams = self._families()
        for outcome, n in dict(self._tasks.counts).items():
            outcomes.add_metric([outcome], float(n))
        c = self._live.counters()
        clients.add_metric([], float(c["clients"]))
        dropped.add_metric([], float(c["clients_dropped"]))
        sent.add_metric([], float(c["sent"]))
        lost.add_metric([], float(c["dropped"]))
        return fams
