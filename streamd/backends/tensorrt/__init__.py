"""TensorRT backend: the engine runtime (``runtime``) and its decisions as plain functions
(``logic``), tested without a GPU. Importing it imports neither tensorrt nor pycuda.
"""

from .runtime import TensorRTBackend

__all__ = ["TensorRTBackend"]
