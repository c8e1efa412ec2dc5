"""TensorRT backend: a plain ``.engine`` plan file plus its manifest, run through a CUDA binding
(NVIDIA's cuda-python via ``cuda_python``, or pycuda; ``probe.import_cuda`` picks).

Importing this module imports neither tensorrt nor a CUDA binding; both load when an engine is
opened (or built), so a machine without them can still import streamd, list backends and
read manifests (``probe`` imports them). The decisions (is this plan loadable here,
profile and batch choice, buffer sizes) live in ``logic`` and ``profiles`` beside this
module as plain functions; this module only applies them. Building a plan, and rebuilding
one for this machine, is ``build``'s.

Loading, in order:
1. the manifest is read and the plan is checked against it *before* TensorRT sees a byte:
   sha256, TensorRT major.minor, GPU compute capability. A mismatch of version or GPU is
   refused with a message saying what to do, or, with ``rebuild=True``, answered by
   rebuilding the plan from the ONNX the manifest records (after checking its sha256).
   An engine without a manifest is refused, unless ``trust_engine`` (``trusted``): then its
   manifest is made from its own I/O once deserialized;
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

Every decision it applies lives in ``logic``, ``profiles`` and ``trusted``; the slots' buffers,
what is written into them and the shapes read back, in ``slots``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import BackendError, ManifestError
from ...manifest import ModelManifest
from ..base import Backend, ModelInfo
from .build import last_error, make_logger, rebuild_engine
from .logic import BUILD_GPU, BUILD_TENSORRT, RuntimeFacts, check_engine, check_engine_file, format_cc
from .probe import import_cuda, import_tensorrt
from .trusted import TRUSTED_PLAN_HINT, EngineIO, load_trusted, trust_checks
from .profiles import (
    BatchProfile,
    HwProfile,
    TensorSpec,
    check_io,
    choose_run_batch,
    hw_profile_from_shapes,
    plan_buffers,
    profile_from_shapes,
    trt_dtype_name,
)
from .slots import InferHandle, Slot, allocate_slot, free_slot, leading, output_shape, stage_batch

log = logging.getLogger("streamd.backend.tensorrt")


class TensorRTBackend(Backend):
    name = "tensorrt"
    suffixes = (".engine", ".plan")

    def __init__(self, path: Path, *, device: str = "auto", threads: int = 0,
                 verify_sha256: bool = True, warmup: bool = True, rebuild: bool = False,
                 gpu: int = 0, slots: int = 2, trust_engine: bool = False,
                 class_names: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        self._closed = False
        self._cuda_ctx: Any = None
        self._slots: list[Slot] = []
        self._engine: Any = None
        self._context: Any = None
        self._runtime: Any = None
        self._stream: Any = None
        self._ticket = 0
        self.hw_profile: HwProfile | None = None     # set for engines that take any H x W
        self.trusted_io: EngineIO | None = None      # set for an engine loaded on model.trust_engine
        if device not in ("auto", "cuda"):
            raise BackendError(f"{self.path.name}: TensorRT engines run on an NVIDIA GPU, not on "
                               f"device {device!r}; use the .onnx model with the onnxruntime backend")
        if not verify_sha256:
            # An engine is native code: its bytes are always checked against the manifest.
            log.warning("%s: verify_sha256 is off, but engines are always checked", self.path.name)
        if not 1 <= slots <= 8:
            raise BackendError(f"slots {slots}: must be between 1 and 8")
        # An engine without a manifest is loaded only on model.trust_engine (``trusted``):
        # its manifest is then made from the engine's own I/O once TensorRT has read it.
        manifest: ModelManifest | None = None
        self._trusted_names = trust_checks(self.path, trust_engine, class_names)
        if self._trusted_names is None:
            manifest = ModelManifest.read(self.path)
        # Read once: the bytes that are checked are the bytes TensorRT gets. A changed file
        # is refused before anything native is loaded, on any machine.
        plan: bytes = self.path.read_bytes()
        actual_sha = hashlib.sha256(plan).hexdigest()
        if manifest is not None:
            check_engine_file(manifest, actual_sha, path=self.path)
        trt = import_tensorrt()
        cuda = import_cuda()
        self._cuda = cuda
        try:
            dev = cuda.Device(gpu)
            facts = RuntimeFacts(str(trt.__version__), format_cc(*dev.compute_capability()), dev.name())
        except cuda.Error as exc:
            raise BackendError(f"GPU {gpu}: {exc}") from None
        if manifest is not None:
            verdict = check_engine(manifest, actual_sha, facts, path=self.path, allow_rebuild=rebuild)
            if verdict.action == "rebuild":
                manifest, plan = rebuild_engine(self.path, manifest, verdict, facts)
        self._cuda_ctx = dev.retain_primary_context()
        try:
            with self._active():
                self._load(trt, plan, manifest, slots, facts=facts, sha256=actual_sha)
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
    def _load(self, trt: Any, plan: bytes, manifest: ModelManifest | None, n_slots: int, *,
              facts: RuntimeFacts, sha256: str) -> None:
        cuda = self._cuda
        self._logger = make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        if self._runtime is None:
            raise BackendError(f"{self.path.name}: TensorRT could not create a runtime{last_error(self._logger)}")
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise BackendError(f"{self.path.name}: TensorRT could not deserialize the engine"
                               f"{last_error(self._logger)}{TRUSTED_PLAN_HINT if manifest is None else ''}")
        engine = self._engine
        if manifest is None:         # model.trust_engine: the manifest is what the engine says
            manifest, self.trusted_io = load_trusted(engine, path=self.path, names=self._trusted_names or [],
                                                     sha256=sha256, facts=facts)
        self.manifest = manifest
        specs: list[TensorSpec] = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            specs.append(TensorSpec(name, is_input, tuple(int(d) for d in engine.get_tensor_shape(name)),
                                    trt_dtype_name(engine.get_tensor_dtype(name))))
        try:
            check_io(specs, path=self.path, input_name=manifest.input_name,
                     output_names=manifest.output_names, imgsz=manifest.imgsz,
                     dynamic_hw=manifest.dynamic_hw, layout=manifest.input_layout)
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
                self.hw_profile = hw_profile_from_shapes(*shapes, stride=manifest.stride,
                                                         layout=manifest.input_layout)
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
                               f"(out of GPU memory?){last_error(self._logger)}")
        at_max: dict[str, tuple[int, ...]] | None = None
        if self.hw_profile is not None:
            # Outputs of an engine that takes any H x W have a dynamic anchor axis: size the
            # buffers from the shapes TensorRT reports at the largest batch and input.
            biggest = manifest.input_contract().shape(self.profile.max, *self.hw_profile.max)
            if not self._context.set_input_shape(self._input.name, biggest):
                raise BackendError(f"{self.path.name}: input shape {biggest} refused"
                                   f"{last_error(self._logger)}")
            at_max = {s.name: tuple(int(d) for d in self._context.get_tensor_shape(s.name))
                      for s in specs}
        try:
            buffers = plan_buffers(specs, self.profile.max, at_max)
        except ValueError as exc:
            raise ManifestError(f"{self.path}: {exc}") from None
        try:
            self._stream = cuda.Stream()
            for _ in range(n_slots):
                self._slots.append(allocate_slot(cuda, buffers))
        except cuda.Error as exc:
            raise BackendError(f"{self.path.name}: GPU allocation failed ({exc})") from None
        in_dtype = np.dtype(buffers[[b.name for b in buffers].index(self._input.name)].dtype)
        h, w = manifest.imgsz
        self.info = ModelInfo(path=self.path, names=manifest.class_names, input_name=manifest.input_name,
                              input_hw=(h, w), input_dtype=in_dtype,
                              batch_min=max(manifest.batch_min, 1), batch_max=manifest.batch_max,
                              output_layout=manifest.output_layout, precision=manifest.precision,
                              sha256=manifest.model_sha256,
                              source="manifest" if self.trusted_io is None else "trusted engine",
                              dynamic_hw=manifest.dynamic_hw, stride=manifest.stride,
                              nms_conf=manifest.nms_conf(), input_contract=manifest.input_contract())

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
        contract = self.info.input_contract
        h, w = contract.hw(batch.shape)
        if self.hw_profile is not None:
            run_h, run_w = self.hw_profile.run_hw(h, w)     # check_batch made it valid
        else:
            run_h, run_w = h, w
        shape = contract.shape(rb.run, run_h, run_w)
        with self._active():
            host_in = stage_batch(slot.host_in, batch, contract, shape)
            if not trt_ctx.set_input_shape(name_in, shape):
                hw_text = (f", H x W {self.hw_profile.as_dict()}" if self.hw_profile is not None else "")
                raise BackendError(f"{self.path.name}: input {name_in!r} shape {shape} refused; the "
                                   f"engine's profile is batch {self.profile.min}-{self.profile.max}"
                                   f"{hw_text}{last_error(self._logger)}")
            out_shapes: dict[str, tuple[int, ...]] = {}
            try:
                # The one host-to-device copy of the batch. A model exported with --input uint8
                # takes the letterbox's bytes as they are and scales them in its first layers,
                # so this moves 1 byte per pixel instead of the 4 of a float32 input.
                cuda.memcpy_htod_async(slot.dev_in, host_in, self._stream)
                if not trt_ctx.set_tensor_address(name_in, int(slot.dev_in)):
                    raise BackendError(f"{self.path.name}: input address refused{last_error(self._logger)}")
                for spec in self._outputs:
                    got = tuple(int(d) for d in trt_ctx.get_tensor_shape(spec.name))
                    try:
                        out_shapes[spec.name] = output_shape(spec, got, rb.run,
                                                             any_hw=self.hw_profile is not None)
                    except ValueError as exc:
                        raise BackendError(f"{self.path.name}: {exc}") from None
                    if not trt_ctx.set_tensor_address(spec.name, int(slot.dev_out[spec.name])):
                        raise BackendError(f"{self.path.name}: output address refused"
                                           f"{last_error(self._logger)}")
                if not trt_ctx.execute_async_v3(self._stream.handle):
                    raise BackendError(f"{self.path.name}: TensorRT failed to enqueue a batch of "
                                       f"{rb.run}{last_error(self._logger)}")
                for spec in self._outputs:
                    cuda.memcpy_dtoh_async(leading(slot.host_out[spec.name], out_shapes[spec.name]),
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
        out = np.array(leading(slot.host_out[self._primary], handle.out_shape)[:handle.n], copy=True)
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
        if self.trusted_io is not None:
            facts["trusted"] = self.trusted_io.describe()
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
                free_slot(slot)
            self._slots.clear()
            if self._stream is not None and hasattr(self._stream, "destroy"):
                self._stream.destroy()
            # TensorRT objects go in dependency order: context, engine, runtime.
            self._context = None
            self._engine = None
            self._runtime = None
            self._stream = None
        finally:
            cuda.Context.pop()
            self._cuda_ctx.detach()
            self._cuda_ctx = None
