"""Loading the model into a worker pool, and what makes a loaded pool "the same" (a reload
loads a new one only when that changes)."""

from __future__ import annotations

from typing import Any

from ..backends.choice import open_model_pool
from ..backends.pool import BackendPool
from ..config import ModelConfig, SchedulerConfig
from ..pipeline.postprocess import warn_if_conf_below_graph


def load_backend(m: ModelConfig, s: SchedulerConfig) -> BackendPool:
    pool = open_model_pool(m.path, m.backend, device=m.device, threads=m.threads,
                            workers=None if s.workers == "auto" else s.workers, autotune_s=s.autotune_s,
                            verify_sha256=m.verify_sha256, rebuild=m.rebuild_engine, cache_dir=m.cache_dir,
                            bf16=m.openvino_bf16, trust_engine=m.trust_engine, names=m.names)
    warn_if_conf_below_graph(pool.info, m.conf)
    return pool


def model_identity(m: ModelConfig, s: SchedulerConfig) -> tuple[Any, ...]:
    """What makes a loaded pool 'the same': the model's settings, the worker layout asked
    for, and the file's bytes on disk (a file replaced in place counts as a new model)."""
    try:
        st = m.path.stat()
        file_id: tuple[Any, ...] = (st.st_size, st.st_mtime_ns, st.st_ino)
    except OSError:
        file_id = ()
    return (m.path, m.backend, m.device, m.threads, m.verify_sha256, m.rebuild_engine, m.cache_dir,
            m.openvino_bf16, m.trust_engine, tuple(m.names or ()), file_id,
            s.workers, s.autotune_s)
