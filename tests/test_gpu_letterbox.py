"""The GPU letterbox (``pipeline/gpu_letterbox``): OpenCV's INTER_LINEAR uint8 arithmetic.

Here, without a GPU: the numpy twin of the kernel's integer code against ``cv2.resize`` + the
host letterbox (``BatchBuffer.fill``), bit for bit, on many frame sizes and aspects (up- and
downscaling, 1080p -> 640, exact 2:1, odd and tiny sizes). With CuPy and an NVIDIA GPU
(``pytest -m gpu``): the kernel itself against the host letterbox, bit for bit, and no device
memory left behind over 10,000 batches; elsewhere that test skips saying why.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from streamd.manifest import RAW_UINT8
from streamd.pipeline.gpu_letterbox import COEF_SCALE, letterbox_twin, linear_tables
from streamd.pipeline.preprocess import BatchBuffer, net_shape_for

# (frame w, frame h, slot h, slot w): the cameras streamd sees, and the corners of the arithmetic.
SIZES = [
    (1920, 1080, 640, 640), (1920, 1080, 384, 640), (1920, 1080, 352, 640), (1280, 720, 384, 640),
    (1280, 720, 320, 320),   # exactly 2:1 (OpenCV's INTER_AREA shortcut)
    (2560, 1440, 640, 640), (3840, 2160, 384, 640), (810, 1080, 640, 480), (704, 576, 640, 640),
    (640, 480, 640, 640),    # upscaled
    (320, 240, 640, 640), (333, 517, 640, 640), (101, 77, 320, 320), (1281, 719, 384, 640),
    (1000, 1000, 640, 640), (641, 641, 640, 640), (3, 5, 64, 64), (1, 1, 32, 32), (7, 2000, 640, 640),
    (2000, 7, 640, 640), (640, 640, 640, 640),   # unscaled: copied
]


def host_slot(frame: np.ndarray, net_h: int, net_w: int, fit: tuple[int, int] | None = None) -> np.ndarray:
    (slot,), _ = BatchBuffer(1, net_h, net_w, fit=fit, contract=RAW_UINT8).fill([frame])
    return slot


def random_sizes(n: int, seed: int = 1) -> list[tuple[int, int, int, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = (int(v) for v in rng.integers(2, 2000, 2))
        imgsz = (int(rng.choice([320, 416, 640])),) * 2
        out.append((w, h, *net_shape_for(w, h, imgsz)))
    return out


@pytest.mark.parametrize("w,h,net_h,net_w", SIZES + random_sizes(40))
def test_the_twin_is_cv2_resize_bit_for_bit(w: int, h: int, net_h: int, net_w: int) -> None:
    rng = np.random.default_rng(w * 7919 + h)
    frame = rng.integers(0, 256, (h, w, 3), np.uint8)
    # Smooth content too: noise alone hides rounding that only shows on gradients.
    yy, xx = np.mgrid[0:h, 0:w]
    frame[..., 1] = ((xx * 255) // max(w - 1, 1)).astype(np.uint8)
    want = host_slot(frame, net_h, net_w)
    got, lb = letterbox_twin(frame, net_h, net_w)
    assert got.shape == want.shape == (net_h, net_w, 3)
    diff = np.flatnonzero(got != want)
    assert diff.size == 0, f"{diff.size} bytes differ, first at {np.unravel_index(diff[0], got.shape)}"
    assert (got[:lb.pad_y] == 114).all()


def test_the_twin_letterboxes_a_stride_padded_slot_like_the_host() -> None:
    """A 16:9 camera into a slot of a model that takes any H x W: scaled to fit the model's
    640 x 640, padded only to the stride (the scheduler's ``fit``)."""
    frame = np.random.default_rng(3).integers(0, 256, (1080, 1920, 3), np.uint8)
    got, lb = letterbox_twin(frame, 384, 640, fit=(640, 640))
    assert np.array_equal(got, host_slot(frame, 384, 640, fit=(640, 640)))
    assert (lb.pad_x, lb.pad_y) == (0, 12)


def test_the_weights_are_opencvs_11_bit_fixed_point() -> None:
    t = linear_tables(1920, 1080, 640, 360)
    assert t.xa.dtype == np.int32 and (t.xa.sum(axis=1) == COEF_SCALE).all() and COEF_SCALE == 2048
    assert (t.yb.sum(axis=1) == COEF_SCALE).all()
    # 3:1: every output column centred on a source column, all weight on it.
    assert (t.xa[:, 0] == 2048).all() and (t.x0 == np.arange(640) * 3 + 1).all()
    up = linear_tables(4, 4, 8, 8)        # 1:2 upscale: 0.25 / 0.75 steps, edges clamped
    assert up.xa.tolist()[:3] == [[2048, 0], [1536, 512], [512, 1536]] and up.xa.tolist()[-1] == [2048, 0]


# ---------------------------------------------------------------------------------------
# the kernel itself (an NVIDIA GPU and CuPy)
# ---------------------------------------------------------------------------------------
def _gpu_problem() -> str | None:
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (pip install 'streamd[cuda-letterbox]')"
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() == 0:
            return "no NVIDIA GPU"
    except Exception as exc:    # CUDARuntimeError without a driver
        return f"no usable NVIDIA GPU or driver ({type(exc).__name__}: {exc})"
    return None


@pytest.mark.gpu
@pytest.mark.slow
def test_the_kernel_is_the_host_letterbox_bit_for_bit_and_leaks_nothing() -> None:
    problem = _gpu_problem()
    if problem is not None:
        pytest.skip(problem)
    import cupy

    from streamd.pipeline.gpu_letterbox import GpuLetterbox

    lbx = GpuLetterbox()
    rng = np.random.default_rng(0)
    for w, h, net_h, net_w in SIZES + random_sizes(20):
        frame = rng.integers(0, 256, (h, w, 3), np.uint8)
        batch = cupy.zeros((2, net_h, net_w, 3), cupy.uint8)
        lbx.fill_slot(cupy.asarray(frame), batch, 1)
        got = cupy.asnumpy(batch)
        assert np.array_equal(got[1], host_slot(frame, net_h, net_w)), (w, h, net_h, net_w)
        assert not got[0].any()                                   # the other slot untouched

    # 10,000 batches of 4 cameras into one reused device batch: nothing may accumulate.
    frames = [cupy.asarray(rng.integers(0, 256, (1080, 1920, 3), np.uint8)),
              cupy.asarray(rng.integers(0, 256, (720, 1280, 3), np.uint8))]
    batch = cupy.empty((4, 640, 640, 3), cupy.uint8)
    stream = cupy.cuda.Stream(non_blocking=True)
    pool = cupy.get_default_memory_pool()

    def run(n: int) -> None:
        for _ in range(n):
            for slot in range(4):
                lbx.fill_slot(frames[slot % 2], batch, slot, stream=stream)
        stream.synchronize()

    run(10)
    used, free = pool.used_bytes(), cupy.cuda.runtime.memGetInfo()[0]
    run(10_000)
    assert pool.used_bytes() == used
    assert cupy.cuda.runtime.memGetInfo()[0] >= free - (1 << 20)
    want = host_slot(cupy.asnumpy(frames[1]), 640, 640)
    assert np.array_equal(cupy.asnumpy(batch[3]), want)
