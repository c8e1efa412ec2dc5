"""A ``Daemon.stats()`` snapshot (also the body of a ``stats`` message) for the tests of
what reads one: the metrics collector and ``streamd status``."""

from __future__ import annotations

from typing import Any


def camera_stats(state: str = "streaming", n: int = 100) -> dict[str, Any]:
    return {"state": state, "decoded": n, "skipped": 2 * n, "inferred": n - 5, "published": n - 6,
            "dropped": {"queue_full": 3, "too_old": 2, "fps_cap": 40}, "reconnects": 1, "decode_errors": 0,
            "corrupt_frames": 7, "queue_depth": 2, "width": 1920, "height": 1080}


def daemon_stats(cameras: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"uptime_s": 3723.4, "cameras": cameras,
            "scheduler": {"batches": 40, "frames": 118, "batch_sizes": {"2": 2, "3": 38}, "infer_ms_mean": 38.25,
                          "workers": 2, "threads_per_worker": 1, "worker_batches": {"0": 21, "1": 19},
                          "max_frame_age_ms": 1000.0},
            "publisher": {"sent": 130, "dropped": 1}}
