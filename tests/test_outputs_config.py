"""The outputs: section: off by default, errors naming field and line, passwords kept secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamd.config import parse_config
from streamd.errors import ConfigError
from streamd.outputs.fanout import build_outputs
from streamd.redact import scrub

HEAD = "model:\n  path: m.onnx\n"


def parse(text: str, **kw) -> object:
    return parse_config(HEAD + text, source="s.yaml", check_files=False, **kw)


def error(text: str, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text, **kw)
    return info.value


def test_outputs_are_off_unless_their_block_is_there() -> None:
    cfg = parse("")
    assert cfg.outputs.mqtt is None and cfg.outputs.redis is None
    assert not build_outputs(cfg.outputs, "box", ["person"])
    cfg = parse("outputs:\n  mqtt:\n    host: broker.lan\n  redis: {}\n")
    assert cfg.outputs.mqtt.host == "broker.lan" and cfg.outputs.mqtt.homeassistant.enabled is False
    assert cfg.outputs.redis.maxlen == 100_000 and cfg.outputs.redis.kinds == ["detections", "event", "health"]


@pytest.mark.parametrize("text, where, what", [
    ("outputs:\n  mqtt:\n    qos: 3\n", "s.yaml:5: outputs.mqtt.qos", "0, 1 or 2"),
    ("outputs:\n  mqtt:\n    topic_prefix: a/+/b\n", "s.yaml:5: outputs.mqtt.topic_prefix", "separated by '/'"),
    ("outputs:\n  mqtt:\n    homeassistant:\n      enabeld: true\n", "s.yaml:6: outputs.mqtt.homeassistant.enabeld",
     "unknown key"),
    ("outputs:\n  redis:\n    url: http://cache:6379\n", "s.yaml:5: outputs.redis.url", "redis://"),
    ("outputs:\n  redis:\n    kinds: [detections, frames]\n", "s.yaml:5: outputs.redis.kinds[1]", "detections"),
    ("outputs:\n  mqtt:\n    password: a\n    password_file: b\n", "s.yaml:4: outputs.mqtt", "not both"),
])
def test_errors_name_the_field_and_the_line(text: str, where: str, what: str) -> None:
    msg = str(error(text))
    assert msg.startswith(where) and what in msg, msg


def test_passwords_stay_out_of_reprs_errors_and_logs(tmp_path: Path) -> None:
    cfg = parse("outputs:\n  mqtt:\n    username: cam\n    password: ${MQTT_PW}\n", env={"MQTT_PW": "mq-s3cret-1"})
    assert "mq-s3cret-1" not in repr(cfg) and cfg.outputs.mqtt.read_password() == "mq-s3cret-1"
    assert scrub("connect failed: mq-s3cret-1") == "connect failed: ***"
    cfg = parse("outputs:\n  redis:\n    url: redis://:rd-s3cret-2@cache:6379/0\n")
    assert scrub(f"cannot reach {cfg.outputs.redis.url}") == "cannot reach redis://***@cache:6379/0"
    msg = str(error("outputs:\n  redis:\n    url: http://:rd-s3cret-3@cache\n"))
    assert "rd-s3cret-3" not in msg


def test_a_password_file_is_read_relative_to_the_config_and_a_missing_one_is_named(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"x")
    (tmp_path / "mqtt.pw").write_text("pw-from-file-9\n")
    cfg = parse_config(HEAD + "outputs:\n  mqtt:\n    password_file: mqtt.pw\n", source="s.yaml", base_dir=tmp_path)
    assert cfg.outputs.mqtt.password_file == tmp_path / "mqtt.pw"
    assert cfg.outputs.mqtt.read_password() == "pw-from-file-9"
    assert scrub("pw-from-file-9") == "***"
    with pytest.raises(ConfigError) as info:
        parse_config(HEAD + "outputs:\n  mqtt:\n    tls:\n      ca_file: ca.crt\n", source="s.yaml", base_dir=tmp_path)
    assert str(info.value).startswith("s.yaml:6: outputs.mqtt.tls.ca_file: file not found")


def test_home_assistant_classes_must_be_the_models() -> None:
    pytest.importorskip("paho.mqtt.client")
    cfg = parse("outputs:\n  mqtt:\n    homeassistant:\n      enabled: true\n      classes: [person, cat]\n")
    with pytest.raises(ConfigError) as info:
        build_outputs(cfg.outputs, "box", ["person", "car"])
    assert "outputs.mqtt.homeassistant.classes[1]" in str(info.value) and "'cat'" in str(info.value)


def test_the_example_configs_commented_outputs_block_is_valid_once_uncommented() -> None:
    text = (Path(__file__).resolve().parents[1] / "configs" / "example.yaml").read_text()
    block = text[text.index("# outputs:"):text.index("\nlog:")]
    uncommented = "\n".join(line[2:] for line in block.splitlines())
    cfg = parse(uncommented, env={"MQTT_PASSWORD": "x"})
    assert cfg.outputs.mqtt is not None and cfg.outputs.redis is not None
    assert cfg.outputs.mqtt.homeassistant.discovery_prefix == "homeassistant"
