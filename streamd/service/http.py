"""The daemon's one HTTP server: ``/metrics`` (Prometheus), ``/healthz``, and whatever parts
the daemon adds (the detect/tasks API, the cameras API, the WebSocket, the live view).

aiohttp, on an event loop of its own in its own thread: requests never run on a pipeline
thread, and nothing here blocks the loop (scrapes, JPEG encoding and picture decoding run in
the loop's worker threads). ``/metrics`` is prometheus_client's own WSGI app called with the
request's headers, so content negotiation (OpenMetrics, gzip, ``?name[]=``) is the library's.
A scrape whose collector raises is answered with a short 500 naming the error.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import threading
from typing import Any, Awaitable, Callable, Protocol, Sequence

from aiohttp import web
from prometheus_client import make_wsgi_app

from ..errors import StreamdError
from .metrics import Registry

log = logging.getLogger("streamd.http")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9108
SHUTDOWN_S = 1.0     # open WebSockets and streams get this long to close at stop

HealthCheck = Callable[[], "str | None"]   # None (or "") when healthy, else the reason
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpPart(Protocol):
    """A set of routes the daemon adds (API, live view); told the loop they run on."""

    # Paths served without the token: static files that hold no data (the live view's page).
    public_paths: Sequence[str]

    def add_routes(self, app: web.Application) -> None: ...

    def started(self, loop: asyncio.AbstractEventLoop) -> None: ...


def text(status: int, body: str) -> web.Response:
    return web.Response(status=status, text=body, content_type="text/plain", charset="utf-8")


TOKEN_COOKIE = "streamd_token"   # the live view's way of carrying the token (browsers can't add headers)


def _auth_middleware(token: str, public: frozenset[str]) -> Any:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in public:
            return await handler(request)
        header = request.headers.get("Authorization")
        cookie = request.cookies.get(TOKEN_COOKIE)
        given = (header if header is not None else f"Bearer {cookie}" if cookie is not None else "").encode()
        # Constant time: how much of a guess matched must not show in the answer's timing.
        if not hmac.compare_digest(given, expected):
            return web.Response(status=401, text="a bearer token is required (Authorization: Bearer ...)\n",
                                headers={"WWW-Authenticate": 'Bearer realm="streamd"'})
        return await handler(request)
    return auth


def _cors_middleware(origins: Sequence[str]) -> Any:
    # Written here rather than with aiohttp-cors: one header pair for a fixed origin list is
    # all that is needed, and that library is barely maintained.
    allowed = set(origins)

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS" and origin in allowed:
            resp: web.StreamResponse = web.Response(status=204)
        else:
            resp = await handler(request)
        if origin in allowed:
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            resp.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            resp.headers["Vary"] = "Origin"
        return resp
    return cors


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host.strip("[]"), port), family=family, backlog=128)
    except OSError as exc:
        raise StreamdError(f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}") from None


class HttpServer:
    """The server thread. Binds in the constructor, so a busy port fails start-up with a clear
    error (port 0 picks a free one: read ``.port``). ``health`` returns None when healthy or
    a short reason, served as 503. ``stop()`` also closes the registry (NVML)."""

    def __init__(self, registry: Registry, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 health: HealthCheck | None = None, *, parts: Sequence[HttpPart] = (), token: str | None = None,
                 max_body_bytes: int = 20_000_000, cors_origins: Sequence[str] = ()) -> None:
        self.registry = registry
        self._health_check = health
        self._metrics_app = make_wsgi_app(registry)
        self._parts = list(parts)
        middlewares = ([_cors_middleware(cors_origins)] if cors_origins else []) + \
            ([_auth_middleware(token, frozenset(p for part in parts for p in part.public_paths))] if token else [])
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=middlewares)
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/healthz", self._healthz)
        for part in self._parts:
            part.add_routes(self.app)
        self._sock = _bind(host, port)
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._closed = False
        self.error: BaseException | None = None

    # ---- routes --------------------------------------------------------------------------------------
    async def _metrics(self, request: web.Request) -> web.Response:
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": request.query_string,
                   "HTTP_ACCEPT": request.headers.get("Accept", ""),
                   "HTTP_ACCEPT_ENCODING": request.headers.get("Accept-Encoding", "")}
        head: dict[str, Any] = {}

        def scrape() -> bytes:
            def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
                head["status"], head["headers"] = int(status.split()[0]), headers
            return b"".join(self._metrics_app(environ, start_response))
        try:
            body = await asyncio.get_running_loop().run_in_executor(None, scrape)
        except Exception as exc:  # noqa: BLE001 - one failed scrape must not stop the server
            log.warning("metrics scrape failed", exc_info=True)
            return text(500, f"scrape failed: {type(exc).__name__}: {exc}"[:300] + "\n")
        headers = {k: v for k, v in head["headers"] if k.lower() != "content-length"}
        return web.Response(status=head["status"], body=body, headers=headers)

    async def _healthz(self, request: web.Request) -> web.Response:
        reason = await asyncio.get_running_loop().run_in_executor(None, self._health)
        return text(503, reason + "\n") if reason else text(200, "ok\n")

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

    def start(self, timeout: float = 10.0) -> None:
        if self._thread is not None or self._closed:
            raise RuntimeError("an HTTP server starts once")
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self.error is not None:
            raise StreamdError(f"the HTTP server did not start: {self.error or 'timed out'}")
        log.info("http on %s (/metrics, /healthz%s)", self.url, ", /api/v1, /" if self._parts else "")

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)        # this thread's loop, for whatever asks for "the" loop
        self.loop = loop
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=SHUTDOWN_S)
        try:
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.SockSite(runner, self._sock).start())
            for part in self._parts:
                part.started(loop)
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self.error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            # Streams still open past the grace time, and the parts' own upkeep, end here.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    def stop(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None and self.loop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("http server thread still running after %.1fs", timeout)
        self._sock.close()
        self.registry.close()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


# The name this server had when it served only /metrics and /healthz.
MetricsServer = HttpServer
