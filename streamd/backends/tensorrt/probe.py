"""What this machine has for TensorRT: the tensorrt package, a CUDA binding (NVIDIA's
cuda-python, preferred: wheels for x86_64 and aarch64; or pycuda), their versions, the CUDA
driver and the GPU with its compute capability.

Used by ``streamd doctor``, by the export tool's engine stage (to say what is missing before
building) and by ``build``/``runtime``, which import TensorRT and the CUDA binding only through
here. Importing this module imports neither: they load when a function asks for them, so a
machine without them still imports streamd.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from ...errors import BackendError
from .logic import TrtVersion, check_supported, format_cc

INSTALL_HINT = ("install TensorRT's Python package (x86: pip install tensorrt from NVIDIA's "
                "index; Jetson: it comes with JetPack)")


def tensorrt_version() -> str | None:
    """The installed TensorRT's version, or None where it is not installed."""
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return str(trt.__version__)


def import_tensorrt() -> Any:
    """The tensorrt module, or a BackendError saying how to install a supported one."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendError(f"TensorRT is not installed ({exc}); {INSTALL_HINT}") from None
    try:
        check_supported(TrtVersion.parse(trt.__version__))
    except ValueError as exc:
        raise BackendError(str(exc)) from None
    return trt


CUDA_HINT = "pip install 'streamd[tensorrt]' (cuda-python and nvidia-ml-py), or pycuda"


def cuda_binding() -> tuple[Any, str]:
    """(the driver module, its name): ``streamd.backends.tensorrt.cuda_python`` on NVIDIA's
    cuda-python, else ``pycuda.driver``; not initialised. ImportError where neither is installed."""
    try:
        from . import cuda_python
        return cuda_python, "cuda-python"
    except ImportError as first:
        try:
            import pycuda.driver as cuda
        except ImportError:
            raise ImportError(f"no CUDA binding: neither cuda-python ({first}) nor pycuda is installed") from None
        return cuda, "pycuda"


def import_cuda() -> Any:
    """The CUDA binding, initialised, or a BackendError saying what is missing."""
    try:
        cuda, name = cuda_binding()
    except ImportError as exc:
        raise BackendError(f"{exc}; the TensorRT backend needs one for GPU memory and streams "
                           f"({CUDA_HINT})") from None
    try:
        cuda.init()
    except cuda.Error as exc:
        raise BackendError(f"CUDA could not be initialised through {name} ({exc}): no NVIDIA driver "
                           f"or GPU usable by this process") from None
    return cuda


def _driver_text(version: int) -> str:
    """CUDA's driver API version number (12040) as people write it (12.4)."""
    return f"{version // 1000}.{version % 1000 // 10}"


def cuda_driver() -> tuple[str, int, str]:
    """(CUDA driver version, number of devices, binding) as the CUDA binding sees them. Raises
    ImportError without one, and the binding's own error where the driver is unusable."""
    cuda, name = cuda_binding()
    cuda.init()
    return _driver_text(cuda.get_driver_version()), int(cuda.Device.count()), name


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: str
    memory_mb: int
    driver: str
    via: str                 # "cuda-python" | "pycuda" | "nvml" | "nvidia-smi"


def probe_gpu(index: int = 0) -> tuple[GpuInfo | None, str]:
    """The GPU at ``index`` (the CUDA binding first, then NVML, then nvidia-smi), or None and why not."""
    why, name = "", "cuda"
    try:
        cuda, name = cuda_binding()
        cuda.init()
        count = cuda.Device.count()
        if index >= count:
            return None, f"{name} sees {count} GPU(s), none at index {index}"
        dev = cuda.Device(index)
        return GpuInfo(index, dev.name(), format_cc(*dev.compute_capability()),
                       dev.total_memory() >> 20, _driver_text(cuda.get_driver_version()), name), ""
    except ImportError:
        why = "no CUDA binding installed (cuda-python or pycuda)"
    except Exception as exc:  # the binding's Error and friends: no driver, no device
        why = f"{name}: {str(exc).strip() or type(exc).__name__}"
    gpu, why = _probe_gpu_nvml(index, why)
    return (gpu, "") if gpu is not None else _probe_gpu_smi(index, why)


def _probe_gpu_nvml(index: int, why: str) -> tuple[GpuInfo | None, str]:
    """The GPU as NVML (nvidia-ml-py) reports it; ``why`` says why the CUDA binding could not.
    Jetsons have no NVML: there the answer is the binding's."""
    try:
        import pynvml
    except ImportError:
        return None, f"{why}; nvidia-ml-py not installed"
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            memory = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total) >> 20
            driver = _driver_text(int(pynvml.nvmlSystemGetCudaDriverVersion()))
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError as exc:
        return None, f"{why}; nvml: {exc}"
    name = name.decode() if isinstance(name, bytes) else str(name)
    return GpuInfo(index, name, format_cc(major, minor), memory, driver, "nvml"), ""


def _probe_gpu_smi(index: int, why: str) -> tuple[GpuInfo | None, str]:
    """The GPU as ``nvidia-smi`` reports it; ``why`` says why the CUDA binding could not tell."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None, f"{why}; nvidia-smi not found"
    try:
        out = subprocess.run([smi, "--query-gpu=name,compute_cap,memory.total,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{why}; nvidia-smi failed ({exc})"
    rows = [r for r in out.stdout.splitlines() if r.strip()]
    if out.returncode != 0 or index >= len(rows):
        msg = (out.stderr or out.stdout).strip().splitlines()
        return None, f"{why}; nvidia-smi: {msg[0] if msg else f'no GPU at index {index}'}"
    fields = [f.strip() for f in rows[index].split(",")]
    try:
        mem = int(float(fields[2]))
    except (IndexError, ValueError):
        mem = 0
    return GpuInfo(index, fields[0], fields[1] if len(fields) > 1 else "?", mem,
                   fields[3] if len(fields) > 3 else "?", "nvidia-smi"), ""
