"""YAML files into strict pydantic models, with errors that name the field and the line.

The daemon's config and the alert rules load through the same functions, so both report
``file.yaml:14: cameras[1].fps: ...`` for a wrong key, type or value, and expand ``${ENV}``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from .errors import ConfigError

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$\$")


class StrictModel(BaseModel):
    """Unknown keys are errors and loaded values are immutable."""
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- YAML with line numbers ----------------------------------------------------------------

def _node_to_python(node: yaml.Node, path: tuple[Any, ...], lines: dict[tuple[Any, ...], int],
                    source: str) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = yaml.safe_load(yaml.serialize(key_node)) if not isinstance(key_node, yaml.ScalarNode) \
                else key_node.value
            if key in out:
                raise ConfigError(f"key '{key}' appears twice", source=source,
                                  field=dotted(path + (key,)), line=key_node.start_mark.line + 1)
            out[key] = _node_to_python(value_node, path + (key,), lines, source)
            lines[path + (key,)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_node_to_python(n, path + (i,), lines, source) for i, n in enumerate(node.value)]
    # Scalars: let the safe constructor give them their YAML type (int, float, bool, null).
    return yaml.SafeLoader.construct_object(_ScalarLoader(), node)  # type: ignore[arg-type]


class _ScalarLoader(yaml.SafeLoader):
    def __init__(self) -> None:  # no stream: only used to construct single scalar nodes
        yaml.SafeLoader.__init__(self, "")


def dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def one_or_none(model: BaseModel, a: str, b: str) -> None:
    """Two ways of giving the same thing (a secret inline or from a file): at most one."""
    if getattr(model, a) is not None and getattr(model, b) is not None:
        raise ValueError(f"give {a} or {b}, not both")


def read_secret(inline: SecretStr | None, path: Path | None, name: str) -> str | None:
    """A credential given inline (``SecretStr``) or as a file's first line (``{name}_file``)."""
    if path is None:
        return inline.get_secret_value() if inline is not None else None
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read {name}_file {path} ({exc.strerror})") from None
    return lines[0].strip() if lines else ""


def line_for(path: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> int | None:
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return lines.get(())


def _expand_env(value: Any, path: tuple[Any, ...], lines: dict[tuple[Any, ...], int], source: str,
                env: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, path + (k,), lines, source, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, path + (i,), lines, source, env) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        if name not in env:
            raise ConfigError(f"environment variable {name} is not set", source=source,
                              field=dotted(path), line=line_for(path, lines))
        return env[name]

    return _ENV_REF.sub(sub, value)


def validation_error(exc: ValidationError, lines: dict[tuple[Any, ...], int], source: str,
                      field_name: Callable[[tuple[Any, ...]], str] = dotted) -> ConfigError:
    problems = []
    first: tuple[str, int | None] | None = None
    for err in exc.errors():
        loc = tuple(err["loc"])
        # pydantic puts union member names in loc ("int", "str"): drop them from the path.
        loc = tuple(p for p in loc if not (isinstance(p, str) and p in ("int", "str", "float", "bool")
                                            and p not in ("id",)))
        field = field_name(loc)
        line = line_for(loc, lines)
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling and indentation)"
        elif err["type"] == "missing":
            msg = "is required"
        else:
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            if "input" in err and not isinstance(err["input"], (dict, list)) and "url" not in loc \
                    and "password" not in loc and "username" not in loc:
                msg += f" (got {err['input']!r})"
        problems.append(f"{source}:{line}: {field}: {msg}" if line else f"{source}: {field}: {msg}")
        if first is None:
            first = (field, line)
    head = problems[0] if len(problems) == 1 else f"{len(problems)} problems:\n  " + "\n  ".join(problems)
    err_obj = ConfigError(head)
    err_obj.source, err_obj.field, err_obj.line = source, first[0] if first else None, first[1] if first else None
    return err_obj


# ---- the same loading for other YAML files (alert rules, ...) -----------------------------

ModelT = TypeVar("ModelT", bound=BaseModel)


def load_yaml(text: str, source: str = "<config>", env: dict[str, str] | None = None,
              expected: str = "a mapping at the top level") -> tuple[dict[str, Any], dict[tuple[Any, ...], int]]:
    """YAML text -> (data with ``${ENV}`` expanded, 1-based line of every value's path).

    Raises ``ConfigError`` with the line for invalid YAML, duplicate keys, an empty file,
    a top level that is not a mapping (``expected`` says what it should be) and unset
    environment variables."""
    env = dict(os.environ) if env is None else env
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise ConfigError(f"invalid YAML ({exc.problem or exc.context})", source=source,
                          line=mark.line + 1 if mark else None) from None
    if root is None:
        raise ConfigError("the file is empty", source=source)
    lines: dict[tuple[Any, ...], int] = {}
    data = _node_to_python(root, (), lines, source)
    if not isinstance(data, dict):
        raise ConfigError(f"expected {expected}", source=source, line=1)
    return _expand_env(data, (), lines, source, env), lines


def validate_model(model: type[ModelT], data: Any, lines: dict[tuple[Any, ...], int], source: str,
                   field_name: Callable[[tuple[Any, ...]], str] = dotted) -> ModelT:
    """``model.model_validate(data)`` with every problem reported as ``source:line: field: ...``.

    ``field_name`` turns a pydantic location into the name shown (default: ``a.b[2].c``),
    e.g. to add a list item's own name to its index."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, lines, source, field_name) from None


def parse_model(model: type[ModelT], text: str, source: str = "<config>", env: dict[str, str] | None = None,
                field_name: Callable[[tuple[Any, ...]], str] = dotted,
                expected: str = "a mapping at the top level") -> tuple[ModelT, dict[tuple[Any, ...], int]]:
    """Load any pydantic model from YAML text with line-numbered errors; also returns the
    line table so callers can point their own checks at a line."""
    data, lines = load_yaml(text, source, env, expected)
    return validate_model(model, data, lines, source, field_name), lines


LoadedT = TypeVar("LoadedT")


def load_file(path: str | os.PathLike[str], parse: Callable[..., LoadedT], what: str, **options: Any) -> LoadedT:
    """Read the YAML file at ``path`` and hand its text to ``parse`` (``parse_config``,
    ``parse_rules``) with the file as ``source`` and its folder as ``base_dir``, so relative
    paths in it do not depend on the working directory. ``what`` names the file in errors
    ("config file not found"); ``options`` go to ``parse`` as they are."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{what} not found", source=str(p)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} ({exc})", source=str(p)) from None
    return parse(text, source=str(p), base_dir=p.resolve().parent, **options)
