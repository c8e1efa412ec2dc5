"""ONNX Runtime backend: CPU everywhere, the CUDA provider where the installed build has it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError, ModelError
from ..manifest import ModelManifest
from .base import Backend, ModelInfo
from .onnx_model import GraphIO, first_line, model_info, pad_to_fixed_batch, read_manifest

log = logging.getLogger("streamd.backend.onnxruntime")

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    suffixes = (".onnx",)

    def __init__(self, path: Path, *, device: str = "auto", threads: int = 0,
                 verify_sha256: bool = True, warmup: bool = True) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:   # pragma: no cover - it is a hard dependency
            raise BackendError(f"onnxruntime is not installed ({exc})") from None
        self._ort = ort
        self.path = Path(path)
        available = ort.get_available_providers()
        if device == "cpu":
            providers = ["CPUExecutionProvider"]
        elif device == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise BackendError(f"{path}: device 'cuda' asked for, but this onnxruntime has "
                                   f"only {', '.join(available)} (install onnxruntime-gpu)")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        elif device == "auto":
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        else:
            raise BackendError(f"unknown device {device!r} for onnxruntime (auto, cpu, cuda)")

        manifest = read_manifest(self.path, verify_sha256)

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads > 0:
            opts.intra_op_num_threads = threads
        # ORT's workers busy-wait between ops by default. Beside decoder threads on a small
        # box that spinning steals the CPU the decoders need and slows inference itself
        # (measured: 2.5x slower batches on 2 cores with 4 cameras); sleeping costs ~nothing.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for corrupt files
            raise ModelError(f"{self.path}: not a loadable ONNX model ({first_line(exc)})") from None

        self.info = self._model_info(manifest)
        inp = self._session.get_inputs()[0]
        self._input_name = inp.name
        self._output_name = self._session.get_outputs()[0].name
        self._fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.providers = self._session.get_providers()
        log.info("loaded %s with %s", self.info.describe(), self.providers[0])
        if warmup:
            self.warmup()

    def _model_info(self, manifest: ModelManifest | None) -> ModelInfo:
        inp = self._session.get_inputs()[0]
        out = self._session.get_outputs()[0]

        def dims(shape: list[Any]) -> tuple[int | None, ...]:
            return tuple(d if isinstance(d, int) else None for d in shape)

        dtype = _ORT_DTYPES.get(inp.type)
        return model_info(self.path, manifest, GraphIO(
            input_name=inp.name, input_shape=dims(inp.shape),
            input_dtype=np.dtype(dtype) if dtype is not None else None, input_type=inp.type,
            shape_text=str(inp.shape), output_shape=dims(out.shape),
            metadata=self._session.get_modelmeta().custom_metadata_map))

    @classmethod
    def runs_on_cpu(cls, device: str) -> bool:
        if device == "cpu":
            return True
        import onnxruntime
        return "CUDAExecutionProvider" not in onnxruntime.get_available_providers()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.check_batch(batch)
        n = batch.shape[0]
        if batch.dtype != self.info.input_dtype:
            batch = batch.astype(self.info.input_dtype)
        batch = pad_to_fixed_batch(batch, self._fixed_batch)
        try:
            out = self._session.run([self._output_name], {self._input_name: batch})[0]
        except Exception as exc:
            raise BackendError(f"{self.path.name}: inference failed on a batch of {n} ({exc})") from None
        return out[:n]

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "provider": self.providers[0], "model": self.info.describe()}

    def close(self) -> None:
        # ORT frees the session when the last reference goes; drop ours explicitly.
        self._session = None  # type: ignore[assignment]
