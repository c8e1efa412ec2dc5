"""Building TensorRT engines: an ONNX that already carries its precision in, a serialized plan
and the facts its manifest records out.

Used by the export tool's engine stage (``streamd-export --engine``), by the daemon when
``model.rebuild_engine`` lets it rebuild a plan made for another TensorRT or GPU, and by
``streamd doctor``'s engine self-test. The choices (build flags per TensorRT version,
profiles, which layers stay FP32) are made by ``logic`` and ``profiles``; this module only
applies them to TensorRT's builder. Written against TensorRT's Python API 8.5-10.x;
TensorRT loads when a build starts, not on import.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ...errors import BackendError, ModelError
from ...fileio import write_atomic
from ...manifest import ModelManifest, sha256_file
from .logic import (
    BUILD_CC,
    BUILD_FLAGS,
    BUILD_GPU,
    BUILD_HW_PROFILE,
    BUILD_ONNX_FILE,
    BUILD_ONNX_SHA,
    BUILD_PROFILE,
    BUILD_STRONGLY_TYPED,
    BUILD_TENSORRT,
    BUILD_WORKSPACE_MB,
    FORMAT_TENSORRT,
    EngineVerdict,
    RuntimeFacts,
    TrtVersion,
    build_mode,
    check_source_onnx,
    head_prefix,
    is_decode_node,
)
from .probe import import_tensorrt
from .profiles import BatchProfile, HwProfile, choose_profile, hw_profile_for_network, profile_shapes

log = logging.getLogger("streamd.backend.tensorrt")

DEFAULT_WORKSPACE_MB = 1024
TIMING_CACHE_NAME = "timing.cache"     # beside the engines: reused by the next build there
BUILD_CUDA_DRIVER = "cuda_driver"     # informative: the backend does not check it


# ---------------------------------------------------------------------------------------
# TensorRT's log (the runtime's too)
# ---------------------------------------------------------------------------------------
def make_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps error messages for our exceptions and forwards the
    rest to Python logging."""

    class Collecting(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return Collecting()


def last_error(logger: Any) -> str:
    """``": <TensorRT's last error>"`` to end a message with, or "" when it logged none."""
    errs = getattr(logger, "errors", [])
    return f": {errs[-1]}" if errs else ""


# ---------------------------------------------------------------------------------------
# the build (export tool, daemon rebuild, doctor)
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildOutcome:
    plan: bytes
    facts: dict[str, Any]        # for the manifest's ``build``


def _progress_monitor(trt: Any, say: Callable[[str], None]) -> Any | None:
    """An IProgressMonitor (TensorRT >= 10) that reports top-level phases; None before."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Monitor(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            self._lock = threading.Lock()     # TensorRT may call from several threads
            self._steps: dict[str, int] = {}
            self._last: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                self._steps[phase_name] = num_steps
                self._last[phase_name] = -1
                if parent_phase is None:
                    say(f"{phase_name} ({num_steps} step(s))")

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self._lock:
                total = self._steps.get(phase_name, 0)
                # Report every ~10% of the long tactic-timing phases, nothing finer.
                if total >= 10 and (step + 1) * 10 // total > (self._last.get(phase_name, -1) + 1) * 10 // total:
                    say(f"  {phase_name}: {step + 1}/{total}")
                self._last[phase_name] = step
            return True     # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                self._steps.pop(phase_name, None)

    return Monitor()


def build_engine(onnx_path: Path, *, precision: str, profile: BatchProfile, input_name: str,
                 imgsz: tuple[int, int], workspace_mb: int = DEFAULT_WORKSPACE_MB,
                 timing_cache: Path | None = None,
                 progress: Callable[[str], None] | None = None,
                 hw_profile: HwProfile | None = None, stride: int = 32,
                 layout: str = "nchw") -> BuildOutcome:
    """Build a serialized plan from an ONNX that already carries its precision (FP32, FP16
    with casts, or INT8 Q/DQ). Never uses calibrators: INT8 is explicit Q/DQ only.

    An ONNX that takes any H x W gets ``hw_profile`` (default: ``choose_hw_profile(imgsz,
    stride)``) for its height and width; one of fixed size is built at ``imgsz``. ``layout``
    is the input's axis order: "nhwc" for a model exported with ``--input uint8``."""
    say = progress or (lambda msg: log.info("%s", msg))
    trt = import_tensorrt()
    version = TrtVersion.parse(trt.__version__)
    mode = build_mode(version, precision)
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    if builder is None:
        raise BackendError(f"TensorRT {version} could not create a builder (no usable NVIDIA GPU "
                           f"or driver?){last_error(logger)}")
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if mode.explicit_batch_flag:
        flags |= 1 << int(creation.EXPLICIT_BATCH)
    if mode.strongly_typed:
        strong = getattr(creation, "STRONGLY_TYPED", None)
        if strong is None:
            raise BackendError(f"TensorRT {version} has no strongly typed networks, which a "
                               f"{precision} build needs on this version")
        flags |= 1 << int(strong)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    say(f"parsing {onnx_path.name} (TensorRT {version}, {precision})")
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BackendError(f"{onnx_path.name}: TensorRT's ONNX parser refused the model: "
                           f"{'; '.join(errs[:3]) or 'no error given'}")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if names != [input_name]:
        raise BackendError(f"{onnx_path.name}: network inputs are {names}, expected [{input_name!r}]")
    try:
        hw = hw_profile_for_network(tuple(network.get_input(0).shape), imgsz, stride, hw_profile,
                                    name=f"{onnx_path.name}: input {input_name!r}", layout=layout)
    except ValueError as exc:
        raise BackendError(str(exc)) from None

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    for flag in mode.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if mode.pin_decode_fp32:
        # Weak typing may run any layer in FP16 once the flag is set; the head's decode
        # must stay FP32 as it does in the ONNX.
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        layer_names = [network.get_layer(i).name for i in range(network.num_layers)]
        prefix = head_prefix(layer_names)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if is_decode_node(layer.name, "", prefix):
                layer.precision = trt.float32
                for k in range(layer.num_outputs):
                    if layer.get_output_type(k) in (trt.float16, trt.float32):
                        layer.set_output_type(k, trt.float32)
    opt_profile = builder.create_optimization_profile()
    mn, opt, mx = profile_shapes(profile, hw, imgsz, layout)
    opt_profile.set_shape(input_name, mn, opt, mx)
    if config.add_optimization_profile(opt_profile) < 0:
        hw_text = f", H x W {hw.as_dict()}" if hw is not None else ""
        raise BackendError(f"optimization profile batch {profile.as_dict()}{hw_text} refused"
                           f"{last_error(logger)}")

    cache = None
    if timing_cache is not None:
        data = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(data)
        # A cache from another GPU or TensorRT version is ignored instead of failing the build.
        if not config.set_timing_cache(cache, ignore_mismatch=True):
            log.warning("timing cache %s could not be used; building without it", timing_cache)
        elif data:
            say(f"reusing timing cache {timing_cache}")
    monitor = _progress_monitor(trt, say)
    if monitor is not None:
        config.progress_monitor = monitor
    say("building the engine (TensorRT times its kernels: this takes minutes)")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError(f"{onnx_path.name}: TensorRT could not build an engine{last_error(logger)}")
    if timing_cache is not None:
        try:
            write_atomic(timing_cache, memoryview(config.get_timing_cache().serialize()))
        except OSError as exc:
            log.warning("could not save the timing cache %s (%s)", timing_cache, exc.strerror)
    facts = {
        BUILD_TENSORRT: str(trt.__version__),
        BUILD_PROFILE: profile.as_dict(),
        BUILD_WORKSPACE_MB: int(workspace_mb),
        BUILD_STRONGLY_TYPED: mode.strongly_typed,
        BUILD_FLAGS: list(mode.builder_flags),
    }
    if hw is not None:
        facts[BUILD_HW_PROFILE] = hw.as_dict()
    return BuildOutcome(bytes(memoryview(plan)), facts)


def engine_manifest(source: ModelManifest, engine_path: Path, outcome: BuildOutcome, *, gpu: str,
                    compute_capability: str, onnx_file: str, onnx_sha256: str,
                    cuda_driver: str | None = None) -> ModelManifest:
    """The manifest of an engine built from the model ``source`` describes (an ONNX, or the
    engine it replaces): the same classes, sizes and precision, the plan's file and sha256,
    and the build facts the backend checks before it loads the plan (``logic.check_engine``)."""
    build = {**(source.build or {}), **outcome.facts, BUILD_GPU: gpu, BUILD_CC: compute_capability,
             BUILD_ONNX_FILE: onnx_file, BUILD_ONNX_SHA: onnx_sha256}
    if cuda_driver is not None:
        build[BUILD_CUDA_DRIVER] = cuda_driver
    manifest = replace(source, model_file=engine_path.name, model_format=FORMAT_TENSORRT,
                       model_sha256=hashlib.sha256(outcome.plan).hexdigest(), build=build,
                       backends=["tensorrt"])
    manifest.validate(where=f"manifest of {engine_path.name}")
    return manifest


def rebuild_engine(path: Path, manifest: ModelManifest, verdict: EngineVerdict,
                   facts: RuntimeFacts) -> tuple[ModelManifest, bytes]:
    """``model.rebuild_engine``: build the plan at ``path`` again from the ONNX its manifest
    records (after proving it is the same ONNX), with the profile and workspace of the first
    build, for the TensorRT and GPU of this machine. The new plan and manifest replace the
    old ones on disk where the folder is writable; the plan is returned either way."""
    onnx_path = path.parent / str(verdict.onnx_file)
    if not onnx_path.is_file():
        raise ModelError(f"{path.name} needs a rebuild ({verdict.reason}) but its ONNX "
                         f"{onnx_path} is missing")
    onnx_sha = sha256_file(onnx_path)
    check_source_onnx(manifest, onnx_path, onnx_sha)
    log.warning("%s: rebuilding from %s because %s", path.name, onnx_path.name, verdict.reason)
    build = manifest.build or {}
    profile = (BatchProfile.from_dict(build[BUILD_PROFILE]) if BUILD_PROFILE in build
               else choose_profile(manifest.batch_min, manifest.batch_max))
    hw = HwProfile.from_dict(build[BUILD_HW_PROFILE]) if BUILD_HW_PROFILE in build else None
    outcome = build_engine(onnx_path, precision=manifest.precision, profile=profile,
                           input_name=manifest.input_name, imgsz=manifest.imgsz, layout=manifest.input_layout,
                           workspace_mb=int(build.get(BUILD_WORKSPACE_MB, DEFAULT_WORKSPACE_MB)),
                           timing_cache=path.parent / TIMING_CACHE_NAME,
                           hw_profile=hw, stride=manifest.stride)
    new = engine_manifest(manifest, path, outcome, gpu=facts.gpu_name,
                          compute_capability=facts.compute_capability,
                          onnx_file=onnx_path.name, onnx_sha256=onnx_sha)
    try:
        write_atomic(path, outcome.plan)
        new.write(path)
    except OSError as exc:
        log.warning("%s: rebuilt engine kept in memory only, could not be saved (%s)",
                    path.name, exc.strerror)
    return new, outcome.plan
