"""The daemon's HTTP endpoint: ``GET /metrics`` (Prometheus) and ``GET /healthz``.

``/metrics`` is prometheus_client's own WSGI app (text format 0.0.4 by default, OpenMetrics
or gzip when the scraper asks for them). Around it, on the standard library's WSGI server:
``/healthz``, a 404 for any other path, and a scrape whose collector raises answered with a
short 500 naming the error, the server staying up; the library's own server would serve
metrics on every path and has no health route.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any, Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from ..errors import StreamdError
from .metrics import Registry

log = logging.getLogger("streamd.metrics")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9108

HealthCheck = Callable[[], "str | None"]   # None (or "") when healthy, else the reason
StartResponse = Callable[..., Any]


class _Server(ThreadingWSGIServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr for every client that hangs up early.
        log.debug("metrics request from %s failed", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(WSGIRequestHandler):
    timeout = 10                   # a client that stops sending cannot pin a thread forever
    server_version = "streamd-metrics"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)


def _text(start_response: StartResponse, status: str, body: str) -> list[bytes]:
    data = body.encode("utf-8")
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))])
    return [data]


class MetricsServer:
    """``GET /metrics`` and ``GET /healthz`` on a daemon thread.

    Binds in the constructor, so a busy port fails start-up with a clear error (port 0
    picks a free one: read ``.port``). ``health`` returns None when healthy or a short
    reason, served as 503. ``stop()`` also closes the registry (NVML)."""

    def __init__(self, registry: Registry, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 health: HealthCheck | None = None) -> None:
        self.registry = registry
        self._health_check = health
        self._metrics_app = make_wsgi_app(registry)
        cls = _Server6 if ":" in host else _Server
        try:
            self._server = make_server(host.strip("[]"), port, self._app, server_class=cls, handler_class=_Handler)
        except OSError as exc:
            raise StreamdError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None
        self._closed = False

    # ---- requests (one thread each) ------------------------------------------------------------
    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        head = environ.get("REQUEST_METHOD") == "HEAD"
        if head:   # answered as a GET without its body, as before the library served /metrics
            environ = {**environ, "REQUEST_METHOD": "GET"}
        body = self._route(environ, start_response)
        return [] if head else body

    def _route(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            try:
                return self._metrics_app(environ, start_response)
            except Exception as exc:  # noqa: BLE001 - one failed scrape must not stop the server
                log.warning("metrics scrape failed", exc_info=True)
                return _text(start_response, "500 Internal Server Error",
                             f"scrape failed: {type(exc).__name__}: {exc}"[:300] + "\n")
        if path == "/healthz":
            reason = self._health()
            if reason:
                return _text(start_response, "503 Service Unavailable", reason + "\n")
            return _text(start_response, "200 OK", "ok\n")
        return _text(start_response, "404 Not Found", "not found: try /metrics or /healthz\n")

    def _health(self) -> str | None:
        if self._health_check is None:
            return None
        try:
            return self._health_check() or None
        except Exception as exc:  # noqa: BLE001 - a broken check means "not healthy", not a crash
            log.warning("health check failed", exc_info=True)
            return f"health check failed: {type(exc).__name__}: {exc}"

    # ---- lifecycle ----------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host = f"[{self.host.strip('[]')}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        if self._thread is not None or self._closed:
            raise RuntimeError("a metrics server starts once")
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="metrics-http", daemon=True)
        self._thread.start()
        log.info("metrics on %s/metrics", self.url)

    def stop(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            # shutdown() waits for serve_forever to return: only call it when it runs.
            self._server.shutdown()
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("metrics server thread still running after %.1fs", timeout)
        self._server.server_close()
        self.registry.close()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
