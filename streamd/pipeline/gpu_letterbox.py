"""Letterbox on the GPU: a uint8 BGR frame already on the device into one slot of the uint8
(N, H, W, 3) batch a ``--input uint8`` model takes, bit for bit what ``BatchBuffer.fill`` makes
on the host with ``cv2.resize(..., INTER_LINEAR)``.

Written by hand because no library resizes with OpenCV's exact uint8 arithmetic on the GPU
(NPP, CV-CUDA and ``cupyx.scipy.ndimage.zoom`` each round differently, and OpenCV's own CUDA
module is not in any wheel), and a model's boxes must not depend on where it was letterboxed.
OpenCV's INTER_LINEAR on 8-bit pictures (imgproc/src/resize.cpp, ``resizeGeneric_`` with
``HResizeLinear`` and ``VResizeLinear<uchar, int, short, FixedPtCast<...>>``):

* per output column ``dx``: ``fx = float((dx + 0.5) * scale_x - 0.5)`` (``scale_x = 1 / (dst_w
  / src_w)`` in double), ``sx = floor(fx)``, ``fx -= sx``; left of the picture ``sx = 0, fx =
  0``, at or past its last column ``sx = src_w - 1, fx = 0``; weights ``round((1 - fx) * 2048)``
  and ``round(fx * 2048)`` (11 bits, rounded half to even); rows the same way, without the
  clamping of the weights (rows outside the picture are clamped when read instead);
* horizontal pass in int: ``h = S[sx] * a0 + S[sx + 1] * a1``;
* vertical pass: ``(((b0 * (h0 >> 4)) >> 16) + ((b1 * (h1 >> 4)) >> 16) + 2) >> 2``;
* OpenCV turns an exact 2:1 downscale into INTER_AREA, ``(a + b + c + d + 2) >> 2``, which the
  formulas above give too (weights 1024, 1024).

The coefficient tables are computed once per (frame size, slot size) on the host by
:func:`linear_tables` and uploaded; the kernel does only the integer part, one thread per
output pixel, and writes the grey 114 pads. :func:`letterbox_twin` is that integer part in
numpy, line for line the kernel's, so the arithmetic is tested against OpenCV where there is
no GPU (tests/test_gpu_letterbox.py); the kernel itself is compared with the host letterbox
in ``pytest -m gpu``.

CuPy (``pip install 'streamd[cuda-letterbox]'``) is imported only by :class:`GpuLetterbox`.
Not wired into the TensorRT backend yet: a building block, tested on its own.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..manifest import PAD_VALUE
from .preprocess import Letterbox, letterbox_geometry

COEF_BITS = 11                    # OpenCV's INTER_RESIZE_COEF_BITS
COEF_SCALE = 1 << COEF_BITS


@dataclass(frozen=True)
class LinearTables:
    """Where each output column and row reads, and with which fixed-point weights."""

    x0: np.ndarray        # int32 (new_w,): left source column
    x1: np.ndarray        # int32 (new_w,): right source column (clamped to the picture)
    xa: np.ndarray        # int32 (new_w, 2): column weights, sum 2048
    y0: np.ndarray        # int32 (new_h,): upper source row (clamped)
    y1: np.ndarray        # int32 (new_h,): lower source row (clamped)
    yb: np.ndarray        # int32 (new_h, 2): row weights, sum 2048


def _axis(src: int, dst: int, clamp_weights: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale = 1.0 / (dst / src)                    # OpenCV: 1 / inv_scale, both double
    f = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    f = (f - s.astype(np.float32)).astype(np.float32)
    if clamp_weights:
        left = s < 0
        s[left], f[left] = 0, 0
        right = s >= src - 1
        s[right], f[right] = src - 1, 0
    one = np.float32(1.0)
    w0 = np.rint((one - f) * np.float32(COEF_SCALE)).astype(np.int32)    # saturate_cast<short>
    w1 = np.rint(f * np.float32(COEF_SCALE)).astype(np.int32)
    first = np.clip(s, 0, src - 1).astype(np.int32)
    second = np.clip(s + 1, 0, src - 1).astype(np.int32)
    return first, second, np.stack([w0, w1], axis=1)


def linear_tables(src_w: int, src_h: int, new_w: int, new_h: int) -> LinearTables:
    x0, x1, xa = _axis(src_w, new_w, clamp_weights=True)
    y0, y1, yb = _axis(src_h, new_h, clamp_weights=False)
    return LinearTables(x0, x1, xa, y0, y1, yb)


def placement(src_w: int, src_h: int, net_h: int, net_w: int,
              fit: tuple[int, int] | None = None) -> tuple[Letterbox, int, int]:
    """The letterbox ``BatchBuffer`` would use (same function, same rounding)."""
    fit_h, fit_w = fit or (net_h, net_w)
    return letterbox_geometry(src_w, src_h, net_h, net_w, min(fit_h / src_h, fit_w / src_w))


def letterbox_twin(frame: np.ndarray, net_h: int, net_w: int,
                   fit: tuple[int, int] | None = None) -> tuple[np.ndarray, Letterbox]:
    """The kernel's arithmetic in numpy: one (net_h, net_w, 3) uint8 slot from a BGR frame.
    Each step below is one line of ``KERNEL_SOURCE``'s per-pixel code, vectorised."""
    src_h, src_w = frame.shape[:2]
    lb, new_w, new_h = placement(src_w, src_h, net_h, net_w, fit)
    out = np.full((net_h, net_w, 3), PAD_VALUE, np.uint8)
    if (new_w, new_h) == (src_w, src_h):      # the host copies an unscaled frame as it is
        out[lb.pad_y:lb.pad_y + new_h, lb.pad_x:lb.pad_x + new_w] = frame
        return out, lb
    t = linear_tables(src_w, src_h, new_w, new_h)
    s = frame.astype(np.int32)
    # int h0 = r0[sx0 * 3 + c] * a0 + r0[sx1 * 3 + c] * a1;  (and h1 from row r1)
    a0, a1 = t.xa[None, :, 0, None], t.xa[None, :, 1, None]
    h0 = s[t.y0][:, t.x0] * a0 + s[t.y0][:, t.x1] * a1
    h1 = s[t.y1][:, t.x0] * a0 + s[t.y1][:, t.x1] * a1
    # int v = (((b0 * (h0 >> 4)) >> 16) + ((b1 * (h1 >> 4)) >> 16) + 2) >> 2;
    b0, b1 = t.yb[:, 0, None, None], t.yb[:, 1, None, None]
    v = (((b0 * (h0 >> 4)) >> 16) + ((b1 * (h1 >> 4)) >> 16) + 2) >> 2
    out[lb.pad_y:lb.pad_y + new_h, lb.pad_x:lb.pad_x + new_w] = v.astype(np.uint8)
    return out, lb


# One thread per output pixel of the slot; 3 channels each. The tables come from
# linear_tables (uploaded once per frame size). int arithmetic only: see letterbox_twin.
KERNEL_SOURCE = r"""
extern "C" __global__ void letterbox_u8(
    const unsigned char* __restrict__ src, int src_pitch,
    unsigned char* __restrict__ dst, int net_h, int net_w,
    int new_h, int new_w, int pad_y, int pad_x,
    const int* __restrict__ x0, const int* __restrict__ x1, const int* __restrict__ xa,
    const int* __restrict__ y0, const int* __restrict__ y1, const int* __restrict__ yb,
    int copy_only)
{
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= net_w || y >= net_h) return;
    unsigned char* out = dst + ((size_t)y * net_w + x) * 3;
    int rx = x - pad_x, ry = y - pad_y;
    if (rx < 0 || ry < 0 || rx >= new_w || ry >= new_h) {
        out[0] = 114; out[1] = 114; out[2] = 114;          // PAD_VALUE
        return;
    }
    if (copy_only) {                                       // frame already at its slot size
        const unsigned char* p = src + (size_t)ry * src_pitch + rx * 3;
        out[0] = p[0]; out[1] = p[1]; out[2] = p[2];
        return;
    }
    const unsigned char* r0 = src + (size_t)y0[ry] * src_pitch;
    const unsigned char* r1 = src + (size_t)y1[ry] * src_pitch;
    int sx0 = x0[rx] * 3, sx1 = x1[rx] * 3;
    int a0 = xa[2 * rx], a1 = xa[2 * rx + 1];
    int b0 = yb[2 * ry], b1 = yb[2 * ry + 1];
    for (int c = 0; c < 3; ++c) {
        int h0 = r0[sx0 + c] * a0 + r0[sx1 + c] * a1;
        int h1 = r1[sx0 + c] * a0 + r1[sx1 + c] * a1;
        int v = (((b0 * (h0 >> 4)) >> 16) + ((b1 * (h1 >> 4)) >> 16) + 2) >> 2;
        out[c] = (unsigned char)v;                         // 0..255 by construction
    }
}
"""


class GpuLetterbox:
    """Letterboxes device frames (CuPy uint8 (H, W, 3) BGR arrays) into slots of a device
    batch (CuPy uint8 (N, H, W, 3)); tables cached per (frame size, slot size). One per
    thread/stream, like every other CUDA resource in streamd."""

    BLOCK = (32, 8, 1)

    def __init__(self, max_cached: int = 16) -> None:
        import cupy  # optional: the cuda-letterbox extra

        self._cp = cupy
        self._kernel = cupy.RawKernel(KERNEL_SOURCE, "letterbox_u8")
        self._tables: dict[tuple[int, ...], tuple[Any, ...]] = {}
        self._max_cached = max_cached

    def _device_tables(self, key: tuple[int, ...]) -> tuple[Any, ...]:
        tables = self._tables.get(key)
        if tables is None:
            if len(self._tables) >= self._max_cached:
                self._tables.pop(next(iter(self._tables)))
            t = linear_tables(*key)
            cp = self._cp
            tables = self._tables[key] = tuple(cp.asarray(np.ascontiguousarray(a, np.int32))
                                               for a in (t.x0, t.x1, t.xa, t.y0, t.y1, t.yb))
        return tables

    def fill_slot(self, frame: Any, batch: Any, slot: int, fit: tuple[int, int] | None = None,
                  stream: Any = None) -> Letterbox:
        """Letterbox ``frame`` into ``batch[slot]`` on ``stream`` (default: the current one)."""
        cp = self._cp
        if frame.dtype != cp.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"frame must be uint8 (H, W, 3), got {frame.dtype} {frame.shape}")
        frame = cp.ascontiguousarray(frame)
        src_h, src_w = frame.shape[:2]
        net_h, net_w = batch.shape[1:3]
        lb, new_w, new_h = placement(src_w, src_h, net_h, net_w, fit)
        copy_only = int((new_w, new_h) == (src_w, src_h))
        tables = self._device_tables((src_w, src_h, new_w, new_h))
        grid = (-(-net_w // self.BLOCK[0]), -(-net_h // self.BLOCK[1]), 1)
        args = (frame, np.int32(src_w * 3), batch[slot], np.int32(net_h), np.int32(net_w),
                np.int32(new_h), np.int32(new_w), np.int32(lb.pad_y), np.int32(lb.pad_x),
                *tables, np.int32(copy_only))
        with stream if stream is not None else contextlib.nullcontext():
            # CuPy launches on the current stream.
            self._kernel(grid, self.BLOCK, args)
        return lb
