"""OpenVINO backend: the same ONNX files and manifests, on CPU, Intel iGPU (GPU), NPU or AUTO.

On the development box's EPYC an FP32 model runs about as fast as on ONNX Runtime's CPU
provider, and about twice as fast where BF16 is allowed (``bf16``: 33-37 vs 18-20 img/s for
YOLOv8s at 320, busy box); the symmetric INT8 file TensorRT wants is also fast here, unlike
on ONNX Runtime. Which backend wins on a given box is measured (``backend: auto``).

One pool layout is one compiled model with one infer request per worker: the model's
weights are loaded once, and the plugin runs the requests in flight concurrently, one per
"stream" (on a CPU a stream is a group of ``threads`` cores, so ``workers`` x ``threads``
maps onto OpenVINO's NUM_STREAMS x threads the way it maps onto ONNX Runtime sessions).
Each scheduler worker blocks on its own request from its own thread (the call releases the
GIL), so N workers keep N batches in flight: what OpenVINO's AsyncInferQueue does, without
a callback thread between the worker and its result.

Compiled models are cached on disk (``cache_dir``; by default ``.streamd-cache/openvino``
beside the model), so a restart reads the compiled blob instead of compiling again.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError, ModelError
from .base import Backend, ModelInfo
from .onnx_model import GraphIO, first_line, model_info, pad_to_fixed_batch, read_manifest

log = logging.getLogger("streamd.backend.openvino")

# streamd's device names -> OpenVINO's. "cuda" is not an OpenVINO device.
DEVICES = {"auto": "AUTO", "cpu": "CPU", "gpu": "GPU", "npu": "NPU"}


def default_cache_dir(model_path: Path) -> Path:
    return Path(model_path).parent / ".streamd-cache" / "openvino"


def core() -> Any:
    """The process's one OpenVINO Core (plugins load once), or BackendError naming the extra."""
    global _CORE
    if _CORE is None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise BackendError(f"OpenVINO is not installed ({exc}); pip install 'streamd[openvino]'") from None
        _CORE = ov.Core()
    return _CORE


_CORE: Any = None


def present_devices() -> list[str]:
    """OpenVINO devices present here (``CPU``, ``GPU``, ``GPU.1``, ``NPU``...)."""
    return list(core().available_devices)


def _ov_device(path: Path, device: str) -> str:
    if device not in DEVICES:
        raise BackendError(f"{path}: device {device!r} is not an OpenVINO device "
                           f"({', '.join(DEVICES)})")
    name = DEVICES[device]
    present = present_devices()
    if name != "AUTO" and not any(d.split(".")[0] == name for d in present):
        raise BackendError(f"{path}: OpenVINO device {name} (model.device: {device}) is not "
                           f"present on this machine (present: {', '.join(present) or 'none'})")
    return name


def _dims(shape: Any) -> tuple[int | None, ...]:
    return tuple(d.get_length() if d.is_static else None for d in shape)


def _metadata(model: Any) -> dict[str, str]:
    """The ONNX metadata_props, which OpenVINO keeps under rt_info['framework']."""
    try:
        fw = model.get_rt_info()["framework"]
    except (KeyError, RuntimeError, IndexError):
        return {}
    return {k: model.get_rt_info(["framework", k]).astype(str) for k in fw}


def compile_properties(device: str, workers: int, threads: int, precision: str,
                       bf16: bool = False) -> dict[str, str]:
    """OpenVINO properties for a layout: on the CPU, ``workers`` streams of ``threads``
    threads (the layout the pool measured); elsewhere the throughput hint sized for
    ``workers`` requests in flight."""
    props = {"PERFORMANCE_HINT": "THROUGHPUT" if workers > 1 else "LATENCY"}
    if device == "CPU":
        # On CPUs with BF16 (AVX512_BF16, AMX) OpenVINO would silently run an FP32 model in
        # BF16: twice as fast on the development box, but boxes then move (IoU down to 0.84,
        # |dconf| up to 0.02 on the sample frames at 640), which is not the model the export
        # verified. An FP32 model runs in FP32 unless the config asks for BF16. The float parts
        # of an INT8 or FP16 model (the head's box decode, kept out of INT8 because quantizing
        # it destroys the detections) run in FP32 too, as the export verified them: in BF16
        # the decoded box edges move by whole pixels.
        props["INFERENCE_PRECISION_HINT"] = "bf16" if bf16 and precision == "fp32" else "f32"
    if device == "CPU" and threads > 0:
        props.update({"NUM_STREAMS": str(workers), "INFERENCE_NUM_THREADS": str(workers * threads)})
    else:
        props["PERFORMANCE_HINT_NUM_REQUESTS"] = str(workers)
    return props


def _usable_cache_dir(cache_dir: Path) -> Path | None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        # A read-only model folder costs compile time at each start, nothing else.
        log.warning("OpenVINO compiled-model cache off: cannot create %s (%s)", cache_dir, exc)
        return None
    return cache_dir


class _Compiled:
    """One compiled model and the facts about it, shared by the workers of one layout."""

    def __init__(self, path: Path, *, device: str, workers: int, threads: int,
                 verify_sha256: bool, cache_dir: Path | None, bf16: bool = False) -> None:
        import openvino as ov
        self.path = path
        self.device = _ov_device(path, device)
        manifest = read_manifest(path, verify_sha256)
        ov_core = core()
        try:
            model = ov_core.read_model(str(path))
        except Exception as exc:   # OpenVINO raises RuntimeError with its parser's words
            raise ModelError(f"{path}: not a loadable ONNX model ({first_line(exc)})") from None
        inp, out = model.inputs[0], model.outputs[0]
        dtypes = {ov.Type.f32: np.float32, ov.Type.f16: np.float16, ov.Type.u8: np.uint8}
        dtype = dtypes.get(inp.get_element_type())
        pshape = inp.get_partial_shape()
        info = model_info(path, manifest, GraphIO(
            input_name=inp.any_name, input_shape=_dims(pshape),
            input_dtype=np.dtype(dtype) if dtype is not None else None,
            input_type=str(inp.get_element_type()), shape_text=str(pshape),
            output_shape=_dims(out.get_partial_shape()), metadata=_metadata(model)))
        self.fixed_batch = _dims(pshape)[0]
        if self.device == "NPU":
            # The NPU compiles static shapes only: one image at the model's full size.
            h, w = info.input_hw
            model.reshape(list(info.input_contract.shape(1, h, w)))
            info = replace(info, batch_min=1, batch_max=1, dynamic_hw=False)
            self.fixed_batch = 1
        self.info: ModelInfo = info
        self.cache_dir = _usable_cache_dir(cache_dir or default_cache_dir(path))
        if bf16 and self.device == "CPU" and "BF16" not in ov_core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            log.warning("model.openvino_bf16: this CPU has no BF16 instructions; the model runs in FP32")
            bf16 = False
        if bf16 and info.precision != "fp32":
            log.warning("model.openvino_bf16 applies to FP32 models; this %s model's float parts run "
                        "in FP32, as its export verified them", info.precision)
        props = compile_properties(self.device, workers, threads, info.precision, bf16)
        cache = {"CACHE_DIR": str(self.cache_dir)} if self.cache_dir is not None else {}
        try:
            self.model = ov_core.compile_model(model, self.device, {**props, **cache})
        except Exception as exc:
            raise BackendError(f"{path}: OpenVINO could not compile it for {self.device} "
                               f"({first_line(exc)})") from None
        self.loaded_from_cache = bool(self._property("LOADED_FROM_CACHE", False))
        self.execution_devices = list(self._property("EXECUTION_DEVICES", [self.device]))
        log.info("loaded %s with OpenVINO on %s (%s%s)", info.describe(),
                 ", ".join(self.execution_devices), props,
                 ", from the compiled-model cache" if self.loaded_from_cache else "")

    def _property(self, name: str, default: Any) -> Any:
        try:
            return self.model.get_property(name)
        except Exception:   # not every plugin reports every property
            return default


class OpenVinoBackend(Backend):
    name = "openvino"
    suffixes = (".onnx",)

    def __init__(self, path: Path, *, device: str = "auto", threads: int = 0,
                 verify_sha256: bool = True, warmup: bool = True, cache_dir: Path | None = None,
                 bf16: bool = False, _compiled: _Compiled | None = None) -> None:
        self.path = Path(path)
        self._compiled = _compiled or _Compiled(self.path, device=device, workers=1, threads=threads,
                                                verify_sha256=verify_sha256, cache_dir=cache_dir, bf16=bf16)
        self.info = self._compiled.info
        self._request = self._compiled.model.create_infer_request()
        if warmup:
            self.warmup()

    @classmethod
    def open_workers(cls, path: Path, workers: int, **options: Any) -> list[Backend]:
        """One compiled model, one infer request per worker."""
        compiled = _Compiled(Path(path), device=options.get("device", "auto"), workers=workers,
                             threads=options.get("threads", 0),
                             verify_sha256=options.get("verify_sha256", True),
                             cache_dir=options.get("cache_dir"), bf16=options.get("bf16", False))
        out: list[Backend] = [cls(path, warmup=options.get("warmup", True), _compiled=compiled)
                              for _ in range(workers)]
        return out

    @classmethod
    def runs_on_cpu(cls, device: str) -> bool:
        if device == "cpu":
            return True
        if device != "auto":
            return False
        try:
            return all(d.startswith("CPU") for d in present_devices())
        except BackendError:
            return True

    @property
    def loaded_from_cache(self) -> bool:
        """Whether this model's compiled blob came from the on-disk cache."""
        return self._compiled.loaded_from_cache

    @property
    def cache_dir(self) -> Path | None:
        return self._compiled.cache_dir

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.check_batch(batch)
        n = batch.shape[0]
        if batch.dtype != self.info.input_dtype:
            batch = batch.astype(self.info.input_dtype)
        batch = pad_to_fixed_batch(np.ascontiguousarray(batch), self._compiled.fixed_batch)
        try:
            # share_inputs: the request reads the caller's array in place (no copy); the
            # output is copied out, as the next call reuses the request's buffer.
            result = self._request.infer({0: batch}, share_inputs=True)
        except Exception as exc:
            raise BackendError(f"{self.path.name}: inference failed on a batch of {n} ({exc})") from None
        return np.asarray(result[0])[:n]

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": ", ".join(self._compiled.execution_devices),
                "model": self.info.describe()}

    def close(self) -> None:
        # The compiled model goes with the last worker's reference to it.
        self._request = None
        self._compiled = None  # type: ignore[assignment]
