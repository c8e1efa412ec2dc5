"""The TensorRT backend's CUDA binding on NVIDIA's cuda-python (``backends/tensorrt/cuda_python``).

Without a GPU only the failure paths can run: no driver must be a clear error naming the binding,
never a crash. The buffer path (pinned host arrays, async copies on a stream, explicit frees) runs
where a GPU and its driver are present (``-m gpu``) and skips elsewhere, saying why."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from streamd.backends.tensorrt.probe import cuda_binding, import_cuda, probe_gpu
from streamd.errors import BackendError

HAVE_CUDA_PYTHON = importlib.util.find_spec("cuda") is not None and \
    importlib.util.find_spec("cuda.bindings") is not None
needs_cuda_python = pytest.mark.skipif(not HAVE_CUDA_PYTHON,
                                       reason="cuda-python is not installed (pip install 'streamd[tensorrt]')")


def _driver_problem() -> str | None:
    if not HAVE_CUDA_PYTHON:
        return "cuda-python is not installed (pip install 'streamd[tensorrt]')"
    from streamd.backends.tensorrt import cuda_python

    try:
        cuda_python.init()
        if cuda_python.Device.count() == 0:
            return "the NVIDIA driver sees no GPU"
    except cuda_python.Error as exc:
        return f"no usable NVIDIA driver here ({exc})"
    return None


DRIVER_PROBLEM = _driver_problem()


@needs_cuda_python
def test_cuda_python_is_the_preferred_binding() -> None:
    module, name = cuda_binding()
    assert name == "cuda-python" and module.__name__.endswith("tensorrt.cuda_python")


@needs_cuda_python
def test_no_driver_is_a_clear_error_naming_the_binding() -> None:
    if DRIVER_PROBLEM is None:
        pytest.skip("an NVIDIA driver and GPU are present: the GPU test below runs instead")
    with pytest.raises(BackendError, match="CUDA could not be initialised through cuda-python .*no NVIDIA driver"):
        import_cuda()
    gpu, why = probe_gpu(0)
    assert gpu is None and why.startswith("cuda-python: ")
    if importlib.util.find_spec("pynvml") is not None:   # NVML asked next, and says why not too
        assert "; nvml: " in why


@pytest.mark.gpu
def test_pinned_uploads_and_downloads_on_a_stream_free_what_they_take() -> None:
    if DRIVER_PROBLEM is not None:
        pytest.skip(DRIVER_PROBLEM)
    from cuda.bindings import driver as drv

    from streamd.backends.tensorrt import cuda_python as cu

    ctx = cu.Device(0).retain_primary_context()
    ctx.push()
    try:
        stream = cu.Stream()
        free_before = drv.cuMemGetInfo()[1]
        rng = np.random.default_rng(0)
        for i in range(2000):
            host_in = cu.pagelocked_empty((4, 3, 360, 640), np.uint8)
            host_out = cu.pagelocked_empty((4, 3, 360, 640), np.uint8)
            dev = cu.mem_alloc(host_in.nbytes)
            done = cu.Event()
            host_in[...] = rng.integers(0, 255, host_in.shape, dtype=np.uint8) if i % 500 == 0 else i % 251
            cu.memcpy_htod_async(dev, host_in, stream)
            cu.memcpy_dtoh_async(host_out, dev, stream)
            done.record(stream)
            done.synchronize()
            assert np.array_equal(host_in, host_out)
            dev.free()
            done.destroy()
            del host_in, host_out
        stream.synchronize()
        stream.destroy()
        assert drv.cuMemGetInfo()[1] >= free_before - (64 << 20), "device memory leaked"
    finally:
        cu.Context.pop()
        ctx.detach()
