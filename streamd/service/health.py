"""What the daemon reports as its health: /healthz's answer and the systemd watchdog's."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..pipeline.sources.camera import CameraSource

if TYPE_CHECKING:
    from .daemon import Daemon


def died(cam: CameraSource) -> bool:
    """A decoder thread that ended on an exception without being asked to stop."""
    return cam.error is not None and not cam.is_alive() and not cam.stop_event.is_set()


def pipeline_problem(d: Daemon) -> str | None:
    err = d.pipeline.first_error() or d.publisher.error
    if err is not None:
        return f"a pipeline stage failed: {type(err).__name__}: {err}"
    ok, why = d.pipeline.progress_ok(d.watchdog_stall_s)
    return None if ok else why


def dead_cameras_problem(cameras: dict[str, CameraSource]) -> str | None:
    """Cameras whose decoder thread died of a bug and awaits its restart, by id only: the
    error's text may quote the camera's URL."""
    dead = [f"camera {cid}: decoder thread died ({type(cam.error).__name__}), restart pending"
            for cid, cam in list(cameras.items()) if died(cam)]
    return "; ".join(dead) or None


def watchdog_health(d: Daemon) -> tuple[bool, str]:
    if d.swapping:
        return True, "reloading"
    problem = pipeline_problem(d)
    if problem is not None:
        return False, problem
    # A dead decoder thread is the supervisor's to restart: it shows in the status line, but
    # the pings go on, since a restart of the service would stop every other camera.
    return True, (dead_cameras_problem(d.cameras)
                  or f"{len(d.cameras)} cameras, publishing on {d.publisher.bound_endpoint}")
