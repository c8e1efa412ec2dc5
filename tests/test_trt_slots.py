"""What the TensorRT runtime writes into a slot's pinned input buffer and the shapes it reads
its outputs at (``backends/tensorrt/slots``): plain numpy, run here on ordinary arrays standing
for the pinned ones. The slots' CUDA allocations run on a GPU (``-m gpu``), through cuda-python."""

from __future__ import annotations

import numpy as np
import pytest

from streamd.backends.tensorrt.profiles import BufferSpec, TensorSpec
from streamd.backends.tensorrt.slots import allocate_slot, free_slot, leading, output_shape, stage_batch
from streamd.manifest import FLOAT_INPUT, PAD_VALUE, RAW_UINT8
from tests.test_cuda_binding import DRIVER_PROBLEM


def test_a_batch_at_the_engines_size_fills_the_leading_bytes_only() -> None:
    buffer = np.full(4 * 3 * 64 * 64, -1.0, np.float32)          # room for the largest input
    batch = np.random.default_rng(0).random((2, 3, 32, 64), dtype=np.float32)
    view = stage_batch(buffer, batch, FLOAT_INPUT, (2, 3, 32, 64))
    assert view.shape == (2, 3, 32, 64) and np.shares_memory(view, buffer)
    np.testing.assert_array_equal(view, batch)
    assert (buffer[batch.size:] == -1.0).all()                    # the rest untouched


def test_a_batch_padded_to_the_profile_gets_zero_rows_and_grey_edges() -> None:
    buffer = np.full(4 * 3 * 64 * 64, -1.0, np.float32)
    batch = np.full((1, 3, 32, 48), 0.25, np.float32)
    # Run as 2 images (the profile's minimum) at 32 x 64 (its smallest width).
    view = stage_batch(buffer, batch, FLOAT_INPUT, (2, 3, 32, 64))
    assert (view[0, :, :, :48] == 0.25).all()
    assert np.allclose(view[0, :, :, 48:], PAD_VALUE / 255.0)     # grey right of the picture
    assert (view[1] == 0).all()                                   # the padding image


def test_a_uint8_batch_is_written_channels_last_with_grey_bytes() -> None:
    buffer = np.zeros(2 * 64 * 64 * 3, np.uint8)
    batch = np.full((1, 32, 32, 3), 7, np.uint8)
    view = stage_batch(buffer, batch, RAW_UINT8, (1, 64, 32, 3))
    assert view.shape == (1, 64, 32, 3)
    assert (view[0, :32] == 7).all() and (view[0, 32:] == PAD_VALUE).all()


def test_leading_is_a_view_of_the_first_elements() -> None:
    buffer = np.arange(24, dtype=np.float32)
    view = leading(buffer, (2, 3))
    assert view.tolist() == [[0, 1, 2], [3, 4, 5]] and np.shares_memory(view, buffer)


def test_output_shapes_follow_the_batch_and_for_any_hw_the_anchors() -> None:
    fixed = TensorSpec("output0", False, (-1, 6, 2100), "FLOAT")
    assert output_shape(fixed, (4, 6, 2100), 4, any_hw=False) == (4, 6, 2100)
    with pytest.raises(ValueError, match=r"output 'output0' has shape \(4, 6, 2100\) for a batch of 2"):
        output_shape(fixed, (4, 6, 2100), 2, any_hw=False)
    any_hw = TensorSpec("output0", False, (-1, 6, -1), "FLOAT")
    assert output_shape(any_hw, (2, 6, 1260), 2, any_hw=True) == (2, 6, 1260)
    with pytest.raises(ValueError):
        output_shape(any_hw, (3, 6, 1260), 2, any_hw=True)


@pytest.mark.gpu
def test_slots_are_allocated_for_every_tensor_and_freed() -> None:
    if DRIVER_PROBLEM is not None:
        pytest.skip(DRIVER_PROBLEM)
    from cuda.bindings import driver as drv

    from streamd.backends.tensorrt import cuda_python as cu

    ctx = cu.Device(0).retain_primary_context()
    ctx.push()
    try:
        free_before = drv.cuMemGetInfo()[1]
        specs = [BufferSpec("images", True, (8, 320, 320, 3), np.dtype(np.uint8), 8 * 320 * 320 * 3),
                 BufferSpec("output0", False, (8, 6, 2100), np.dtype(np.float32), 8 * 6 * 2100 * 4)]
        for _ in range(20):
            slots = [allocate_slot(cu, specs) for _ in range(4)]
            assert slots[0].host_in.shape == (8, 320, 320, 3) and slots[0].host_in.dtype == np.uint8
            assert slots[0].host_out["output0"].shape == (8, 6, 2100) and set(slots[0].dev_out) == {"output0"}
            for slot in slots:
                free_slot(slot)
            del slots
        assert drv.cuMemGetInfo()[1] >= free_before - (64 << 20), "device memory leaked"
    finally:
        cu.Context.pop()
        ctx.detach()
