"""``streamd doctor``'s table of backends and devices: measured speed, or why unavailable.

With ``--model`` each usable (backend, device) opens the model in its best pool layout and
is measured for a few seconds, the way ``backend: auto`` compares them at the daemon's start;
a backend the model's manifest says the file is not meant for is measured too, marked, and
never called the one auto picks.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..backends.choice import backend_options, meant_for, pool_rate, survey
from ..backends.pool import open_pool
from ..errors import StreamdError

MEASURE_S = 2.0     # per backend and device; split between its candidate layouts


@dataclass(frozen=True)
class Row:
    backend: str
    device: str
    img_s: float | None       # measured images/s at batch 1, in the best layout
    detail: str               # the layout, or why the row was not measured


def backend_rows(model: Path | None, seconds: float = MEASURE_S) -> list[Row]:
    rows: list[Row] = []
    probe = model if model is not None else Path("model.onnx")
    with tempfile.TemporaryDirectory(prefix="streamd-doctor-") as tmp:
        for c in survey(probe, "auto"):
            if c.why_not:
                rows.append(Row(c.backend, c.device, None, c.why_not))
            elif model is None:
                rows.append(Row(c.backend, c.device, None, "available (give --model to measure)"))
            else:
                rows.append(_measure(model, c.backend, c.device, seconds, Path(tmp)))
    if probe.suffix.lower() == ".onnx":
        rows.append(Row("tensorrt", "cuda", None, "runs TensorRT engines (.engine), not .onnx files: "
                                                  "streamd-export --engine on the GPU box"))
    return rows


def _measure(model: Path, backend: str, device: str, seconds: float, cache: Path) -> Row:
    try:
        pool = open_pool(model, backend, device=device, threads=0, workers=None, autotune_s=seconds,
                         **backend_options(backend, rebuild=False, cache_dir=cache, verify_sha256=True))
    except StreamdError as exc:
        return Row(backend, device, None, f"cannot run it: {exc}")
    try:
        return Row(backend, device, pool_rate(pool), str(pool.layout))
    finally:
        pool.close()


def _meant(model: Path | None) -> tuple[str, ...]:
    if model is None or not model.is_file():
        return ()
    try:
        return meant_for(model)
    except StreamdError:       # a broken manifest: each row's own open says what is wrong
        return ()


def print_backend_table(model: Path | None) -> None:
    # The pools log their layouts; the table says the same in one place.
    logging.getLogger("streamd.backend").setLevel(logging.WARNING)
    rows = backend_rows(model)
    meant = _meant(model)
    if meant:
        rows = [r if r.backend in meant or r.img_s is None else
                Row(r.backend, r.device, r.img_s, f"{r.detail}; not meant for this file (its manifest: "
                                                  f"{', '.join(meant)})") for r in rows]
    measured = [r for r in rows if r.img_s is not None]
    # What backend: auto would pick: the fastest of those the file is meant for, where any ran.
    eligible = [r for r in measured if r.backend in meant] or measured
    fastest = max(eligible, key=lambda r: r.img_s or 0.0) if eligible else None
    title = f"{model.name}, img/s at batch 1" if model is not None else "no --model: not measured"
    print(f"backends ({title})")
    for r in rows:
        speed = f"{r.img_s:8.1f}" if r.img_s is not None else "      --"
        mark = "  <- fastest (backend: auto picks it)" if r is fastest and len(measured) > 1 else ""
        print(f"  {r.backend:<12} {r.device:<5} {speed}  {r.detail}{mark}")
