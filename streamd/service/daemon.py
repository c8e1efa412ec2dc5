"""Wires the stages together and supervises them.

The main thread builds everything (so a bad model or endpoint fails before any camera
starts), then only supervises: it watches for stalled decoders and for a stage thread
that died, turns SIGINT/SIGTERM into a stop and SIGHUP into a config reload. Shutdown
follows the data flow, so everything accepted before the stop is still published.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..backends.pool import BackendPool
from ..config import CameraConfig, Config, load_config
from ..errors import StreamdError
from ..outputs.base import Output
from ..outputs.fanout import build_outputs
from ..outputs.zmq_publisher import Publisher
from ..pipeline.output import OutputStage
from ..pipeline.output.messages import stats_message
from ..pipeline.output.objects import TrackedObjects, check_tracker_available
from ..pipeline.output.snapshots import SnapshotPolicy
from ..pipeline.postprocess import PostprocessParams, postprocess_params
from ..pipeline.queues import QueueSet
from ..pipeline.requests import RequestQueue
from ..pipeline.scheduler import Pipeline
from ..pipeline.sources.camera import CameraSource, backoff_delay, configure_ffmpeg_defaults
from ..pipeline.sources.select import choose
from ..redact import scrub
from .doors import open_fleet_door
from .health import dead_cameras_problem, died, pipeline_problem, watchdog_health
from .metrics import PipelineMetrics, build_registry
from .model import load_backend, model_identity
from .output_metrics import OutputCollector
from .reload import camera_changes, keep_restart_only_sections, snapshots_on
from .requests import RequestServer
from .retired import RetiredDecoders
from .stats import daemon_stats
from .systemd import Notifier, Watchdog
from .web import HttpServer, HttpTasks, LiveHub, api_enabled, build_http_server

if TYPE_CHECKING:
    from .redis_requests import RedisRequestDoor

log = logging.getLogger("streamd.daemon")

CAMERA_JOIN_S = 3.0   # a decoder inside a native read returns within its read timeout


class Daemon:
    def __init__(self, cfg: Config, config_path: str | Path | None = None) -> None:
        self.cfg = cfg
        self.config_path = Path(config_path) if config_path else None
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.started_at = time.time()
        self.cameras: dict[str, CameraSource] = {}
        self._retired = RetiredDecoders()   # a successor starts once these are gone (supervise_once)
        self.queues = QueueSet()
        self._camera_restarts: dict[str, tuple[int, float]] = {}   # id -> (restarts, not before)
        self._rng = random.Random()
        self.reloads = {"ok": 0, "failed": 0}
        # A stage silent this long is hung: inference of one batch never legitimately takes it.
        self.watchdog_stall_s = 60.0
        self.swapping = False      # a pipeline swap in progress is not a hung pipeline
        configure_ffmpeg_defaults()
        if cfg.scheduler.pipeline_depth is not None:
            log.warning("scheduler.pipeline_depth is no longer used (batches close when a worker is free)")
        self.backend: BackendPool = load_backend(cfg.model, cfg.scheduler)
        self._model_id = model_identity(cfg.model, cfg.scheduler)
        self.pipeline_metrics = PipelineMetrics(camera_ids=lambda: list(self.cameras))
        self.metrics_server: HttpServer | None = None     # the HTTP server: metrics, health, API, live view
        self.http_tasks: HttpTasks | None = None
        self.live = LiveHub(self.stats, cfg.http.ws_queue) if api_enabled(cfg) else None
        self.publisher: Publisher | None = None
        self.request_server: RequestServer | None = None
        self.fleet_requests: RedisRequestDoor | None = None    # the Redis front door (requests.redis)
        self.outputs: list[Output] = []          # broker outputs (MQTT, Redis Streams) beside ZeroMQ
        self._next_output_stats = 0.0
        # The scheduler's second input; front doors (the ROUTER socket) feed it.
        fleet_on = cfg.requests.redis is not None and cfg.requests.redis.enabled
        self.request_queue = RequestQueue(cfg.requests.queue_size, self.queues.ready) \
            if cfg.requests.enabled or fleet_on or api_enabled(cfg) else None
        try:
            params = postprocess_params(cfg.model, self.backend.info.names)
            self.publisher = Publisher(cfg.publisher, stats_provider=self.stats, snapshots=snapshots_on(cfg),
                                       on_stale=lambda cam: self._on_frame_dropped(cam, "too_old"))
            names = self.backend.info.names
            labels = [names[i] for i in sorted(params.classes)] if params.classes else list(names.values())
            self.outputs = build_outputs(cfg.outputs, cfg.publisher.name or self.publisher.host, labels)
            live = [self.live] if self.live is not None else []
            self.output = OutputStage([self.publisher, *self.outputs, *live],
                                      SnapshotPolicy(self._camera_settings, cfg.publisher.snapshot_max_bytes),
                                      age_bound=lambda: self.pipeline.age_bound_s(),
                                      observe=self.pipeline_metrics.observe_results, objects=TrackedObjects(cfg),
                                      taps=[v.frame for v in live])
            if self.request_queue is not None and cfg.requests.enabled:
                self.request_server = RequestServer(cfg.requests, self.request_queue, self.backend.info.names,
                                                    default_params=lambda: self.pipeline.params)
            self.pipeline = self._make_pipeline(self.backend, cfg, params)
            if fleet_on:
                # Default prefetch: a full batch for every worker, so each box pulls what it can run.
                self.fleet_requests = open_fleet_door(
                    cfg.requests, self.request_queue, self.backend.info.names, lambda: self.pipeline.params,
                    cfg.publisher.name or self.publisher.host, self.pipeline.max_batch * self.backend.layout.workers)
            if cfg.http.enabled:
                registry = build_registry(self.stats, self.pipeline_metrics)
                for door in self._doors():
                    registry.register(door.metrics)
                if self.outputs:
                    registry.register(OutputCollector(lambda: {o.name: o.counters() for o in self.outputs}))
                self.metrics_server, self.http_tasks = build_http_server(self, registry)
        except BaseException:
            for out in self.outputs:
                out.close(0.5)
            if self.request_server is not None:
                self.request_server.close_socket()
            if self.publisher is not None:
                self.publisher.close_socket()
            self.backend.close()
            raise

    def _make_pipeline(self, backend: BackendPool, cfg: Config, params: PostprocessParams) -> Pipeline:
        return Pipeline(backend, cfg.scheduler, params, self.output, on_frame_dropped=self._on_frame_dropped,
                        queues=self.queues, requests=self.request_queue, request_share=cfg.requests.share)

    def _doors(self) -> list[RequestServer | RedisRequestDoor]:
        """The request front doors configured (the ZeroMQ socket, the fleet's Redis stream)."""
        return [d for d in (self.request_server, self.fleet_requests) if d is not None]

    # ---- callbacks from stage threads ---------------------------------------------------------
    def _camera_settings(self, camera_id: str) -> CameraConfig | None:
        src = self.cameras.get(camera_id)
        return src.cam if src is not None else None

    def _on_frame_dropped(self, camera_id: str, cause: str) -> None:
        cam = self.cameras.get(camera_id)
        if cam is not None and cause == "too_old":
            cam.stats.dropped_too_old += 1

    # ---- cameras ----------------------------------------------------------------------------------
    def _start_camera(self, cam_cfg: CameraConfig, cfg: Config) -> None:
        q = self.queues.add(cam_cfg.id, cam_cfg.queue_depth)
        h, w = self.backend.info.input_hw      # child decoders scale frames to fit the model
        src = CameraSource(cam_cfg, cfg.sources, q, self.output.health, decoder=choose(cam_cfg, cfg.sources, (w, h)))
        self.cameras[cam_cfg.id] = src
        if not self._retired.alive(cam_cfg.id):     # else supervise_once starts it when that one is gone
            src.start()

    def _restart_dead_camera(self, cam_id: str, dead: CameraSource, now: float) -> None:
        """A decoder thread that died of a bug (not a camera fault: those it handles itself)
        is replaced, with the same queue and counters, after a capped backoff so a bug that
        strikes at once cannot spin."""
        attempts, not_before = self._camera_restarts.get(cam_id, (0, 0.0))
        if now < not_before:
            return
        if now > not_before + 10 * self.cfg.sources.backoff_max_s:
            attempts = 0            # the last restart held for a long while: start the backoff afresh
        err = dead.error
        log.warning("camera=%s decoder thread died (%s); restarting it", cam_id,
                    scrub(f"{type(err).__name__}: {err}"))
        src = CameraSource(dead.cam, self.cfg.sources, dead.queue, self.output.health, decoder=dead.decoder)
        src.stats = dead.stats          # counters stay monotonic for metrics
        src.stats.reconnects += 1
        self.cameras[cam_id] = src
        delay = backoff_delay(attempts, self.cfg.sources.backoff_initial_s, self.cfg.sources.backoff_max_s,
                              self._rng)
        self._camera_restarts[cam_id] = (attempts + 1, now + delay)
        src.start()

    def _stop_camera(self, cam_id: str, reason: str) -> None:
        src = self.cameras.pop(cam_id, None)
        self.queues.remove(cam_id)
        self.output.snapshots.forget(cam_id)
        if self.live is not None:
            self.live.forget(cam_id)
        self._camera_restarts.pop(cam_id, None)
        if src is None:
            return
        src.retire(reason)
        if src.ident is not None:       # it may never have started (waiting for its own predecessor)
            src.join(CAMERA_JOIN_S)
        if src.is_alive():
            # In a native read: it exits, silently, when that returns; a successor waits for it.
            log.warning("camera=%s decoder still finishing a read; it will exit on its own", cam_id)
            self._retired.add(cam_id, src)

    # ---- lifecycle ----------------------------------------------------------------------------------
    def health_problem(self) -> str | None:
        """None while healthy, else why not (the HTTP server's /healthz)."""
        return pipeline_problem(self) or dead_cameras_problem(self.cameras)

    def start(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.start()
        self.publisher.start()
        if self.request_server is not None:
            self.request_server.start()
        self.pipeline.start()
        if self.fleet_requests is not None:
            self.fleet_requests.start()
        for cam in self.cfg.cameras:
            if cam.enabled:
                self._start_camera(cam, self.cfg)
        log.info("streamd running", extra={"model": self.backend.info.describe(),
                                           "publisher": self.publisher.bound_endpoint, "cameras": len(self.cameras),
                                           "max_batch": self.pipeline.max_batch, "workers": str(self.backend.layout)})

    def supervise_once(self) -> None:
        """One round of supervision; raises if a stage thread died (systemd restarts us)."""
        now = time.monotonic()
        for cam_id, cam in list(self.cameras.items()):
            if cam.ident is None and not self._retired.alive(cam_id):
                cam.start()         # its retired predecessor has exited
            cam.check_stall(now)
            if died(cam):
                self._restart_dead_camera(cam_id, cam, now)
        if self.outputs and now >= self._next_output_stats:
            # The ZeroMQ publisher times its own stats messages; the broker outputs get theirs here.
            self._next_output_stats = now + self.cfg.publisher.stats_interval_s
            msg = stats_message(self.stats())
            for out in self.outputs:
                out.offer(msg)
        err = self.pipeline.first_error() or self.publisher.error or \
            next((door.error for door in self._doors() if door.error is not None), None)
        if err is not None:
            raise StreamdError(f"a pipeline stage failed: {type(err).__name__}: {err}")

    def run(self, install_signals: bool = True, notifier: Notifier | None = None) -> int:
        """Start, supervise until a signal or a fatal error, stop. Returns an exit code."""
        notifier = notifier or Notifier()
        if install_signals:
            # Handlers only set Events: the work happens in the main loop below, not inside
            # a signal handler that could interrupt a lock holder.
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda signum, frame: self.request_stop(signal.Signals(signum).name))
            signal.signal(signal.SIGHUP, lambda signum, frame: self.reload_event.set())
        code = 0
        self.start()
        watchdog = Watchdog(notifier, self.watchdog_health)
        # READY once the model is loaded and the socket bound; cameras may still be connecting.
        notifier.ready(f"model {self.backend.info.describe()}, {len(self.cameras)} cameras, "
                       f"{self.publisher.bound_endpoint}")
        watchdog.start()
        try:
            while not self.stop_event.wait(0.5):
                if self.reload_event.is_set():
                    self.reload_event.clear()
                    notifier.reloading()
                    ok = False
                    try:
                        ok = self.reload()
                    finally:   # always: otherwise systemd stays in "reloading"
                        notifier.ready_after_reload("config reloaded" if ok else
                                                    "reload rejected; previous config running")
                self.supervise_once()
        except StreamdError as exc:
            log.error("%s; stopping", exc)
            code = 1
        finally:
            watchdog.stop()
            notifier.stopping()
            self.shutdown()
            notifier.close()
        return code

    def watchdog_health(self) -> tuple[bool, str]:
        return watchdog_health(self)

    def request_stop(self, why: str = "") -> None:
        if not self.stop_event.is_set():
            log.info("stopping (%s)", why or "requested")
        self.stop_event.set()

    def shutdown(self, timeout: float = 8.0) -> None:
        """Stop in data-flow order; every thread is joined with a deadline."""
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        self.output.shutting_down()
        for cam in self.cameras.values():
            cam.stop()
        self.queues.wake_all()
        for cam in self.cameras.values():
            if cam.ident is not None:       # one waiting for its predecessor never started
                cam.join(max(0.1, min(CAMERA_JOIN_S, deadline - time.monotonic())))
        for door in self._doors():
            door.stop_accepting()
        if self.http_tasks is not None:
            self.http_tasks.stop_accepting()
        self.pipeline.stop(max(0.5, deadline - time.monotonic()))
        if self.fleet_requests is not None:   # hands back to the fleet what it holds unanswered
            self.fleet_requests.close(max(0.5, min(3.0, deadline - time.monotonic())))
        self.output.close()   # the objects still alive end, before the transports close
        if self.http_tasks is not None:
            self.http_tasks.fail_all_pending("the daemon is shutting down")
        if self.request_server is not None:
            # The pipeline drained: whatever is still waiting gets its answer now.
            self.request_server.fail_all_pending("the daemon is shutting down")
            self.request_server.stop()
            self.request_server.join(max(0.5, deadline - time.monotonic()))
        for out in self.output.outputs:     # each sends what it holds, then lets go of its connection
            out.close(max(0.5, deadline - time.monotonic()))
        self.backend.close()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        # A decoder inside a native open/read can't be interrupted; it holds no frames, so the
        # process may exit without it (it would end by its own timeout).
        blocked = [c.name for c in self.cameras.values() if c.is_alive() and c.blocked_in_decoder]
        if blocked:
            log.info("not waiting for %s: inside a decoder call that ends by its own timeout", ", ".join(blocked))
        threads = [*self.cameras.values(), *self.pipeline.threads, self.publisher]
        if self.request_server is not None:
            threads.append(self.request_server)
        if self.fleet_requests is not None:
            threads += self.fleet_requests.threads
        alive = [t.name for t in threads if t.is_alive() and t.name not in blocked]
        if alive:
            log.warning("threads still running after shutdown: %s", ", ".join(alive))
        else:
            log.info("stopped cleanly")

    # ---- reload (SIGHUP) ------------------------------------------------------------------------
    def reload(self) -> bool:
        """Apply a changed config without touching what did not change.

        Everything that can fail (parsing, loading a new model, class names) happens before
        anything running is changed, so a bad config leaves the old one running untouched.
        """
        if self.config_path is None:
            log.warning("reload requested but the daemon was not started from a file")
            return False
        log.info("reloading %s", self.config_path)
        try:
            new = load_config(self.config_path)
            check_tracker_available(new)
            model_changed = model_identity(new.model, new.scheduler) != self._model_id
            backend = load_backend(new.model, new.scheduler) if model_changed else self.backend
            try:
                params = postprocess_params(new.model, backend.info.names)
            except BaseException:
                if backend is not self.backend:
                    backend.close()
                raise
        except StreamdError as exc:
            self.reloads["failed"] += 1
            log.error("reload rejected, the running config stays: %s", exc)
            return False

        old = self.cfg
        new = keep_restart_only_sections(old, new)
        if model_changed or new.scheduler != old.scheduler:
            # The new model is already loaded and warm; swap pipelines, keep the queues.
            pipeline = self._make_pipeline(backend, new, params)
            self.swapping = True
            self.pipeline.stop()
            # Counters carry over: metrics are monotonic across a reload.
            pipeline.stats, pipeline.inferred_per_camera = self.pipeline.stats, self.pipeline.inferred_per_camera
            old_backend, self.backend = self.backend, backend
            self.pipeline = pipeline
            pipeline.start()
            self.swapping = False
            if old_backend is not backend:
                old_backend.close()
                self._model_id = model_identity(new.model, new.scheduler)
                log.info("model now %s", backend.info.describe())
        else:
            self.pipeline.params = params   # read once per batch by the post thread

        removed, changed, added = camera_changes(old, new)
        new_cams = {c.id: c for c in new.cameras if c.enabled}
        self.output.reconfigure(new, changed)   # objects of cameras about to stop end first, by reason
        for cid in removed:
            self._stop_camera(cid, "removed from the config")
            self.pipeline_metrics.forget_camera(cid)
        for cid in changed:
            self._stop_camera(cid, "settings changed; restarting")
        self.cfg = new
        for cid in changed + added:
            self._start_camera(new_cams[cid], new)
        self.reloads["ok"] += 1
        log.info("reload applied: cameras added=%s removed=%s changed=%s; model %s; conf=%.2f iou=%.2f",
                 added or "-", removed or "-", changed or "-", "reloaded" if model_changed else "unchanged",
                 new.model.conf, new.model.iou)
        return True

    # ---- stats (the stats message; metrics read the same numbers) ----------------------------------
    def stats(self) -> dict[str, Any]:
        """The stats message's counters (``streamd status``); metrics read the same numbers."""
        return daemon_stats(self)
