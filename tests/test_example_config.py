"""configs/example.yaml shows every key of the schema in streamd/config.py, so it cannot drift:
a field added to the schema without a line in the example fails here."""

from __future__ import annotations

import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any, Iterator

import yaml
from pydantic import BaseModel

from streamd.config import Config, parse_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "configs" / "example.yaml"
ENV = {"DOOR_PASSWORD": "pw-door", "YARD_PASSWORD": "pw-yard", "MQTT_PASSWORD": "pw-mqtt",
       "HTTP_TOKEN": "an-http-token-of-some-length"}
# Keys the schema accepts but the example leaves out on purpose, each with its reason.
NOT_SHOWN = {"scheduler.pipeline_depth": "no longer used",
             # one of the two per output: the example shows each on a different output
             "outputs.mqtt.password_file": "instead of password",
             "outputs.redis.password": "instead of password_file",
             "requests.redis.password": "instead of password_file",

             "http.token_file": "instead of token",
             # only with trust_engine: true, which needs a .engine model (the example's is .onnx)
             "model.names": "a trusted engine's class names",
             "model.names_file": "a trusted engine's class names",
             # metrics: is the older spelling of http: (a file may not have both)
             **{k: "older spelling" for k in ("metrics", "metrics.enabled", "metrics.host", "metrics.port")}}
# A commented-out key is "# " followed by the YAML line as it would be written: a key at the
# start (prose in comments never starts with "word:").
_COMMENTED_KEY = re.compile(r"^(\s*)# (\s*(?:- )?[a-z_]+:(?: |$).*)$")


def models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    """The pydantic models inside a field's type: X, X | None, list[X]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from models_in(arg)


def schema_keys(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Every key path of the schema (``cameras[].fps``) with its field info."""
    keys: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        keys[path] = info
        is_list = typing.get_origin(info.annotation) is list
        for sub in models_in(info.annotation):
            keys.update(schema_keys(sub, f"{path}[]." if is_list else f"{path}."))
    return keys


def uncommented(text: str) -> str:
    """The example with its commented-out keys switched on."""
    return "\n".join(m.group(1) + m.group(2) if (m := _COMMENTED_KEY.match(line)) else line
                     for line in text.splitlines()) + "\n"


def example_keys(node: Any, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    if isinstance(node, dict):
        for k, v in node.items():
            keys.add(f"{prefix}{k}")
            keys |= example_keys(v, f"{prefix}{k}.")
    elif isinstance(node, list):
        for item in node:
            keys |= example_keys(item, f"{prefix[:-1]}[].")
    return keys


def test_the_schema_walk_finds_nested_and_listed_keys() -> None:
    keys = schema_keys(Config)
    # the walk itself must reach optional sub-models and list items, or the check below is empty
    assert {"publisher.curve.server_secret_key", "cameras[].snapshot_quality", "log.level",
            "requests.share", "sources.decoder_threads"} <= set(keys)


def test_every_schema_key_is_in_the_example() -> None:
    shown = example_keys(yaml.safe_load(uncommented(EXAMPLE.read_text())))
    missing = sorted(set(schema_keys(Config)) - shown - set(NOT_SHOWN))
    # A camera's tracking: takes any key of the top-level tracking: (shown there, once).
    missing = [k for k in missing if not (k.startswith("cameras[].tracking.") and k[len("cameras[]."):] in shown)]
    assert not missing, f"configs/example.yaml does not show: {', '.join(missing)}"
    for key, why in NOT_SHOWN.items():
        description = schema_keys(Config)[key].description or ""
        assert why in description, f"{key} is left out of the example as '{why}', but its description says " \
                                   f"'{description}'"


def test_every_choice_of_a_key_is_named_in_the_example() -> None:
    lines = EXAMPLE.read_text().splitlines()
    for key, info in schema_keys(Config).items():
        choices = [a for arg in [info.annotation, *typing.get_args(info.annotation)]
                   if typing.get_origin(arg) is typing.Literal for a in typing.get_args(arg)]
        if len(choices) < 2:
            continue
        name = key.rsplit(".", 1)[-1]
        on_its_line = [line for line in lines if re.match(rf"^\s*(#\s*)?(- )?{name}:", line)]
        assert any(all(str(c) in line for c in choices) for line in on_its_line), \
            f"configs/example.yaml: the line of {key} should name every choice ({' | '.join(map(str, choices))})"


def test_the_commented_out_keys_are_valid_too() -> None:
    # the same strict validation as the real file: a wrong key or value in a comment fails here
    cfg = parse_config(uncommented(EXAMPLE.read_text()), str(EXAMPLE), EXAMPLE.parent, env=ENV, check_files=False)
    assert cfg.publisher.curve is not None and cfg.publisher.name == "edge-01"
    assert cfg.model.classes == ["person", "car"]


def test_streamd_check_accepts_the_example(tmp_path: Path) -> None:
    # `streamd check` opens the model file the README's export makes; a fresh clone has none,
    # so the example is checked as a copy beside a stand-in of that file (check doesn't load it).
    (tmp_path / "configs").mkdir()
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "fall-yolov8s.onnx").write_bytes(b"stand-in")
    copy = tmp_path / "configs" / "example.yaml"
    copy.write_text(EXAMPLE.read_text())
    r = subprocess.run([sys.executable, "-m", "streamd.cli", "check", "-c", str(copy)],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **ENV})
    assert r.returncode == 0, r.stderr
    assert "OK (4 cameras" in r.stdout
    assert ENV["DOOR_PASSWORD"] not in r.stdout + r.stderr and ENV["YARD_PASSWORD"] not in r.stdout + r.stderr
