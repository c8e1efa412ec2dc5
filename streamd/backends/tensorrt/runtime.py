"""TensorRT backend: a plain ``.engine`` plan file plus its manifest, run through pycuda.

Importing this module imports neither tensorrt nor pycuda; both load when an engine is
opened (or built), so a machine without them can still import streamd, list backends and
read manifests. The decisions (is this plan loadable here, profile and batch choice,
buffer sizes, build flags per TensorRT version) live in ``logic`` beside this module as
plain functions; this module only applies them.

Loading, in order:
1. the manifest is read and the plan is checked against it *before* TensorRT sees a byte:
   sha256, TensorRT major.minor, GPU compute capability. A mismatch of version or GPU is
   refused with a message saying what to do, or, with ``rebuild=True``, answered by
   rebuilding the plan from the ONNX the manifest records (after checking its sha256);
2. the plan is deserialized, its I/O tensors are checked by name, shape and dtype;
3. pinned host buffers and device buffers sized for the profile's largest batch (and, for
   an engine that takes any H x W, its largest input size) are allocated once per
   in-flight slot.

An engine built from a model that takes any H x W runs each batch at the batch's own H x W:
the input shape is set per batch, and the outputs are read at the shapes TensorRT reports
for it. A batch smaller than the engine's H x W profile allows is padded up to it at the
bottom and right (box coordinates, counted from the top-left corner, do not move).

Overlap: ``infer_async(batch)`` queues copy-in, execution and copy-out on one CUDA stream
and returns at once; ``wait(handle)`` returns that batch's output. With two slots (the
default) a caller can queue the next batch while the GPU still runs the previous one.
The daemon's scheduler calls the plain ``infer`` from each of its workers; with two
workers (``scheduler.workers``, each its own engine instance, execution context and CUDA
stream) one worker's letterboxing and copies overlap the other's GPU work, so ``infer``
blocking until its own output is back costs only the copies.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import BackendError, ManifestError, ModelError
from ...manifest import PAD_VALUE, ModelManifest, sha256_file, sidecar_path
from .logic import (
    BUILD_CC,
    BUILD_FLAGS,
    BUILD_GPU,
    BUILD_HW_PROFILE,
    BUILD_PROFILE,
    BUILD_STRONGLY_TYPED,
    BUILD_TENSORRT,
    BUILD_WORKSPACE_MB,
    BatchProfile,
    BufferSpec,
    EngineVerdict,
    HwProfile,
    RuntimeFacts,
    TensorSpec,
    TrtVersion,
    build_mode,
    check_engine,
    check_engine_file,
    check_io,
    check_runtime_shape,
    check_source_onnx,
    check_supported,
    choose_profile,
    choose_run_batch,
    format_cc,
    head_prefix,
    hw_profile_for_network,
    hw_profile_from_shapes,
    is_decode_node,
    plan_buffers,
    profile_from_shapes,
    profile_shapes,
    resolve_shape,
    trt_dtype_name,
)
from ..base import Backend, ModelInfo

log = logging.getLogger("streamd.backend.tensorrt")

DEFAULT_WORKSPACE_MB = 1024
INSTALL_HINT = ("install TensorRT's Python package (x86: pip install tensorrt from NVIDIA's "
                "index; Jetson: it comes with JetPack)")


# ---------------------------------------------------------------------------------------
# environment probes (also used by ``streamd doctor`` and the export tool)
# ---------------------------------------------------------------------------------------
def tensorrt_version() -> str | None:
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return str(trt.__version__)


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendError(f"TensorRT is not installed ({exc}); {INSTALL_HINT}") from None
    try:
        check_supported(TrtVersion.parse(trt.__version__))
    except ValueError as exc:
        raise BackendError(str(exc)) from None
    return trt


def import_pycuda() -> Any:
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise BackendError(f"pycuda is not installed ({exc}); the TensorRT backend uses it for "
                           f"GPU memory and streams (pip install pycuda)") from None
    try:
        cuda.init()
    except cuda.Error as exc:
        raise BackendError(f"CUDA could not be initialised ({exc}): no NVIDIA driver or GPU "
                           f"usable by this process") from None
    return cuda


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: str
    memory_mb: int
    driver: str
    via: str                 # "pycuda" | "nvidia-smi"


def probe_gpu(index: int = 0) -> tuple[GpuInfo | None, str]:
    """The GPU at ``index`` (pycuda first, nvidia-smi second), or None and why not."""
    why = ""
    try:
        import pycuda.driver as cuda
        cuda.init()
        count = cuda.Device.count()
        if index >= count:
            return None, f"pycuda sees {count} GPU(s), none at index {index}"
        dev = cuda.Device(index)
        drv = cuda.get_driver_version()
        return GpuInfo(index, dev.name(), format_cc(*dev.compute_capability()),
                       dev.total_memory() >> 20, f"{drv // 1000}.{drv % 1000 // 10}", "pycuda"), ""
    except ImportError:
        why = "pycuda not installed"
    except Exception as exc:  # pycuda.driver.Error and friends: no driver, no device
        why = f"pycuda: {str(exc).strip() or type(exc).__name__}"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None, f"{why}; nvidia-smi not found"
    try:
        out = subprocess.run([smi, "--query-gpu=name,compute_cap,memory.total,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{why}; nvidia-smi failed ({exc})"
    rows = [r for r in out.stdout.splitlines() if r.strip()]
    if out.returncode != 0 or index >= len(rows):
        msg = (out.stderr or out.stdout).strip().splitlines()
        return None, f"{why}; nvidia-smi: {msg[0] if msg else f'no GPU at index {index}'}"
    fields = [f.strip() for f in rows[index].split(",")]
    try:
        mem = int(float(fields[2]))
    except (IndexError, ValueError):
        mem = 0
    return GpuInfo(index, fields[0], fields[1] if len(fields) > 1 else "?", mem,
                   fields[3] if len(fields) > 3 else "?", "nvidia-smi"), ""


def _make_logger(trt: Any) -> Any:
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


def _errors(logger: Any) -> str:
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


def write_atomic(path: Path, data: bytes | memoryview) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_engine(onnx_path: Path, *, precision: str, profile: BatchProfile, input_name: str,
                 imgsz: tuple[int, int], workspace_mb: int = DEFAULT_WORKSPACE_MB,
                 timing_cache: Path | None = None,
                 progress: Callable[[str], None] | None = None,
                 hw_profile: HwProfile | None = None, stride: int = 32) -> BuildOutcome:
    """Build a serialized plan from an ONNX that already carries its precision (FP32, FP16
    with casts, or INT8 Q/DQ). Never uses calibrators: INT8 is explicit Q/DQ only.

    An ONNX that takes any H x W gets ``hw_profile`` (default: ``choose_hw_profile(imgsz,
    stride)``) for its height and width; one of fixed size is built at ``imgsz``."""
    say = progress or (lambda msg: log.info("%s", msg))
    trt = import_tensorrt()
    version = TrtVersion.parse(trt.__version__)
    mode = build_mode(version, precision)
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    if builder is None:
        raise BackendError(f"TensorRT {version} could not create a builder (no usable NVIDIA GPU "
                           f"or driver?){_errors(logger)}")
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
                                    name=f"{onnx_path.name}: input {input_name!r}")
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
    mn, opt, mx = profile_shapes(profile, hw, imgsz)
    opt_profile.set_shape(input_name, mn, opt, mx)
    if config.add_optimization_profile(opt_profile) < 0:
        hw_text = f", H x W {hw.as_dict()}" if hw is not None else ""
        raise BackendError(f"optimization profile batch {profile.as_dict()}{hw_text} refused"
                           f"{_errors(logger)}")

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
        raise BackendError(f"{onnx_path.name}: TensorRT could not build an engine{_errors(logger)}")
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


# ---------------------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------------------
@dataclass
class _Slot:
    host_in: np.ndarray
    host_out: dict[str, np.ndarray]
    dev_in: Any
    dev_out: dict[str, Any]
    done: Any                        # cuda.Event recorded after the copy-out
    busy: bool = False
    ticket: int = 0


@dataclass(frozen=True)
class InferHandle:
    slot: int
    ticket: int
    n: int                           # frames asked for (rows returned)
    run: int                         # batch executed (>= n when padded)
    out_shape: tuple[int, ...] = ()  # the primary output's shape for this run


def _leading(buffer: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The first elements of a (pinned) buffer viewed as one contiguous array of ``shape``;
    no copy, so the view is pinned memory too."""
    size = int(np.prod(shape))
    return buffer.reshape(-1)[:size].reshape(shape)


class TensorRTBackend(Backend):
    name = "tensorrt"
    suffixes = (".engine", ".plan")

    def __init__(self, path: Path, *, device: str = "auto", threads: int = 0,
                 verify_sha256: bool = True, warmup: bool = True, rebuild: bool = False,
                 gpu: int = 0, slots: int = 2) -> None:
        self.path = Path(path)
        self._closed = False
        self._cuda_ctx: Any = None
        self._slots: list[_Slot] = []
        self._engine: Any = None
        self._context: Any = None
        self._runtime: Any = None
        self._stream: Any = None
        self._ticket = 0
        self.hw_profile: HwProfile | None = None     # set for engines that take any H x W
        if device not in ("auto", "cuda"):
            raise BackendError(f"{self.path.name}: TensorRT engines run on an NVIDIA GPU, not on "
                               f"device {device!r}; use the .onnx model with the onnxruntime backend")
        if not verify_sha256:
            # An engine is native code: its bytes are always checked against the manifest.
            log.warning("%s: verify_sha256 is off, but engines are always checked", self.path.name)
        if not 1 <= slots <= 8:
            raise BackendError(f"slots {slots}: must be between 1 and 8")
        if not sidecar_path(self.path).exists():
            raise ManifestError(f"{self.path}: no manifest ({sidecar_path(self.path).name}) beside the "
                                f"engine; streamd loads only engines whose manifest records what built "
                                f"them (export with streamd-export --engine)")
        manifest = ModelManifest.read(self.path)
        # Read once: the bytes that are checked are the bytes TensorRT gets. A changed file
        # is refused before anything native is loaded, on any machine.
        plan: bytes = self.path.read_bytes()
        actual_sha = hashlib.sha256(plan).hexdigest()
        check_engine_file(manifest, actual_sha, path=self.path)
        trt = import_tensorrt()
        cuda = import_pycuda()
        self._cuda = cuda
        try:
            dev = cuda.Device(gpu)
            facts = RuntimeFacts(str(trt.__version__), format_cc(*dev.compute_capability()), dev.name())
        except cuda.Error as exc:
            raise BackendError(f"GPU {gpu}: {exc}") from None
        verdict = check_engine(manifest, actual_sha, facts, path=self.path, allow_rebuild=rebuild)
        if verdict.action == "rebuild":
            manifest, plan = self._rebuild(manifest, verdict, facts)
        self.manifest = manifest
        self._cuda_ctx = dev.retain_primary_context()
        try:
            with self._active():
                self._load(trt, plan, manifest, slots)
        except BaseException:
            self.close()
            raise
        log.info("loaded %s on %s (TensorRT %s)", self.info.describe(), facts.gpu_name, facts.tensorrt)
        if warmup:
            try:
                self.warmup()
            except BaseException:
                self.close()
                raise

    # ---- loading ------------------------------------------------------------------------
    def _rebuild(self, manifest: ModelManifest, verdict: EngineVerdict,
                 facts: RuntimeFacts) -> tuple[ModelManifest, bytes]:
        onnx_path = self.path.parent / str(verdict.onnx_file)
        if not onnx_path.is_file():
            raise ModelError(f"{self.path.name} needs a rebuild ({verdict.reason}) but its ONNX "
                             f"{onnx_path} is missing")
        check_source_onnx(manifest, onnx_path, sha256_file(onnx_path))
        log.warning("%s: rebuilding from %s because %s", self.path.name, onnx_path.name, verdict.reason)
        build = manifest.build or {}
        profile = (BatchProfile.from_dict(build[BUILD_PROFILE]) if BUILD_PROFILE in build
                   else choose_profile(manifest.batch_min, manifest.batch_max))
        hw = HwProfile.from_dict(build[BUILD_HW_PROFILE]) if BUILD_HW_PROFILE in build else None
        outcome = build_engine(onnx_path, precision=manifest.precision, profile=profile,
                               input_name=manifest.input_name, imgsz=manifest.imgsz,
                               workspace_mb=int(build.get(BUILD_WORKSPACE_MB, DEFAULT_WORKSPACE_MB)),
                               timing_cache=self.path.parent / "timing.cache",
                               hw_profile=hw, stride=manifest.stride)
        new = replace(manifest, model_sha256=hashlib.sha256(outcome.plan).hexdigest(),
                      build={**build, **outcome.facts, BUILD_GPU: facts.gpu_name,
                             BUILD_CC: facts.compute_capability})
        try:
            write_atomic(self.path, outcome.plan)
            new.write(self.path)
        except OSError as exc:
            log.warning("%s: rebuilt engine kept in memory only, could not be saved (%s)",
                        self.path.name, exc.strerror)
        return new, outcome.plan

    def _load(self, trt: Any, plan: bytes, manifest: ModelManifest, n_slots: int) -> None:
        cuda = self._cuda
        self._logger = _make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        if self._runtime is None:
            raise BackendError(f"{self.path.name}: TensorRT could not create a runtime{_errors(self._logger)}")
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise BackendError(f"{self.path.name}: TensorRT could not deserialize the engine"
                               f"{_errors(self._logger)}")
        engine = self._engine
        specs: list[TensorSpec] = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            specs.append(TensorSpec(name, is_input, tuple(int(d) for d in engine.get_tensor_shape(name)),
                                    trt_dtype_name(engine.get_tensor_dtype(name))))
        try:
            check_io(specs, path=self.path, input_name=manifest.input_name,
                     output_names=manifest.output_names, imgsz=manifest.imgsz,
                     dynamic_hw=manifest.dynamic_hw)
        except ValueError as exc:
            raise ManifestError(str(exc)) from None
        self._input = next(s for s in specs if s.is_input)
        self._outputs = [s for s in specs if not s.is_input]
        # The primary output (what the postprocessor reads) is the manifest's first name.
        self._primary = manifest.output_names[0]
        batch_dim = self._input.shape[0]
        shapes = (engine.get_tensor_profile_shape(self._input.name, 0)
                  if batch_dim < 0 or manifest.dynamic_hw else None)
        if batch_dim < 0 and shapes is not None:
            self.profile = profile_from_shapes(*shapes)
        else:
            self.profile = BatchProfile(batch_dim, batch_dim, batch_dim)
        if manifest.dynamic_hw and shapes is not None:
            try:
                self.hw_profile = hw_profile_from_shapes(*shapes, stride=manifest.stride)
            except ValueError as exc:
                raise ManifestError(f"{self.path}: the engine's H x W profile: {exc}") from None
            if self.hw_profile.max != manifest.imgsz:
                raise ManifestError(f"{self.path}: the engine's largest input is "
                                    f"{self.hw_profile.max[0]}x{self.hw_profile.max[1]}, the "
                                    f"manifest's imgsz is {manifest.imgsz[0]}x{manifest.imgsz[1]}")
        if not (manifest.batch_min >= self.profile.min and manifest.batch_max <= self.profile.max):
            raise ManifestError(f"{self.path}: the engine's batch profile {self.profile.min}-"
                                f"{self.profile.max} does not cover the manifest's "
                                f"{manifest.batch_min}-{manifest.batch_max}")
        self._context = engine.create_execution_context()
        if self._context is None:
            raise BackendError(f"{self.path.name}: TensorRT could not create an execution context "
                               f"(out of GPU memory?){_errors(self._logger)}")
        at_max: dict[str, tuple[int, ...]] | None = None
        if self.hw_profile is not None:
            # Outputs of an engine that takes any H x W have a dynamic anchor axis: size the
            # buffers from the shapes TensorRT reports at the largest batch and input.
            biggest = (self.profile.max, 3, *self.hw_profile.max)
            if not self._context.set_input_shape(self._input.name, biggest):
                raise BackendError(f"{self.path.name}: input shape {biggest} refused"
                                   f"{_errors(self._logger)}")
            at_max = {s.name: tuple(int(d) for d in self._context.get_tensor_shape(s.name))
                      for s in specs}
        try:
            buffers = plan_buffers(specs, self.profile.max, at_max)
        except ValueError as exc:
            raise ManifestError(f"{self.path}: {exc}") from None
        try:
            self._stream = cuda.Stream()
            for _ in range(n_slots):
                self._slots.append(self._allocate(buffers))
        except cuda.Error as exc:
            raise BackendError(f"{self.path.name}: GPU allocation failed ({exc})") from None
        in_dtype = np.dtype(buffers[[b.name for b in buffers].index(self._input.name)].dtype)
        h, w = manifest.imgsz
        self.info = ModelInfo(path=self.path, names=manifest.class_names, input_name=manifest.input_name,
                              input_hw=(h, w), input_dtype=in_dtype,
                              batch_min=max(manifest.batch_min, 1), batch_max=manifest.batch_max,
                              output_layout=manifest.output_layout, precision=manifest.precision,
                              sha256=manifest.model_sha256, source="manifest",
                              dynamic_hw=manifest.dynamic_hw, stride=manifest.stride,
                              nms_conf=manifest.nms_conf())

    def _allocate(self, buffers: list[BufferSpec]) -> _Slot:
        cuda = self._cuda
        host_out: dict[str, np.ndarray] = {}
        dev_out: dict[str, Any] = {}
        host_in = dev_in = None
        for b in buffers:
            host = cuda.pagelocked_empty(b.shape, b.dtype)
            dev = cuda.mem_alloc(max(b.nbytes, 1))
            if b.is_input:
                host_in, dev_in = host, dev
            else:
                host_out[b.name], dev_out[b.name] = host, dev
        return _Slot(host_in, host_out, dev_in, dev_out, cuda.Event())  # type: ignore[arg-type]

    @contextmanager
    def _active(self) -> Iterator[None]:
        """Make the GPU's primary context current in the calling thread (the inference
        thread is not the one that loaded the engine)."""
        self._cuda_ctx.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    # ---- running ------------------------------------------------------------------------
    def infer_async(self, batch: np.ndarray) -> InferHandle:
        """Queue one batch; returns at once. Pair every call with ``wait``."""
        if self._closed:
            raise BackendError(f"{self.path.name}: backend is closed")
        self.check_batch(batch)
        n = int(batch.shape[0])
        rb = choose_run_batch(n, self.profile)
        if rb.take != n:     # check_batch caps n at batch_max <= profile.max
            raise BackendError(f"{self.path.name}: batch of {n} exceeds the engine's profile "
                               f"(max {self.profile.max})")
        index = self._ticket % len(self._slots)
        slot = self._slots[index]
        if slot.busy:
            raise BackendError(f"{self.path.name}: {len(self._slots)} batch(es) already in flight; "
                               f"wait() for one before queuing another")
        cuda = self._cuda
        trt_ctx = self._context
        name_in = self._input.name
        h, w = int(batch.shape[2]), int(batch.shape[3])
        if self.hw_profile is not None:
            run_h, run_w = self.hw_profile.run_hw(h, w)     # check_batch made it valid
        else:
            run_h, run_w = h, w
        shape = (rb.run, 3, run_h, run_w)
        # The pinned buffer holds the largest input; a smaller one uses its first bytes as
        # one contiguous (run, 3, H, W) array, which is what TensorRT reads.
        host_in = _leading(slot.host_in, shape)
        with self._active():
            if (run_h, run_w) != (h, w):
                # Below the engine's smallest H x W: grey at the bottom and right, like the
                # letterbox's own padding.
                host_in[:n].fill(PAD_VALUE / 255.0)
            np.copyto(host_in[:n, :, :h, :w], batch, casting="same_kind")
            if rb.pad:
                host_in[n:rb.run].fill(0)
            if not trt_ctx.set_input_shape(name_in, shape):
                hw_text = (f", H x W {self.hw_profile.as_dict()}" if self.hw_profile is not None else "")
                raise BackendError(f"{self.path.name}: input {name_in!r} shape {shape} refused; the "
                                   f"engine's profile is batch {self.profile.min}-{self.profile.max}"
                                   f"{hw_text}{_errors(self._logger)}")
            out_shapes: dict[str, tuple[int, ...]] = {}
            try:
                cuda.memcpy_htod_async(slot.dev_in, host_in, self._stream)
                if not trt_ctx.set_tensor_address(name_in, int(slot.dev_in)):
                    raise BackendError(f"{self.path.name}: input address refused{_errors(self._logger)}")
                for spec in self._outputs:
                    got = tuple(int(d) for d in trt_ctx.get_tensor_shape(spec.name))
                    try:
                        if self.hw_profile is not None:
                            out_shapes[spec.name] = check_runtime_shape(spec.shape, got, rb.run,
                                                                        name=spec.name)
                        else:
                            want = resolve_shape(spec.shape, rb.run, name=spec.name)
                            if got != want:
                                raise ValueError(f"output {spec.name!r} has shape {got} for a batch "
                                                 f"of {rb.run}, expected {want}")
                            out_shapes[spec.name] = got
                    except ValueError as exc:
                        raise BackendError(f"{self.path.name}: {exc}") from None
                    if not trt_ctx.set_tensor_address(spec.name, int(slot.dev_out[spec.name])):
                        raise BackendError(f"{self.path.name}: output address refused"
                                           f"{_errors(self._logger)}")
                if not trt_ctx.execute_async_v3(self._stream.handle):
                    raise BackendError(f"{self.path.name}: TensorRT failed to enqueue a batch of "
                                       f"{rb.run}{_errors(self._logger)}")
                for spec in self._outputs:
                    cuda.memcpy_dtoh_async(_leading(slot.host_out[spec.name], out_shapes[spec.name]),
                                           slot.dev_out[spec.name], self._stream)
                slot.done.record(self._stream)
            except cuda.Error as exc:
                raise BackendError(f"{self.path.name}: CUDA error while queuing a batch of {n} "
                                   f"({exc})") from None
        slot.busy = True
        self._ticket += 1
        slot.ticket = self._ticket
        return InferHandle(index, self._ticket, n, rb.run, out_shapes[self._primary])

    def wait(self, handle: InferHandle) -> np.ndarray:
        """Block until ``handle``'s batch is back; its primary output for the n frames."""
        slot = self._slots[handle.slot]
        if not slot.busy or slot.ticket != handle.ticket:
            raise BackendError(f"{self.path.name}: this batch was already collected (or never queued)")
        try:
            with self._active():
                slot.done.synchronize()
        except self._cuda.Error as exc:
            slot.busy = False
            raise BackendError(f"{self.path.name}: CUDA error while running a batch of {handle.n} "
                               f"({exc})") from None
        slot.busy = False
        # A copy: the pinned buffer belongs to the slot and is rewritten by the next batch.
        out = np.array(_leading(slot.host_out[self._primary], handle.out_shape)[:handle.n], copy=True)
        return out.astype(np.float32, copy=False)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.wait(self.infer_async(batch))

    def describe(self) -> dict[str, Any]:
        build = self.manifest.build or {}
        facts = {"backend": self.name, "model": self.info.describe(),
                 "tensorrt": build.get(BUILD_TENSORRT), "gpu": build.get(BUILD_GPU),
                 "profile": self.profile.as_dict()}
        if self.hw_profile is not None:
            facts["hw_profile"] = self.hw_profile.as_dict()
        return facts

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._cuda_ctx is None:
            return
        cuda = self._cuda
        try:
            self._cuda_ctx.push()
        except Exception as exc:  # the context is gone (driver reset): nothing left to free
            log.warning("%s: could not activate the GPU context to free memory (%s)", self.path.name, exc)
            return
        try:
            if self._stream is not None:
                try:
                    self._stream.synchronize()
                except cuda.Error as exc:
                    log.warning("%s: stream error at close (%s)", self.path.name, exc)
            for slot in self._slots:
                for mem in (slot.dev_in, *slot.dev_out.values()):
                    mem.free()
            self._slots.clear()
            # TensorRT objects go in dependency order: context, engine, runtime.
            self._context = None
            self._engine = None
            self._runtime = None
            self._stream = None
        finally:
            cuda.Context.pop()
            self._cuda_ctx.detach()
            self._cuda_ctx = None
