"""Backend registry: the model file's suffix picks the backend unless the config names one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ModelError
from .base import Backend, ModelInfo

# name -> "module:Class"; imported lazily so a box without TensorRT never imports it.
_REGISTRY: dict[str, tuple[str, tuple[str, ...]]] = {
    "onnxruntime": ("streamd.backends.onnxruntime:OnnxRuntimeBackend", (".onnx",)),
    "tensorrt": ("streamd.backends.tensorrt:TensorRTBackend", (".engine", ".plan")),
    # Optional (the `openvino` extra); reads the same .onnx files, so it is chosen by name or
    # by `backend: auto`'s measurement (choice.py), never by suffix alone.
    "openvino": ("streamd.backends.openvino:OpenVinoBackend", ()),
}


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def backend_name_for(path: Path, name: str | None = None) -> str:
    """The registered backend that would open ``path`` (nothing imported): lets ``streamd
    check`` refuse what the daemon would refuse, e.g. a PyTorch ``.pt`` file."""
    if name in (None, "auto"):
        suffix = path.suffix.lower()
        matches = [n for n, (_, sfx) in _REGISTRY.items() if suffix in sfx]
        if not matches:
            known = sorted({s for _, sfx in _REGISTRY.values() for s in sfx})
            hint = " (a PyTorch file: export it first with streamd-export)" if suffix == ".pt" else ""
            raise ModelError(f"{path}: no backend opens '{suffix or path.name}' files "
                             f"(known: {', '.join(known)}){hint}")
        name = matches[0]
    if name not in _REGISTRY:
        raise ModelError(f"unknown backend {name!r} (known: {', '.join(backend_names())})")
    return name


def backend_for(path: Path, name: str | None = None) -> type[Backend]:
    target = _REGISTRY[backend_name_for(path, name)][0]
    module_name, cls_name = target.split(":")
    import importlib
    module = importlib.import_module(module_name)
    return getattr(module, cls_name)


def check_model_file(path: Path) -> None:
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")


def open_backend(path: str | Path, name: str | None = None, **options: Any) -> Backend:
    """Load ``path`` with the backend its suffix (or ``name``) selects."""
    path = Path(path)
    check_model_file(path)
    return backend_for(path, name)(path, **options)


__all__ = ["Backend", "ModelInfo", "backend_for", "backend_name_for", "backend_names", "open_backend"]
