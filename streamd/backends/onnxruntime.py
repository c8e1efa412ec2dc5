"""ONNX Runtime backend: CPU everywhere, the CUDA provider where the installed build has it."""

from __future__ import annotations

import ast
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError, ManifestError, ModelError
from ..manifest import LAYOUT_END2END, LAYOUT_RAW, ModelManifest, sidecar_path
from .base import Backend, ModelInfo

log = logging.getLogger("streamd.backend.onnxruntime")

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _parse_names(text: str) -> dict[int, str]:
    # Ultralytics stores names as a Python dict literal: "{0: 'person', 1: 'bicycle'}".
    value = ast.literal_eval(text)
    if isinstance(value, list):
        value = dict(enumerate(value))
    return {int(k): str(v) for k, v in value.items()}


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

        manifest: ModelManifest | None = None
        if sidecar_path(self.path).exists():
            manifest = ModelManifest.read(self.path)
            if verify_sha256:
                manifest.check_file(self.path)

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
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{self.path}: not a loadable ONNX model ({first[:300]})") from None

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
        if len(inp.shape) != 4:
            raise ModelError(f"{self.path}: input {inp.name!r} has shape {inp.shape}, "
                             f"expected (batch, 3, height, width)")
        dtype = _ORT_DTYPES.get(inp.type)
        if dtype is None:
            raise ModelError(f"{self.path}: input type {inp.type} is not supported (float or float16)")
        fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        # Symbolic (named or unnamed) dims 2 and 3: the graph itself takes any H x W.
        graph_any_hw = not isinstance(inp.shape[2], int) and not isinstance(inp.shape[3], int)
        if manifest is not None:
            names = manifest.class_names
            hw = manifest.imgsz
            bmin, bmax = manifest.batch_min, manifest.batch_max
            layout, precision, source = manifest.output_layout, manifest.precision, "manifest"
            sha = manifest.model_sha256
            dynamic_hw, stride = manifest.dynamic_hw, manifest.stride
            if dynamic_hw and not graph_any_hw:
                raise ManifestError(f"{self.path}: manifest says the model takes any H x W up to "
                                    f"{hw[0]}x{hw[1]}, but the graph's input is {inp.shape}")
        else:
            meta = self._session.get_modelmeta().custom_metadata_map
            if "names" not in meta:
                raise ManifestError(
                    f"{self.path}: no manifest ({sidecar_path(self.path).name}) and no class names "
                    f"in the ONNX metadata; export it with streamd-export")
            names = _parse_names(meta["names"])
            try:
                stride = int(meta.get("stride", 32))
            except ValueError:
                raise ManifestError(f"{self.path}: ONNX metadata stride {meta['stride']!r} is not "
                                    f"an integer") from None
            dynamic_hw = graph_any_hw
            if isinstance(inp.shape[2], int) and isinstance(inp.shape[3], int):
                hw = (inp.shape[2], inp.shape[3])
            else:
                # Ultralytics records the size it exported at; for a graph that takes any
                # H x W it is the largest input streamd feeds it.
                h, w = ast.literal_eval(meta.get("imgsz", "[640, 640]"))
                hw = (int(h), int(w))
                if not graph_any_hw:
                    raise ModelError(f"{self.path}: input {inp.name!r} has shape {inp.shape}: one of "
                                     f"height and width is fixed, the other not; streamd takes "
                                     f"models with both fixed or both dynamic")
                if stride <= 0 or hw[0] % stride or hw[1] % stride:
                    raise ManifestError(f"{self.path}: ONNX metadata imgsz {hw[0]}x{hw[1]} is not "
                                        f"a multiple of its stride {stride}")
            bmin = 1
            # A dynamic export records its max batch in metadata; without it, be modest.
            bmax = fixed_batch or int(meta.get("batch", 1) or 1)
            if fixed_batch is None and bmax == 1:
                bmax = 16
            out_shape = out.shape
            layout = LAYOUT_END2END if (len(out_shape) == 3 and out_shape[2] == 6
                                        and out_shape[1] != 4 + len(names)) else LAYOUT_RAW
            precision = "fp16" if dtype == np.float16 else "fp32"
            source, sha = "onnx-metadata", ""
        if fixed_batch is not None and not (bmin <= fixed_batch <= bmax):
            bmin = bmax = fixed_batch
        # Cross-check: a manifest that disagrees with the graph is worse than none.
        for axis, want in ((2, hw[0]), (3, hw[1])):
            got = inp.shape[axis]
            if isinstance(got, int) and got != want:
                raise ManifestError(f"{self.path}: manifest says input {hw[0]}x{hw[1]} but the "
                                    f"graph's input is {inp.shape}")
        return ModelInfo(path=self.path, names=names, input_name=inp.name, input_hw=hw,
                         input_dtype=np.dtype(dtype), batch_min=bmin, batch_max=bmax,
                         output_layout=layout, precision=precision, sha256=sha, source=source,
                         dynamic_hw=dynamic_hw, stride=stride,
                         nms_conf=manifest.nms_conf() if manifest is not None else None)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.check_batch(batch)
        n = batch.shape[0]
        if batch.dtype != self.info.input_dtype:
            batch = batch.astype(self.info.input_dtype)
        if self._fixed_batch is not None and n < self._fixed_batch:
            # A static-batch model takes exactly its batch: pad with zeros, drop the extra rows.
            pad = np.zeros((self._fixed_batch - n, *batch.shape[1:]), batch.dtype)
            batch = np.concatenate([batch, pad])
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
