"""TensorRT backend, one module per concern:

- ``runtime``: deserialising a plan and running it (the backend the registry names);
- ``build``: building a plan from an ONNX (export tool, ``model.rebuild_engine``, doctor);
- ``probe``: what is installed: TensorRT, the CUDA binding (cuda-python or pycuda), the driver, the GPU;
- ``cuda_python``: the driver calls the runtime makes, on NVIDIA's cuda-python;
- ``logic`` and ``profiles``: the decisions as plain functions, tested without a GPU.

Importing any of them (but ``cuda_python``) imports neither tensorrt nor a CUDA binding.
"""

from .runtime import TensorRTBackend

__all__ = ["TensorRTBackend"]
