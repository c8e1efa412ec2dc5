"""TensorRT backend, one module per concern:

- ``runtime``: deserialising a plan and running it (the backend the registry names);
- ``build``: building a plan from an ONNX (export tool, ``model.rebuild_engine``, doctor);
- ``probe``: what is installed: TensorRT, pycuda, the CUDA driver, the GPU;
- ``logic`` and ``profiles``: the decisions as plain functions, tested without a GPU.

Importing any of them imports neither tensorrt nor pycuda.
"""

from .runtime import TensorRTBackend

__all__ = ["TensorRTBackend"]
