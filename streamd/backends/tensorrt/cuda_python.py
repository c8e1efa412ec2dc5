"""The few CUDA driver calls the TensorRT backend makes, on NVIDIA's ``cuda-python``
(``cuda.bindings.driver``; wheels for x86_64 and aarch64, so a Jetson needs no compiler),
shaped like the part of ``pycuda.driver`` the backend was written for: ``Device``, the primary
``Context``, ``Stream``, ``Event``, pinned host arrays, device allocations and async copies.
``probe.import_cuda`` returns this module where cuda-python is installed, else pycuda's.

Written by hand because cuda-python is the bare C API (every call returns an error code first);
this maps each call to one line and each error to ``Error``. Only what needs no GPU is tested
here (no driver: a clear ``Error``); the rest follows the documented driver API and runs on a
GPU box in ``tests/test_tensorrt_gpu.py``. Importing this module imports cuda-python.
"""

from __future__ import annotations

import ctypes
import weakref
from typing import Any

import numpy as np

try:                                    # cuda-python >= 12.6
    from cuda.bindings import driver as _drv
except ImportError:                     # older cuda-python 12.x   # pragma: no cover - version specific
    from cuda import cuda as _drv       # type: ignore[no-redef]

__all__ = ["Error", "init", "get_driver_version", "Device", "Context", "Stream", "Event", "DeviceAllocation",
           "pagelocked_empty", "mem_alloc", "memcpy_htod_async", "memcpy_dtoh_async"]

_SUCCESS = _drv.CUresult.CUDA_SUCCESS


class Error(Exception):
    """A CUDA driver call failed (or there is no driver): its name and the call."""


def _call(fn: Any, *args: Any) -> Any:
    """Run one driver call; its result (None, one value or a tuple) or ``Error``."""
    try:
        out = fn(*args)
    except Error:
        raise
    except Exception as exc:  # no libcuda.so: cuda-python raises its own loader error
        raise Error(f"{fn.__name__}: the NVIDIA driver cannot be loaded ({exc})") from None
    err, rest = out[0], out[1:]
    if err != _SUCCESS:
        try:
            name = _drv.cuGetErrorName(err)[1].decode()
        except Exception:  # an error code the binding cannot name
            name = str(err)
        raise Error(f"{fn.__name__}: {name}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def init() -> None:
    _call(_drv.cuInit, 0)


def get_driver_version() -> int:
    return int(_call(_drv.cuDriverGetVersion))


class Context:
    """A device's primary context, retained (``Device.retain_primary_context``)."""

    def __init__(self, device: Any, handle: Any) -> None:
        self._device, self._handle = device, handle

    def push(self) -> None:
        _call(_drv.cuCtxPushCurrent, self._handle)

    @staticmethod
    def pop() -> None:
        _call(_drv.cuCtxPopCurrent)

    def detach(self) -> None:
        _call(_drv.cuDevicePrimaryCtxRelease, self._device)


class Device:
    def __init__(self, index: int) -> None:
        self._dev = _call(_drv.cuDeviceGet, index)

    @staticmethod
    def count() -> int:
        return int(_call(_drv.cuDeviceGetCount))

    def name(self) -> str:
        raw = _call(_drv.cuDeviceGetName, 256, self._dev)
        return bytes(raw).split(b"\0", 1)[0].decode(errors="replace")

    def compute_capability(self) -> tuple[int, int]:
        attr = _drv.CUdevice_attribute
        return (int(_call(_drv.cuDeviceGetAttribute, attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self._dev)),
                int(_call(_drv.cuDeviceGetAttribute, attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self._dev)))

    def total_memory(self) -> int:
        return int(_call(_drv.cuDeviceTotalMem, self._dev))

    def retain_primary_context(self) -> Context:
        return Context(self._dev, _call(_drv.cuDevicePrimaryCtxRetain, self._dev))


class Stream:
    def __init__(self) -> None:
        self._stream = _call(_drv.cuStreamCreate, _drv.CUstream_flags.CU_STREAM_NON_BLOCKING)

    @property
    def handle(self) -> int:
        """The raw ``cudaStream_t``, as TensorRT's ``execute_async_v3`` takes it."""
        return int(self._stream)

    def synchronize(self) -> None:
        _call(_drv.cuStreamSynchronize, self._stream)

    def destroy(self) -> None:
        _call(_drv.cuStreamDestroy, self._stream)


class Event:
    def __init__(self) -> None:
        self._event = _call(_drv.cuEventCreate, _drv.CUevent_flags.CU_EVENT_DISABLE_TIMING)

    def record(self, stream: Stream) -> None:
        _call(_drv.cuEventRecord, self._event, stream._stream)

    def synchronize(self) -> None:
        _call(_drv.cuEventSynchronize, self._event)

    def destroy(self) -> None:
        _call(_drv.cuEventDestroy, self._event)


class DeviceAllocation:
    """Device memory, freed explicitly (``free``), as pycuda's ``mem_alloc`` result is."""

    def __init__(self, nbytes: int) -> None:
        self._ptr: Any = _call(_drv.cuMemAlloc, nbytes)
        self.nbytes = nbytes

    def __int__(self) -> int:
        return int(self._ptr)

    def free(self) -> None:
        if self._ptr is not None:
            ptr, self._ptr = self._ptr, None
            _call(_drv.cuMemFree, ptr)


def mem_alloc(nbytes: int) -> DeviceAllocation:
    return DeviceAllocation(nbytes)


def _free_host(ptr: int) -> None:
    try:
        _drv.cuMemFreeHost(ptr)
    except Exception:  # at interpreter exit the context may be gone: the driver frees it with it
        pass


def pagelocked_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A numpy array in pinned (page-locked) host memory, freed when the array is (its views
    keep it alive), like pycuda's."""
    dt = np.dtype(dtype)
    nbytes = max(int(np.prod(shape)) * dt.itemsize, 1)
    ptr = int(_call(_drv.cuMemHostAlloc, nbytes, 0))
    raw = (ctypes.c_byte * nbytes).from_address(ptr)
    array = np.frombuffer(raw, dtype=np.uint8, count=nbytes)[: int(np.prod(shape)) * dt.itemsize]
    array = array.view(dt).reshape(shape)
    weakref.finalize(raw, _free_host, ptr)
    return array


def memcpy_htod_async(dest: DeviceAllocation, src: np.ndarray, stream: Stream) -> None:
    if not src.flags.c_contiguous:
        raise Error("memcpy_htod_async: the host array must be contiguous")
    _call(_drv.cuMemcpyHtoDAsync, int(dest), src.ctypes.data, src.nbytes, stream._stream)


def memcpy_dtoh_async(dest: np.ndarray, src: DeviceAllocation, stream: Stream) -> None:
    if not dest.flags.c_contiguous:
        raise Error("memcpy_dtoh_async: the host array must be contiguous")
    _call(_drv.cuMemcpyDtoHAsync, dest.ctypes.data, int(src), dest.nbytes, stream._stream)
