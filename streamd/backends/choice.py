"""``backend: auto``: the fastest installed backend and device for this model on this box.

A ``.onnx`` model runs on ONNX Runtime (CPU, or CUDA where its build has the provider) and
on OpenVINO (CPU, Intel iGPU, NPU) when the ``openvino`` extra is installed. Which is fastest
depends on the model, the CPU and its instruction set (on the development box's EPYC the two
are close in FP32, OpenVINO in BF16 is about twice as fast, ONNX Runtime wins on the uint8
INT8 flavour), so at start each candidate is opened with its own best layout, measured, and
the fastest is kept. Only the backends the model's manifest says the file is meant for take
part (an INT8 file of the symmetric flavour is made for TensorRT and OpenVINO, the uint8 one
for ONNX Runtime, and the export lists only those it verified): the others would run it
slowly or with detections nobody checked, and are skipped with a line saying why. The result
is remembered per (model sha256, machine identity) in ``<cache_dir>/backend-choice.json``, so
later starts skip the comparison; naming a backend in the config overrides it all (with a
warning when the file is not meant for it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import BackendError, StreamdError
from ..manifest import INT8_FLAVOUR_BACKENDS, sha256_file
from . import backend_for, check_model_file
from .onnx_model import read_manifest
from .pool import BackendPool, open_pool, usable_cores

log = logging.getLogger("streamd.backend.choice")

CHOICE_FILE = "backend-choice.json"


@dataclass(frozen=True)
class Candidate:
    backend: str
    device: str            # streamd's device name, as model.device takes it
    why_not: str = ""      # empty: usable here

    def __str__(self) -> str:
        return f"{self.backend} ({self.device})"


def default_cache_dir(model_path: Path) -> Path:
    return Path(model_path).parent / ".streamd-cache"


def survey(path: Path, device: str = "auto") -> list[Candidate]:
    """Every backend and device that could open ``path``, with why not where one cannot."""
    if path.suffix.lower() != ".onnx":
        return [Candidate(backend_for(path).name, device)]
    out: list[Candidate] = []
    import onnxruntime as ort
    providers = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in providers
    for dev in ("cpu", "cuda"):
        if device not in ("auto", dev):
            continue
        if dev == "cuda" and not has_cuda:
            out.append(Candidate("onnxruntime", dev, "no CUDA provider in this onnxruntime "
                                                     "(pip install onnxruntime-gpu)"))
        elif dev == "cpu" and device == "auto" and has_cuda:
            out.append(Candidate("onnxruntime", dev, "device auto uses CUDA where present"))
        else:
            out.append(Candidate("onnxruntime", dev))
    try:
        from .openvino import DEVICES, present_devices
        present = {d.split(".")[0] for d in present_devices()}
        for dev, ov_name in DEVICES.items():
            if dev == "auto" or device not in ("auto", dev):
                continue
            out.append(Candidate("openvino", dev, "" if ov_name in present else
                                 f"no {ov_name} device here (OpenVINO sees {', '.join(sorted(present))})"))
    except StreamdError as exc:   # not installed
        out.append(Candidate("openvino", device, str(exc)))
    return out


def machine_identity() -> str:
    """What makes a measurement valid elsewhere: host, CPU model and cores, runtime versions,
    devices. A changed box or an upgraded runtime measures again."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    versions = []
    for dist in ("onnxruntime", "onnxruntime-gpu", "openvino"):
        try:
            versions.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    parts = [platform.node(), platform.machine(), cpu, str(usable_cores()), *versions,
             *(str(c) for c in survey(Path("x.onnx")) if not c.why_not)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def choice_key(path: Path, bf16: bool = False) -> str:
    """Model bytes, machine, and the one setting that changes a backend's speed (BF16)."""
    manifest = read_manifest(path, verify_sha256=False)
    sha = manifest.model_sha256 if manifest is not None and manifest.model_sha256 else sha256_file(path)
    return f"{sha}:{machine_identity()}" + (":bf16" if bf16 else "")


def _read_choices(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember(file: Path, key: str, entry: dict[str, Any]) -> None:
    data = _read_choices(file)
    data[key] = entry
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, file)
    except OSError as exc:
        log.warning("backend auto: cannot remember the choice in %s (%s); it is measured again "
                    "at the next start", file, exc)


def meant_for(path: Path) -> tuple[str, ...]:
    """The backends the manifest of ``path`` says it is meant for; () for any (no manifest,
    or one that names none)."""
    manifest = read_manifest(path, verify_sha256=False)
    return manifest.meant_for() if manifest is not None else ()


def _flavour_hint(backend: str) -> str:
    """Which INT8 export is meant for ``backend``."""
    flavour = next((f for f, names in INT8_FLAVOUR_BACKENDS.items() if backend in names), None)
    return (f"the INT8 model for {backend} is exported with --int8-flavour {flavour}" if flavour
            else f"no INT8 flavour is made for {backend}")


def keep_meant(path: Path, usable: list[Candidate]) -> list[Candidate]:
    """``usable`` narrowed to the backends the file is meant for, logging each one skipped.
    When none of them is here the file runs on ONNX Runtime, which every export verifies its
    model through (it works, only slower than it could), with a warning that says what would
    make it fast; never on another backend, whose detections may not match (OpenVINO lost most
    boxes of INT8 files that ONNX Runtime ran at AP50 0.99 against FP32)."""
    meant = meant_for(path)
    fitting = [c for c in usable if not meant or c.backend in meant]
    if not fitting:
        fitting = [c for c in usable if c.backend == "onnxruntime"] or usable
        install = "install OpenVINO (the openvino extra), or " if "openvino" in meant else ""
        log.warning("backend auto: %s is meant for %s, none of which can run it here; running it on "
                    "%s instead (slower than it could be: %s%s)", path.name, ", ".join(meant),
                    ", ".join(map(str, fitting)), install, _flavour_hint(fitting[0].backend))
    for c in usable:
        if c not in fitting:
            log.info("backend auto: skipped %s: %s is meant for %s (its manifest's backends)",
                     c, path.name, ", ".join(meant))
    return fitting


def pool_rate(pool: BackendPool) -> float | None:
    """Images/s at batch 1 of the pool's layout, when it was measured."""
    if pool.measured:
        return max(pool.measured.values())
    if pool.seconds_per_image:
        return pool.layout.workers / pool.seconds_per_image
    return None


def backend_options(backend: str, *, rebuild: bool, cache_dir: Path | None,
                    verify_sha256: bool, bf16: bool = False, trust_engine: bool = False,
                    names: Sequence[str] | None = None) -> dict[str, Any]:
    """The options ``backend`` takes: only TensorRT rebuilds and loads an engine without a
    manifest on trust (with the config's class names), only OpenVINO caches and runs FP32
    models in BF16."""
    opts: dict[str, Any] = {"verify_sha256": verify_sha256}
    if backend == "tensorrt" and rebuild:
        opts["rebuild"] = True
    if backend == "tensorrt" and trust_engine:
        opts["trust_engine"] = True
        opts["class_names"] = list(names or [])
    if backend == "openvino":
        if cache_dir is not None:
            opts["cache_dir"] = cache_dir / "openvino"
        if bf16:
            opts["bf16"] = True
    return opts


def open_model_pool(path: Path, backend: str, *, device: str, threads: int, workers: int | None,
                    autotune_s: float, verify_sha256: bool = True, rebuild: bool = False,
                    cache_dir: Path | None = None, bf16: bool = False, trust_engine: bool = False,
                    names: Sequence[str] | None = None) -> BackendPool:
    """The daemon's model: the named backend, or with ``auto`` the fastest candidate here."""
    path = Path(path)
    cache = cache_dir or default_cache_dir(path)

    def open_one(c: Candidate, seconds: float) -> BackendPool:
        return open_pool(path, c.backend, device=c.device if backend == "auto" else device,
                         threads=threads, workers=workers, autotune_s=seconds,
                         **backend_options(c.backend, rebuild=rebuild, cache_dir=cache,
                                           verify_sha256=verify_sha256, bf16=bf16,
                                           trust_engine=trust_engine, names=names))

    if backend != "auto":
        meant = meant_for(path) if path.is_file() else ()
        if meant and backend not in meant:
            log.warning("model.backend %s: %s is meant for %s (its manifest's backends); it runs on "
                        "%s, but slower than it could (%s)", backend, path.name, ", ".join(meant),
                        backend, _flavour_hint(backend))
        return open_one(Candidate(backend, device), autotune_s)
    check_model_file(path)
    found = survey(path, device)
    usable = [c for c in found if not c.why_not]
    if not usable:
        raise BackendError(f"{path}: no installed backend runs it on device {device!r} (model.device): "
                           + "; ".join(f"{c}: {c.why_not}" for c in found))
    usable = keep_meant(path, usable)
    if len(usable) == 1 or autotune_s <= 0:
        pick = usable[0]
        if len(usable) > 1:
            log.info("backend auto: %s (autotune_s is 0: not measured)", pick)
        return open_one(pick, autotune_s)

    file = cache / CHOICE_FILE
    key = choice_key(path, bf16)
    known = _read_choices(file).get(key)
    if isinstance(known, dict):
        pick = Candidate(str(known.get("backend")), str(known.get("device")))
        if pick in usable:
            log.info("backend auto: %s, measured on this machine before (%s; %s)", pick,
                     _rates_text(known.get("img_s", {})), file)
            return open_one(pick, autotune_s)

    best: tuple[float, Candidate, BackendPool] | None = None
    rates: dict[str, float] = {}
    errors: list[StreamdError] = []
    for c in usable:
        try:
            pool = open_one(c, autotune_s)
        except StreamdError as exc:
            log.warning("backend auto: %s cannot run this model (%s)", c, exc)
            errors.append(exc)
            continue
        rate = pool_rate(pool) or 0.0
        rates[str(c)] = round(rate, 2)
        if best is None or rate > best[0]:
            if best is not None:
                best[2].close()
            best = (rate, c, pool)
        else:
            pool.close()
    if best is None:
        raise errors[0]      # every candidate failed: the first one's words name the problem
    _, pick, pool = best
    log.info("backend auto: %s chosen by measurement (%s); remembered in %s", pick,
             _rates_text(rates), file)
    _remember(file, key, {"backend": pick.backend, "device": pick.device, "img_s": rates,
                          "model": path.name, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                           time.gmtime())})
    return pool


def _rates_text(rates: Any) -> str:
    if not isinstance(rates, dict) or not rates:
        return "no figures"
    return ", ".join(f"{k}: {v}" for k, v in rates.items()) + " img/s at batch 1"
