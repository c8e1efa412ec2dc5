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
from typing import Any

import cv2

from ..backends.choice import open_model_pool
from ..backends.pool import BackendPool
from ..config import CameraConfig, Config, ModelConfig, SchedulerConfig, load_config
from ..entities import Frame, FrameResult
from ..errors import ConfigError, StreamdError
from ..outputs.zmq_publisher import Publisher
from ..pipeline.postprocess import PostprocessParams
from ..pipeline.queues import QueueSet
from ..pipeline.scheduler import Pipeline
from ..pipeline.sources.camera import CameraSource, backoff_delay, configure_ffmpeg_defaults
from ..redact import scrub
from .metrics import MetricsServer, PipelineMetrics, build_registry
from .requests import RequestServer
from .systemd import Notifier, Watchdog

log = logging.getLogger("streamd.daemon")

CAMERA_JOIN_S = 3.0   # a decoder inside a native read returns within its read timeout


def postprocess_params(cfg: Config, names: dict[int, str]) -> PostprocessParams:
    classes: frozenset[int] | None = None
    if cfg.model.classes:
        by_name = {v.lower(): k for k, v in names.items()}
        ids = set()
        for i, c in enumerate(cfg.model.classes):
            if isinstance(c, int):
                if c not in names:
                    raise ConfigError(f"class id {c} is not in the model (0-{max(names)})",
                                      field=f"model.classes[{i}]")
                ids.add(c)
            else:
                if c.lower() not in by_name:
                    raise ConfigError(f"class '{c}' is not in the model ({', '.join(names.values())})",
                                      field=f"model.classes[{i}]")
                ids.add(by_name[c.lower()])
        classes = frozenset(ids)
    return PostprocessParams(conf=cfg.model.conf, iou=cfg.model.iou, max_det=cfg.model.max_det,
                             classes=classes)


def _load_backend(m: ModelConfig, s: SchedulerConfig) -> BackendPool:
    return open_model_pool(m.path, m.backend, device=m.device, threads=m.threads,
                           workers=None if s.workers == "auto" else s.workers, autotune_s=s.autotune_s,
                           verify_sha256=m.verify_sha256, rebuild=m.rebuild_engine, cache_dir=m.cache_dir,
                           bf16=m.openvino_bf16)


def _model_identity(m: ModelConfig, s: SchedulerConfig) -> tuple[Any, ...]:
    """What makes a loaded pool 'the same': the model's settings, the worker layout asked
    for, and the file's bytes on disk (a file replaced in place counts as a new model)."""
    try:
        st = m.path.stat()
        file_id: tuple[Any, ...] = (st.st_size, st.st_mtime_ns, st.st_ino)
    except OSError:
        file_id = ()
    return (m.path, m.backend, m.device, m.threads, m.verify_sha256, m.rebuild_engine, m.cache_dir,
            m.openvino_bf16, file_id,
            s.workers, s.autotune_s)


class Daemon:
    def __init__(self, cfg: Config, config_path: str | Path | None = None) -> None:
        self.cfg = cfg
        self.config_path = Path(config_path) if config_path else None
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.started_at = time.time()
        self.cameras: dict[str, CameraSource] = {}
        self.queues = QueueSet()
        self._last_snapshot: dict[str, float] = {}
        self._camera_restarts: dict[str, tuple[int, float]] = {}   # id -> (restarts, not before)
        self._rng = random.Random()
        self.reloads = {"ok": 0, "failed": 0}
        # A stage silent this long is hung: inference of one batch never legitimately takes it.
        self.watchdog_stall_s = 60.0
        self._swapping = False      # a pipeline swap in progress is not a hung pipeline
        configure_ffmpeg_defaults()
        if cfg.scheduler.pipeline_depth is not None:
            log.warning("scheduler.pipeline_depth is no longer used (batches close when a worker is free)")
        self.backend: BackendPool = _load_backend(cfg.model, cfg.scheduler)
        self._model_id = _model_identity(cfg.model, cfg.scheduler)
        self.pipeline_metrics = PipelineMetrics(camera_ids=lambda: list(self.cameras))
        self.metrics_server: MetricsServer | None = None
        self.publisher: Publisher | None = None
        self.request_server: RequestServer | None = None
        try:
            params = postprocess_params(cfg, self.backend.info.names)
            self.publisher = Publisher(cfg.publisher, stats_provider=self.stats,
                                       on_stale=lambda cam: self._on_frame_dropped(cam, "too_old"))
            if cfg.requests.enabled:
                self.request_server = RequestServer(cfg.requests, self.queues.ready, self.backend.info.names,
                                                    default_params=lambda: self.pipeline.params,
                                                    publish=self.publisher.publish_request_result)
            self.pipeline = self._make_pipeline(self.backend, cfg, params)
            if cfg.metrics.enabled:
                registry = build_registry(self.stats, self.pipeline_metrics)
                if self.request_server is not None:
                    registry.register_collector(self.request_server.metrics)
                self.metrics_server = MetricsServer(registry, cfg.metrics.host, cfg.metrics.port,
                                                    health=self.health_problem)
        except BaseException:
            if self.request_server is not None:
                self.request_server.close_socket()
            if self.publisher is not None:
                self.publisher.close_socket()
            self.backend.close()
            raise

    def _make_pipeline(self, backend: BackendPool, cfg: Config, params: PostprocessParams) -> Pipeline:
        return Pipeline(backend, cfg.scheduler, params, self._on_results,
                        on_frame_dropped=self._on_frame_dropped, queues=self.queues,
                        requests=self.request_server.queue if self.request_server is not None else None,
                        request_share=cfg.requests.share)

    # ---- callbacks from stage threads ---------------------------------------------------------
    def _on_results(self, results: list[FrameResult], frames: list[Frame]) -> None:
        """Runs on the post thread: answer requests, attach the snapshots cameras asked for,
        then publish."""
        if any(f.request is not None for f in frames):
            cams = []
            for r, f in zip(results, frames):
                if f.request is None:
                    cams.append((r, f))
                elif self.request_server is not None:
                    self.request_server.complete(f.request, r.detections, r.timings.get("infer", 0.0))
            results, frames = [r for r, _ in cams], [f for _, f in cams]
            if not results:
                return
        snaps: list[bytes | None] | None = None
        for i, (r, f) in enumerate(zip(results, frames)):
            src = self.cameras.get(r.camera_id)
            if src is None or not self._wants_snapshot(src, r):
                continue
            ok, buf = cv2.imencode(".jpg", f.image, [cv2.IMWRITE_JPEG_QUALITY, src.cam.snapshot_quality])
            if ok:
                snaps = snaps or [None] * len(results)
                snaps[i] = buf.tobytes()
                self._last_snapshot[r.camera_id] = r.capture_mono
        self.publisher.publish_results(results, snaps, max_age_s=self.pipeline.age_bound_s())
        self.pipeline_metrics.observe_results(results)

    def _wants_snapshot(self, src: CameraSource, r: FrameResult) -> bool:
        mode = src.cam.snapshot
        if mode == "off" or (mode == "on_detection" and not r.detections):
            return False
        last = self._last_snapshot.get(r.camera_id)
        return last is None or r.capture_mono - last >= src.cam.snapshot_interval_s

    def _on_frame_dropped(self, camera_id: str, cause: str) -> None:
        cam = self.cameras.get(camera_id)
        if cam is not None and cause == "too_old":
            cam.stats.dropped_too_old += 1

    # ---- cameras ----------------------------------------------------------------------------------
    def _start_camera(self, cam_cfg: CameraConfig, cfg: Config) -> None:
        q = self.queues.add(cam_cfg.id, cam_cfg.queue_depth)
        src = CameraSource(cam_cfg, cfg.sources, q, self.publisher.publish_health)
        self.cameras[cam_cfg.id] = src
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
        src = CameraSource(dead.cam, self.cfg.sources, dead.queue, self.publisher.publish_health)
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
        self._last_snapshot.pop(cam_id, None)
        self._camera_restarts.pop(cam_id, None)
        if src is None:
            return
        src.stop(reason)
        src.join(CAMERA_JOIN_S)
        if src.is_alive():
            # Still inside a native read; it exits as soon as the read returns.
            log.warning("camera=%s decoder still finishing a read; it will exit on its own", cam_id)

    # ---- lifecycle ----------------------------------------------------------------------------------
    def health_problem(self) -> str | None:
        """None while healthy, else why not (the metrics server's /healthz and the watchdog)."""
        err = self.pipeline.first_error() or self.publisher.error
        if err is not None:
            return f"a pipeline stage failed: {type(err).__name__}: {err}"
        ok, why = self.pipeline.progress_ok(self.watchdog_stall_s)
        return None if ok else why

    def start(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.start()
        self.publisher.start()
        if self.request_server is not None:
            self.request_server.start()
        self.pipeline.start()
        for cam in self.cfg.cameras:
            if cam.enabled:
                self._start_camera(cam, self.cfg)
        log.info("streamd running: model=%s publisher=%s cameras=%d max_batch=%d workers=%s",
                 self.backend.info.describe(), self.publisher.bound_endpoint, len(self.cameras),
                 self.pipeline.max_batch, self.backend.layout)

    def supervise_once(self) -> None:
        """One round of supervision; raises if a stage thread died (systemd restarts us)."""
        now = time.monotonic()
        for cam_id, cam in list(self.cameras.items()):
            cam.check_stall(now)
            if cam.error is not None and not cam.is_alive() and not cam.stop_event.is_set():
                self._restart_dead_camera(cam_id, cam, now)
        err = self.pipeline.first_error() or self.publisher.error or \
            (self.request_server.error if self.request_server is not None else None)
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
        if self._swapping:
            return True, "reloading"
        problem = self.health_problem()
        if problem is not None:
            return False, problem
        return True, f"{len(self.cameras)} cameras, publishing on {self.publisher.bound_endpoint}"

    def request_stop(self, why: str = "") -> None:
        if not self.stop_event.is_set():
            log.info("stopping (%s)", why or "requested")
        self.stop_event.set()

    def shutdown(self, timeout: float = 8.0) -> None:
        """Stop in data-flow order; every thread is joined with a deadline."""
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for cam in self.cameras.values():
            cam.stop()
        self.queues.wake_all()
        for cam in self.cameras.values():
            cam.join(max(0.1, min(CAMERA_JOIN_S, deadline - time.monotonic())))
        if self.request_server is not None:
            self.request_server.stop_accepting()
        self.pipeline.stop(max(0.5, deadline - time.monotonic()))
        if self.request_server is not None:
            # The pipeline drained: whatever is still waiting gets its answer now.
            self.request_server.fail_all_pending("the daemon is shutting down")
            self.request_server.stop()
            self.request_server.join(max(0.5, deadline - time.monotonic()))
        self.publisher.stop()
        self.publisher.join(max(0.5, deadline - time.monotonic()))
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
            model_changed = _model_identity(new.model, new.scheduler) != self._model_id
            backend = _load_backend(new.model, new.scheduler) if model_changed else self.backend
            try:
                params = postprocess_params(new, backend.info.names)
            except BaseException:
                if backend is not self.backend:
                    backend.close()
                raise
        except StreamdError as exc:
            self.reloads["failed"] += 1
            log.error("reload rejected, the running config stays: %s", exc)
            return False

        old = self.cfg
        if new.publisher != old.publisher:
            log.warning("publisher settings changed: they apply at the next restart (the socket stays as is)")
            new = new.model_copy(update={"publisher": old.publisher})
        if model_changed or new.scheduler != old.scheduler:
            # The new model is already loaded and warm; swap pipelines, keep the queues.
            pipeline = self._make_pipeline(backend, new, params)
            self._swapping = True
            self.pipeline.stop()
            # Counters carry over: metrics are monotonic across a reload.
            pipeline.stats, pipeline.inferred_per_camera = self.pipeline.stats, self.pipeline.inferred_per_camera
            old_backend, self.backend = self.backend, backend
            self.pipeline = pipeline
            pipeline.start()
            self._swapping = False
            if old_backend is not backend:
                old_backend.close()
                self._model_id = _model_identity(new.model, new.scheduler)
                log.info("model now %s", backend.info.describe())
        else:
            self.pipeline.params = params   # read once per batch by the post thread

        old_cams = {c.id: c for c in old.cameras if c.enabled}
        new_cams = {c.id: c for c in new.cameras if c.enabled}
        sources_changed = new.sources != old.sources
        removed = [cid for cid in old_cams if cid not in new_cams]
        changed = [cid for cid in new_cams if cid in old_cams and (new_cams[cid] != old_cams[cid] or sources_changed)]
        added = [cid for cid in new_cams if cid not in old_cams]
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
        depths = self.queues.depths()
        cams = {}
        pipeline = self.pipeline
        for cid, src in list(self.cameras.items()):
            s = src.stats
            cams[cid] = {
                "state": s.state, "decoded": s.decoded, "inferred": pipeline.inferred_per_camera.get(cid, 0),
                "published": self.publisher.sent_detections.get(cid, 0),
                "dropped": {"queue_full": src.queue.dropped_full, "too_old": s.dropped_too_old,
                            "fps_cap": s.dropped_fps_cap},
                "skipped": s.skipped,
                "reconnects": s.reconnects, "decode_errors": s.decode_errors,
                "queue_depth": depths.get(cid, 0), "width": s.width, "height": s.height,
            }
        st = pipeline.stats
        return {
            "uptime_s": round(time.time() - self.started_at, 1),
            "cameras": cams,
            "scheduler": {"batches": st.batches, "frames": st.frames,
                          "batch_sizes": {str(k): v for k, v in sorted(st.batch_sizes.items())},
                          "infer_ms_mean": round(1000 * st.infer_s_total / st.batches, 2) if st.batches else None,
                          "workers": self.backend.layout.workers,
                          "threads_per_worker": self.backend.layout.threads,
                          "worker_batches": {str(k): v for k, v in sorted(st.worker_batches.items())},
                          "max_frame_age_ms": round(1000 * pipeline.age_bound_s(), 1)},
            "publisher": {"sent": self.publisher.sent, "dropped": self.publisher.dropped,
                          "stale": self.publisher.stale},
            "reloads": dict(self.reloads),
            **({"requests": {"queued": len(self.request_server.queue),
                             **self.request_server.metrics.outcome_counts()}}
               if self.request_server is not None else {}),
        }
