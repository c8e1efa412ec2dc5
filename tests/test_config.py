"""Every kind of bad config gets its own clear error naming the field and the line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from streamd.alert.rules import load_rules
from streamd.config import load_config, parse_config
from streamd.errors import ConfigError


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    p = tmp_path / "m.onnx"
    p.write_bytes(b"not inspected by the config loader")
    return p


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "streamd.yaml"
    p.write_text(text)
    return p


GOOD = """\
model:
  path: m.onnx
  conf: 0.3
  classes: [person, 1]
scheduler:
  max_batch: 4
cameras:
  - id: door
    url: rtsp://admin:${DOOR_PW}@127.0.0.1:8554/live
    fps: 5
  - id: yard.2
    url: rtsp://127.0.0.1:8554/yard
    username: viewer
    password: ${YARD_PW}
"""


def test_good_config_loads_and_expands_env(tmp_path: Path, model_file: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD), env={"DOOR_PW": "s3cret", "YARD_PW": "p@ss:w/rd"})
    assert cfg.model.path == model_file           # relative to the config file, not the cwd
    assert cfg.cameras[0].url == "rtsp://admin:s3cret@127.0.0.1:8554/live"
    assert cfg.cameras[0].safe_url == "rtsp://***@127.0.0.1:8554/live"
    # credentials given as fields are URL-encoded into the decoder's URL only
    assert cfg.cameras[1].open_url() == "rtsp://viewer:p%40ss%3Aw%2Frd@127.0.0.1:8554/yard"
    assert cfg.cameras[1].url == "rtsp://127.0.0.1:8554/yard"
    assert cfg.publisher.endpoint == "tcp://127.0.0.1:5555"
    assert cfg.cameras[0].queue_depth == 1 and cfg.cameras[0].transport == "tcp"


@pytest.mark.parametrize("text, field, line, words", [
    ("model:\n  path: m.onnx\n  colour: red\n", "model.colour", 3, "unknown key"),
    ("model:\n  path: m.onnx\nscheduler:\n  max_batch: many\n", "scheduler.max_batch", 4, "integer"),
    ("model:\n  path: m.onnx\n  conf: 1.5\n", "model.conf", 3, "less than 1"),
    ("model:\n  path: m.onnx\ncameras:\n  - id: a\n    url: rtsp://h/x\n  - id: a\n    url: rtsp://h/y\n",
     "cameras[1].id", 6, "duplicate camera id 'a'"),
    ("model:\n  path: missing.onnx\n", "model.path", 2, "model file not found"),
    ("model:\n  path: m.onnx\ncameras:\n  - id: a\n    url: ftp://h/x\n", "cameras[0].url", 5, "scheme 'ftp'"),
    ("model:\n  path: m.onnx\ncameras:\n  - id: 'bad id'\n    url: rtsp://h/x\n", "cameras[0].id", 4, "letters"),
    ("model:\n  path: m.onnx\ncameras:\n  - url: rtsp://h/x\n", "cameras[0].id", 4, "required"),
    ("cameras: []\n", "model", None, "required"),
    ("model:\n  path: m.onnx\ncameras:\n  - id: a\n    url: rtsp://u:${NOPE}@h/x\n", "cameras[0].url", 5,
     "environment variable NOPE is not set"),
    ("model:\n  path: m.onnx\n  path: n.onnx\n", "model.path", 3, "appears twice"),
    ("model:\n  path: m.onnx\ncameras:\n  - id: a\n    url: rtsp://h/x\n    fps: -3\n", "cameras[0].fps", 6,
     "greater than 0"),
    ("model:\n  path: m.onnx\ncameras:\n  - id: a\n    url: clip-that-is-not-there.mp4\n", "cameras[0].url", 5,
     "video file not found"),
    ("model:\n  path: m.onnx\ncameras:\n  - id: a\n    url: 192.0.2.11:554/stream1\n", "cameras[0].url", 5,
     "no scheme: write rtsp://192.0.2.11:554/stream1"),
    ("model:\n  path: m.onnx\ncameras:\n  - id: a\n    url: 192.0.2.11/h264\n", "cameras[0].url", 5,
     "no scheme"),
    ("model:\n  path: m.onnx\npublisher:\n  endpoint: 127.0.0.1:5555\n", "publisher.endpoint", 4, "tcp://"),
    ("model:\n  path: m.onnx\ncameras:\n  - id: a\n    url: usb:x\n", "cameras[0].url", 5, "usb:N"),
])
def test_each_bad_config_names_field_and_line(tmp_path: Path, model_file: Path, text: str, field: str,
                                              line: int | None, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    err = info.value
    assert words in str(err), str(err)
    assert field in str(err), str(err)
    assert err.field == field
    if line is not None:
        assert err.line == line, str(err)
        assert f"{path}:{line}" in str(err)


def test_yaml_syntax_error_gives_line(tmp_path: Path, model_file: Path) -> None:
    path = write(tmp_path, "model:\n  path: m.onnx\ncameras:\n  - id: a\n   url: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "invalid YAML" in str(info.value) and info.value.line is not None


def test_several_problems_are_all_reported(tmp_path: Path, model_file: Path) -> None:
    path = write(tmp_path, "model:\n  path: m.onnx\n  iou: 7\ncameras:\n  - id: a\n    url: rtsp://h/x\n    fsp: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "2 problems" in text and "model.iou" in text and "cameras[0].fsp" in text and ":7:" in text


def test_empty_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="empty"):
        load_config(write(tmp_path, ""))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        parse_config("- a\n- b\n")


def test_bad_value_error_never_echoes_a_password(tmp_path: Path, model_file: Path) -> None:
    canary = "Canary-Pw-93731"
    path = write(tmp_path, f"model:\n  path: m.onnx\ncameras:\n  - id: a\n    url: rtsp://u:{canary}@h:notaport/x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert canary not in str(info.value)
    assert "cameras[0].url" in str(info.value)


def test_check_command_prints_one_clear_line(tmp_path: Path, model_file: Path) -> None:
    bad = write(tmp_path, "model:\n  path: m.onnx\nscheduler:\n  max_wait_ms: soon\n")
    r = subprocess.run([sys.executable, "-m", "streamd.cli", "check", "-c", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("streamd: error:")
    assert f"{bad}:4: scheduler.max_wait_ms" in r.stderr
    assert "Traceback" not in r.stderr
    good = write(tmp_path, GOOD)
    r = subprocess.run([sys.executable, "-m", "streamd.cli", "check", "-c", str(good)], capture_output=True,
                       text=True, timeout=60, env={"DOOR_PW": "topsecret1", "YARD_PW": "x", "PATH": "/usr/bin"})
    assert r.returncode == 0, r.stderr
    assert "OK (2 cameras" in r.stdout and "topsecret1" not in r.stdout


def test_example_config_in_the_repo_is_valid() -> None:
    path = Path(__file__).resolve().parents[1] / "configs" / "example.yaml"
    cfg = load_config(path, env={"DOOR_PASSWORD": "pw1", "YARD_PASSWORD": "pw2"}, check_files=False)
    assert [c.id for c in cfg.cameras] == ["door", "yard", "replay", "desk"]
    assert cfg.model.path.name == "fall-yolov8s.onnx"
    assert cfg.cameras[3].kind == "usb"


def test_a_scheme_less_camera_address_with_credentials_is_named_without_them(tmp_path: Path,
                                                                            model_file: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  path: {model_file}\ncameras:\n  - id: a\n    url: viewer:hunter22@192.0.2.11/h264\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert "no scheme" in str(info.value) and "hunter22" not in str(info.value)


@pytest.mark.parametrize(("load", "what"), [(load_config, "config file"), (load_rules, "rules file")])
def test_config_and_rules_files_are_read_by_one_loader(tmp_path: Path, load: Any, what: str) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"{what} not found") as info:
        load(missing)
    assert info.value.source == str(missing)
    with pytest.raises(ConfigError, match=f"cannot read {what}") as info:
        load(tmp_path)                                   # a folder, not a file
    assert info.value.source == str(tmp_path)
