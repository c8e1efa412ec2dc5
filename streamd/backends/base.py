"""The contract every inference backend honours (ONNX Runtime today, TensorRT next).

A backend loads one model file, checks it against its manifest, warms up, and then runs
``infer(batch)`` on a batch in the model's input contract (``ModelInfo.input_contract``): a
(n, 3, H, W) float RGB batch scaled to [0, 1], or for a model exported with ``--input uint8``
the letterbox's own (n, H, W, 3) uint8 BGR bytes. It returns the model's single output array
for those n images. It knows nothing of cameras.

A fixed-size model takes exactly its ``input_hw``. A ``dynamic_hw`` model takes any H, W
that are multiples of its ``stride`` up to ``input_hw``, so a caller can letterbox each
camera to its own aspect (``streamd.pipeline.preprocess.net_shape_for``); every image of one batch
still shares one H x W.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from ..errors import BackendError
from ..manifest import FLOAT_INPUT, LAYOUT_NHWC, InputContract


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the daemon needs to know about a loaded model."""

    path: Path
    names: dict[int, str]
    input_name: str
    input_hw: tuple[int, int]        # (height, width); the largest accepted when dynamic_hw
    input_dtype: np.dtype
    batch_min: int
    batch_max: int
    output_layout: str               # manifest.LAYOUT_RAW | manifest.LAYOUT_END2END
    precision: str = "fp32"
    sha256: str = ""
    source: str = "manifest"          # where the facts came from: "manifest" | "onnx-metadata"
    dynamic_hw: bool = False         # any H, W that are multiples of ``stride`` up to input_hw
    stride: int = 32
    # The score threshold baked into a graph with NMS inside (from its manifest): no box
    # below it ever comes out. None: a raw head, or a graph that does not say.
    nms_conf: float | None = None
    # What the input takes (dtype, axis and channel order); input_dtype is its numpy dtype.
    input_contract: InputContract = FLOAT_INPUT

    def blank_input(self, n: int, hw: tuple[int, int] | None = None) -> np.ndarray:
        """``n`` black images at ``hw`` (default: the largest input) in the input's contract."""
        h, w = hw or self.input_hw
        return np.zeros(self.input_contract.shape(n, h, w), self.input_dtype)

    def describe(self) -> str:
        h, w = self.input_hw
        size = f"any HxW up to {w}x{h} (stride {self.stride})" if self.dynamic_hw else f"{w}x{h}"
        takes = ", takes uint8 NHWC BGR" if self.input_contract.raw else ""
        return (f"{self.path.name} ({len(self.names)} classes, {size}, batch "
                f"{self.batch_min}-{self.batch_max}, {self.output_layout}, {self.precision}{takes})")

    def accepts_hw(self, h: int, w: int) -> bool:
        """Whether an input of ``h`` x ``w`` pixels fits the model."""
        max_h, max_w = self.input_hw
        if not self.dynamic_hw:
            return (h, w) == (max_h, max_w)
        return 0 < h <= max_h and 0 < w <= max_w and h % self.stride == 0 and w % self.stride == 0


class Backend(abc.ABC):
    """Load on construction, ``infer`` many times, ``close`` once (or use ``with``)."""

    name: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]]   # model file suffixes this backend opens

    info: ModelInfo

    @abc.abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch of n images (batch_min <= n <= batch_max) -> output for n images."""

    @abc.abstractmethod
    def close(self) -> None:
        """Free everything the backend holds; safe to call twice."""

    @classmethod
    def open_workers(cls, path: Path, workers: int, **options: Any) -> list["Backend"]:
        """``workers`` backends of one model, one per pool worker, never shared between
        threads. By default each loads its own copy; a runtime whose one loaded model
        serves several requests in flight at once overrides this."""
        return open_each(workers, lambda: cls(path, **options))  # type: ignore[call-arg]

    @classmethod
    def runs_on_cpu(cls, device: str) -> bool:
        """Whether ``device`` means this backend's work runs on the CPU cores (the pool then
        splits the cores into threads per worker)."""
        return False

    def describe(self) -> dict[str, Any]:
        """Facts for logs and the stats message (provider, device...)."""
        return {"backend": self.name}

    def check_batch(self, batch: np.ndarray) -> None:
        """Refuse a batch the model cannot take, saying expected vs got."""
        info = self.info
        c = info.input_contract
        h, w = info.input_hw
        channels_ok = batch.ndim == 4 and batch.shape[3 if c.layout == LAYOUT_NHWC else 1] == 3
        if info.dynamic_hw:
            if not channels_ok or not info.accepts_hw(*c.hw(batch.shape)):
                raise BackendError(
                    f"{info.path.name}: input {info.input_name!r} expects shape {c.shape_text('n', 'h', 'w')} "
                    f"with h <= {h} and w <= {w}, both multiples of the stride {info.stride}; got "
                    f"{tuple(batch.shape)}")
        elif not channels_ok or c.hw(batch.shape) != (h, w):
            raise BackendError(f"{info.path.name}: input {info.input_name!r} expects shape "
                               f"{c.shape_text('n', h, w)}, got {tuple(batch.shape)}")
        if c.raw and batch.dtype != np.uint8:
            # Cast to uint8, a float batch in [0, 1] would be black: refuse it instead.
            raise BackendError(f"{info.path.name}: input {info.input_name!r} takes the letterbox's "
                               f"uint8 bytes ({c.describe()}), got {batch.dtype}")
        if not 1 <= batch.shape[0] <= info.batch_max:
            raise BackendError(f"{info.path.name}: batch of {batch.shape[0]} is outside the "
                               f"model's range 1-{info.batch_max}")

    def warmup(self, runs: int = 1) -> None:
        """First runs allocate and tune; do them before cameras start counting latency."""
        dummy = self.info.blank_input(self.info.batch_max)
        for _ in range(runs):
            self.infer(dummy)

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_each(n: int, make: Callable[[], Backend]) -> list[Backend]:
    """``n`` backends from ``make``; if one fails, the ones already open are closed."""
    out: list[Backend] = []
    try:
        for _ in range(n):
            out.append(make())
    except BaseException:
        for b in out:
            b.close()
        raise
    return out
