"""The daemon's counters as one dict: the ``sys/stats`` message (``streamd status``) and the
metrics collectors read the same numbers."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .daemon import Daemon


def daemon_stats(d: Daemon) -> dict[str, Any]:
    depths = d.queues.depths()
    cams = {}
    pipeline = d.pipeline
    tracked = d.output.objects.counters() if d.output.objects is not None else {}
    for cid, src in list(d.cameras.items()):
        s = src.stats
        cams[cid] = {
            "state": s.state, "decoded": s.decoded, "inferred": pipeline.inferred_per_camera.get(cid, 0),
            "published": d.publisher.sent_detections.get(cid, 0),
            "dropped": {"queue_full": src.queue.dropped_full, "too_old": s.dropped_too_old,
                        "fps_cap": s.dropped_fps_cap},
            "skipped": s.skipped,
            "reconnects": s.reconnects, "decode_errors": s.decode_errors,
            "corrupt_frames": s.corrupt_frames,
            "queue_depth": depths.get(cid, 0), "width": s.width, "height": s.height,
            **({"objects": tracked[cid]} if cid in tracked else {}),
        }
    st = pipeline.stats
    return {
        "uptime_s": round(time.time() - d.started_at, 1),
        "cameras": cams,
        "scheduler": {"batches": st.batches, "frames": st.frames,
                      "batch_sizes": {str(k): v for k, v in sorted(st.batch_sizes.items())},
                      "infer_ms_mean": round(1000 * st.infer_s_total / st.batches, 2) if st.batches else None,
                      "workers": d.backend.layout.workers,
                      "threads_per_worker": d.backend.layout.threads,
                      "worker_batches": {str(k): v for k, v in sorted(st.worker_batches.items())},
                      "max_frame_age_ms": round(1000 * pipeline.age_bound_s(), 1)},
        "publisher": {"sent": d.publisher.sent, "dropped": d.publisher.dropped, "stale": d.publisher.stale,
                      "sndhwm": d.publisher.sndhwm},
        "reloads": dict(d.reloads),
        **({"outputs": {out.name: out.counters() for out in d.outputs}} if d.outputs else {}),
        **({"requests": {"queued": len(d.request_server.queue), **d.request_server.metrics.outcome_counts()}}
           if d.request_server is not None else {}),
    }
