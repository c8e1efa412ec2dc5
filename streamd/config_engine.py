"""The ``model:`` keys of an engine built elsewhere without a manifest: ``trust_engine``, and the
class names it then needs from the config (``names``, or ``names_file`` with one per line).

A trusted engine's inputs and outputs are read from the engine when TensorRT loads it
(``streamd.backends.tensorrt.trusted``); what can be checked without TensorRT is checked
here, at load, with the field and line: the model is an engine, the names are given once,
and each is a real name.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config_loader import line_for
from .errors import ConfigError

if TYPE_CHECKING:
    from .config import ModelConfig

ENGINE_SUFFIXES = (".engine", ".plan")


def check_trust_engine(trust: bool, path: Path | None, backend: str | None) -> bool:
    """``model.trust_engine``: only for a TensorRT engine file."""
    if not trust:
        return trust
    if path is not None and path.suffix.lower() not in ENGINE_SUFFIXES:
        raise ValueError(f"model.path {path.name} is not a TensorRT engine (.engine, .plan): trust_engine "
                         f"loads an engine built elsewhere without a manifest; other models carry their "
                         f"classes and shapes in their manifest or metadata")
    if backend not in (None, "auto", "tensorrt"):
        raise ValueError(f"model.backend is {backend}; a trusted engine runs on tensorrt")
    return trust


def check_names(names: list[str] | None, trust: bool | None) -> list[str] | None:
    """``model.names``: only with ``trust_engine``, at least one, each a distinct non-blank name."""
    if names is None:
        return names
    if not trust:
        raise ValueError("class names are read only for a trusted engine (model.trust_engine: true); "
                         "an exported model carries its own in its manifest")
    return clean_names(names, "names")


def clean_names(names: list[str], where: str) -> list[str]:
    if not names:
        raise ValueError("lists no class names")
    out = [n.strip() for n in names]
    seen: dict[str, int] = {}
    for i, n in enumerate(out):
        if not n:
            raise ValueError(f"{where}[{i}] is blank")
        if n in seen:
            raise ValueError(f"{where}[{i}] {n!r} repeats {where}[{seen[n]}]")
        seen[n] = i
    return out


def read_names_file(path: Path) -> list[str]:
    """One class name per line, in class-id order; blank lines are skipped (the ``coco.names``
    form Darknet and TensorRT samples use)."""
    text = path.read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def resolve_names_file(model: "ModelConfig", source: str, base_dir: Path | None,
                       lines: dict[tuple[Any, ...], int], check_files: bool) -> "ModelConfig":
    """``model`` with ``names_file`` made absolute and (``check_files``) read into ``names``;
    a trusted engine without names, or names given twice, is a ConfigError naming the key."""
    def error(key: str, message: str) -> ConfigError:
        return ConfigError(message, source=source, field=f"model.{key}", line=line_for(("model", key), lines))

    nf = model.names_file
    if nf is None:
        if model.trust_engine and model.names is None:
            raise error("trust_engine", "a trusted engine takes its class names from the config: add "
                                        "model.names (a list, in class-id order) or model.names_file")
        return model
    if not model.trust_engine:
        raise error("names_file", "class names are read only for a trusted engine (model.trust_engine: true)")
    if model.names is not None:
        raise error("names_file", "give model.names or model.names_file, not both")
    if not nf.is_absolute() and base_dir is not None:
        nf = base_dir / nf
    update: dict[str, Any] = {"names_file": nf}
    if check_files:
        try:
            update["names"] = clean_names(read_names_file(nf), nf.name)
        except (OSError, UnicodeDecodeError) as exc:
            raise error("names_file", f"cannot read {nf} ({getattr(exc, 'strerror', None) or exc})") from None
        except ValueError as exc:
            raise error("names_file", f"{nf}: {exc}") from None
    return model.model_copy(update=update)
