"""MQTT output against a real Mosquitto: a real daemon's messages, Home Assistant discovery,
the last will on SIGKILL, a broker that goes away and comes back, credentials."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from streamd.config import HomeAssistantConfig, MqttOutputConfig, MqttTlsConfig
from streamd.outputs.base import Outbound
from tests.fixtures_brokers import make_tls_files, mosquitto_factory, mqtt_recorder  # noqa: F401 - fixtures
from tests.fixtures_daemon import free_tcp_port, wait_until
from tests.test_daemon import base_config
from tests.test_service_daemon import metric, metrics_text

pytest.importorskip("paho.mqtt.client", reason="paho-mqtt is not installed (pip install -e '.[test]')")
from streamd.outputs.mqtt import MqttOutput  # noqa: E402

ORIGIN = "edge-1"
BASE = f"streamd/{ORIGIN}"

# Home Assistant's MQTT discovery, as its docs and its schemas (homeassistant/components/mqtt/
# schemas.py, binary_sensor.py, sensor.py) define it: the topic shape, the keys each
# component knows, and what is required.
DISCOVERY_TOPIC = re.compile(r"^homeassistant/(?P<component>binary_sensor|sensor)/[a-zA-Z0-9_-]+/"
                             r"(?P<object_id>[a-zA-Z0-9_-]+)/config$")
COMMON_KEYS = {"availability", "availability_mode", "availability_template", "availability_topic", "device",
               "enabled_by_default", "encoding", "entity_category", "entity_picture", "expire_after",
               "force_update", "icon", "json_attributes_template", "json_attributes_topic", "name", "object_id",
               "default_entity_id", "origin", "payload_available", "payload_not_available", "qos", "state_topic",
               "unique_id", "value_template", "device_class"}
COMPONENT_KEYS = {"binary_sensor": COMMON_KEYS | {"off_delay", "payload_off", "payload_on"},
                  "sensor": COMMON_KEYS | {"last_reset_value_template", "state_class", "suggested_display_precision",
                                           "unit_of_measurement", "options"}}
DEVICE_KEYS = {"identifiers", "connections", "manufacturer", "model", "model_id", "name", "hw_version",
               "serial_number", "sw_version", "via_device", "suggested_area", "configuration_url"}
BINARY_SENSOR_CLASSES = {"motion", "occupancy", "presence", "moving", "problem", "running"}   # a subset HA knows


def check_discovery(topic: str, cfg: dict[str, Any]) -> str:
    """Fail with what HA would reject; returns the component."""
    m = DISCOVERY_TOPIC.match(topic)
    assert m, f"not a discovery topic HA reads: {topic}"
    component = m.group("component")
    unknown = set(cfg) - COMPONENT_KEYS[component]
    assert not unknown, f"{topic}: keys HA does not know: {unknown}"
    assert isinstance(cfg["state_topic"], str) and not set("+#") & set(cfg["state_topic"])
    assert isinstance(cfg["unique_id"], str) and cfg["unique_id"], "a device needs entities with a unique_id"
    dev = cfg["device"]
    assert not set(dev) - DEVICE_KEYS, f"unknown device keys {set(dev) - DEVICE_KEYS}"
    assert dev["identifiers"] and all(isinstance(i, str) for i in dev["identifiers"])
    assert isinstance(cfg["origin"]["name"], str)
    assert "availability_topic" not in cfg, "availability and availability_topic are exclusive"
    for a in cfg["availability"]:
        assert not set(a) - {"topic", "payload_available", "payload_not_available", "value_template"}
        assert a["topic"] and isinstance(a["payload_available"], str) and isinstance(a["payload_not_available"], str)
    assert cfg.get("availability_mode", "latest") in ("all", "any", "latest")
    assert cfg.get("qos", 0) in (0, 1, 2)
    if component == "binary_sensor":
        assert cfg["device_class"] in BINARY_SENSOR_CLASSES
        assert isinstance(cfg["payload_on"], str) and isinstance(cfg["payload_off"], str)
    else:
        assert cfg.get("state_class") in (None, "measurement", "total", "total_increasing")
    assert cfg.get("entity_category") in (None, "config", "diagnostic")
    return component


def render(template: str, payload: bytes) -> str:
    """A discovery template rendered as HA renders it: Jinja, with ``value`` and ``value_json``."""
    sandbox = pytest.importorskip("jinja2.sandbox", reason="jinja2 is not installed (pip install -e '.[test]')")
    env = sandbox.ImmutableSandboxedEnvironment()
    return env.from_string(template).render(value=payload.decode(), value_json=json.loads(payload)).strip()


def daemon_config(model: Path, video: Path, mqtt: dict[str, Any]) -> dict[str, Any]:
    cfg = base_config(model, [{"id": "bus", "url": str(video), "loop": True, "fps": 4}])
    cfg["publisher"]["name"] = ORIGIN
    cfg["outputs"] = {"mqtt": mqtt}
    return cfg


@pytest.mark.slow
def test_daemon_publishes_detections_health_stats_and_discovery_and_the_will_says_offline(
        fall_onnx_320: Path, test_media, daemon_factory, mosquitto_factory, mqtt_recorder) -> None:  # noqa: F811
    broker = mosquitto_factory()
    rec = mqtt_recorder(broker.port, ["streamd/#", "homeassistant/#"])
    d = daemon_factory(daemon_config(fall_onnx_320, test_media["bus"].mp4,
                                     {"port": broker.port, "qos": 1, "homeassistant": {"enabled": True}}))
    det = rec.wait_for(lambda m: m.topic == f"{BASE}/bus/detections" and bool(m.json()["detections"]), 90,
                       f"detections with boxes on MQTT\n{d.log()[-2000:]}").json()
    assert det["type"] == "detections" and det["camera"] == "bus" and det["origin"] == ORIGIN and det["v"] == 1
    assert (det["width"], det["height"]) == (640, 480)
    for box in det["detections"]:
        assert box["label"] in ("Normal", "Fall") and len(box["box"]) == 4 and 0 < box["confidence"] <= 1
    streaming = rec.wait_for(lambda m: m.topic == f"{BASE}/bus/health" and m.json()["state"] == "streaming", 30,
                             "a health message saying streaming")
    assert streaming.json()["type"] == "health" and streaming.json()["camera"] == "bus"
    stats = rec.wait_for(lambda m: m.topic == f"{BASE}/stats" and m.json()["outputs"]["mqtt"]["sent"] > 0, 30,
                         "a stats message counting MQTT sends").json()
    assert stats["outputs"]["mqtt"]["connected"] == 1
    assert [m.payload for m in rec.on(f"{BASE}/availability")] == [b"online"]

    configs = {m.topic: m.json() for m in rec.of(lambda m: m.topic.startswith("homeassistant/"))}
    components = sorted(check_discovery(t, c) for t, c in configs.items())
    # Per class (the model's Normal and Fall): a binary sensor and a count; plus the camera's state.
    assert components == ["binary_sensor"] * 2 + ["sensor"] * 3, sorted(configs)
    assert len({c["unique_id"] for c in configs.values()}) == len(configs)
    assert len({tuple(c["device"]["identifiers"]) for c in configs.values()}) == 1   # one device: the camera
    for topic, c in configs.items():
        assert c["availability"][0]["topic"] == f"{BASE}/availability"
        # Class entities are also unavailable while the camera is not streaming: its health
        # topic, read through a template the way HA renders it, gives the payloads listed.
        if "_state/" not in topic:
            cam = c["availability"][1]
            assert cam["topic"] == f"{BASE}/bus/health" and c["availability_mode"] == "all"
            assert render(cam["value_template"], streaming.payload) == cam["payload_available"]
            assert render(cam["value_template"], b'{"state": "lost"}') == cam["payload_not_available"]
        # Every state topic is one the daemon really publishes, with values the entity accepts.
        got = rec.wait_for(lambda m, t=c["state_topic"]: m.topic == t, 30, f"a state on {c['state_topic']}")
        value = render(c["value_template"], got.payload) if "value_template" in c else got.payload.decode()
        if "payload_on" in c:
            assert value in (c["payload_on"], c["payload_off"])
        elif "value_template" in c:
            assert value in ("starting", "connecting", "streaming")      # the camera's state
        else:
            assert int(value) >= 0
    normal = [int(m.payload) for m in rec.on(f"{BASE}/bus/normal/count")]
    assert max(normal) > 0 and b"ON" in [m.payload for m in rec.on(f"{BASE}/bus/normal/present")]

    d.kill()       # SIGKILL: no goodbye, the broker publishes the will
    rec.wait_for(lambda m: m.topic == f"{BASE}/availability" and m.payload == b"offline", 15, "the last will")
    late = mqtt_recorder(broker.port, [f"{BASE}/availability", "homeassistant/#"])
    retained = late.wait_for(lambda m: m.topic == f"{BASE}/availability", 10, "the retained availability")
    assert retained.retain and retained.payload == b"offline"
    late.wait_for(lambda m: m.retain and m.topic in configs, 10, "retained discovery configs")


@pytest.mark.slow
def test_broker_away_and_back_daemon_keeps_publishing_counts_drops_and_reconnects(
        fall_onnx_320: Path, test_media, daemon_factory, collector_factory, mosquitto_factory,  # noqa: F811
        mqtt_recorder) -> None:  # noqa: F811
    broker = mosquitto_factory()
    cfg = daemon_config(fall_onnx_320, test_media["bus"].mp4,
                        {"port": broker.port, "queue_size": 3, "backoff_initial_s": 0.2, "backoff_max_s": 1})
    cfg["metrics"] = {"port": free_tcp_port()}
    d = daemon_factory(cfg)
    zmq_sub = collector_factory(cfg["publisher"]["endpoint"])
    rec = mqtt_recorder(broker.port, ["streamd/#"])
    rec.wait_for(lambda m: m.topic == f"{BASE}/bus/detections", 90, f"detections on MQTT\n{d.log()[-2000:]}")

    broker.stop()
    away = len(zmq_sub.of("detections"))
    # While the broker is away the queue keeps the 3 newest; the rest are dropped and counted.
    zmq_sub.wait_for(lambda m: m["type"] == "stats" and m["outputs"]["mqtt"]["connected"] == 0
                     and m["outputs"]["mqtt"]["dropped"] > 0, 30, f"drops counted\n{d.log()[-2000:]}")
    assert len(zmq_sub.of("detections")) > away, "the ZeroMQ side must not wait for the broker"
    broker.start()
    back = mqtt_recorder(broker.port, ["streamd/#"])
    back.wait_for(lambda m: m.topic == f"{BASE}/bus/detections", 30, f"detections after the restart\n{d.log()[-2000:]}")
    # The restarted broker kept nothing: the output announced itself again.
    back.wait_for(lambda m: m.topic == f"{BASE}/availability" and m.payload == b"online", 10, "online again")
    zmq_sub.wait_for(lambda m: m["type"] == "stats" and m["outputs"]["mqtt"]["reconnects"] >= 1
                     and m["outputs"]["mqtt"]["connected"] == 1, 30, "the reconnect counted")
    assert d.proc.poll() is None
    assert "connection to mqtt://127.0.0.1" in d.log()
    text = metrics_text(cfg["metrics"]["port"])
    assert metric(text, "streamd_output_reconnects_total", output="mqtt") >= 1
    assert metric(text, "streamd_output_messages_dropped_total", output="mqtt") > 0
    assert metric(text, "streamd_output_messages_sent_total", output="mqtt") > 0
    assert metric(text, "streamd_output_connected", output="mqtt") == 1
    stopped_at = time.monotonic()
    assert d.stop() == 0
    # A clean stop says offline itself (a goodbye DISCONNECT means the broker sends no will).
    back.wait_for(lambda m: m.topic == f"{BASE}/availability" and m.payload == b"offline" and m.at > stopped_at,
                  10, "offline after the stop")


def detections(frame: int, labels: list[str], deadline: float = math.inf) -> Outbound:
    body = {"type": "detections", "camera": "door", "frame": frame,
            "detections": [{"class_id": 0, "label": lb, "confidence": 0.9, "box": [0, 0, 1, 1]} for lb in labels]}
    return Outbound("detections", "door", body, deadline=deadline)


def test_queue_keeps_the_newest_while_the_broker_is_away_with_credentials_never_logged(
        mosquitto_factory, mqtt_recorder, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    caplog.set_level(logging.DEBUG)
    broker = mosquitto_factory(password=("streamd", "s3cret-pw-41"), persistent=True)
    login = {"username": "streamd", "password": "s3cret-pw-41", "session": "test-recorder"}
    # A subscriber with a persistent session: whatever comes while it is not connected (QoS 1),
    # the broker keeps for it, so it cannot miss the first messages after the restart.
    mqtt_recorder(broker.port, ["streamd/#"], **login).close()
    broker.stop()
    (tmp_path / "pw").write_text("s3cret-pw-41\n")
    out = MqttOutput(MqttOutputConfig(port=broker.port, username="streamd", password_file=tmp_path / "pw", qos=1,
                                      queue_size=5, only_non_empty=True, backoff_initial_s=0.1, backoff_max_s=0.5,
                                      homeassistant=HomeAssistantConfig(enabled=True)), "box", ["person"])
    wrong = MqttOutput(MqttOutputConfig(port=broker.port, username="streamd", password="wrong-pw-77",
                                        backoff_initial_s=0.1, backoff_max_s=0.5), "box2", [])
    out.start()
    wrong.start()
    try:
        for i in range(20):
            out.offer(detections(i, ["person"]))      # the broker is not there: offer never waits
        assert out.counters()["dropped"] == 15 and out.counters()["queued"] == 5
        broker.start()
        wait_until(lambda: out.counters()["sent"] == 5, 15, what="the 5 queued messages to go out")
        rec = mqtt_recorder(broker.port, ["streamd/#"], **login)
        rec.wait_for(lambda m: m.topic == "streamd/box/door/detections" and m.json()["frame"] == 19, 10, "frame 19")
        frames = [m.json()["frame"] for m in rec.on("streamd/box/door/detections")]
        assert frames == [15, 16, 17, 18, 19], "the newest five, in order"
        out.offer(detections(20, []))                                   # empty: not published...
        out.offer(detections(21, ["person"], deadline=time.monotonic() - 1))   # too old: counted stale
        out.offer(detections(22, ["person", "person"]))
        rec.wait_for(lambda m: m.topic == "streamd/box/door/detections" and m.json()["frame"] == 22, 10, "frame 22")
        assert [m.json()["frame"] for m in rec.on("streamd/box/door/detections")][-1:] == [22]
        assert 20 not in [m.json()["frame"] for m in rec.on("streamd/box/door/detections")]
        # ...but the empty frame still set Home Assistant's state: count 0, then 2.
        counts = [m.payload for m in rec.on("streamd/box/door/person/count")]
        assert counts[-2:] == [b"0", b"2"], counts
        assert out.counters()["stale"] == 1
        assert wrong.counters()["connected"] == 0 and wrong.counters()["sent"] == 0
        wait_until(lambda: wrong.last_error and "Not authorized" in wrong.last_error, 10,
                   what="the refusal to be reported")
    finally:
        out.close(2)
        wrong.close(1)
    assert not out.is_alive() and not wrong.is_alive()
    assert "s3cret-pw-41" not in caplog.text and "wrong-pw-77" not in caplog.text
    assert "Not authorized" in caplog.text


def test_tls_connects_only_to_a_broker_whose_certificate_the_configured_ca_signed(
        mosquitto_factory, tmp_path: Path) -> None:  # noqa: F811
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (needed to make the test certificates)")
    broker = mosquitto_factory(tls=True)
    assert broker.tls_files is not None
    other_ca = make_tls_files(tmp_path)["ca"]      # a CA that did not sign the broker's certificate

    def output(ca: Path, name: str) -> MqttOutput:
        return MqttOutput(MqttOutputConfig(port=broker.port, client_id=name, tls=MqttTlsConfig(ca_file=ca),
                                           backoff_initial_s=0.1, backoff_max_s=0.5), name, [])
    good, bad = output(broker.tls_files["ca"], "good"), output(other_ca, "bad")
    good.start()
    bad.start()
    try:
        good.offer(detections(1, ["person"]))
        wait_until(lambda: good.counters()["sent"] == 1, 15, what="a message over TLS")
        wait_until(lambda: bad.last_error and "CERTIFICATE_VERIFY_FAILED" in bad.last_error, 15,
                   what="the unknown certificate to be refused")
        assert bad.counters()["connected"] == 0
    finally:
        good.close(2)
        bad.close(1)


def test_an_ended_objects_best_frame_does_not_replace_the_cameras_snapshot(
        mosquitto_factory, mqtt_recorder) -> None:  # noqa: F811
    broker = mosquitto_factory()
    out = MqttOutput(MqttOutputConfig(port=broker.port, snapshots=True), "box", [])
    out.start()
    try:
        rec = mqtt_recorder(broker.port, ["streamd/#"])
        wait_until(lambda: out.counters()["connected"] == 1, 10, what="the output to connect")
        out.offer(Outbound("detections", "door", detections(1, ["person"]).body, attachment=b"\xff\xd8frame"))
        out.offer(Outbound("event", "door", {"type": "event", "event": "end", "camera": "door", "track_id": 3},
                           attachment=b"\xff\xd8best"))
        rec.wait_for(lambda m: m.topic == "streamd/box/door/event/snapshot", 10, "the event's JPEG")
        assert [m.payload for m in rec.on("streamd/box/door/snapshot")] == [b"\xff\xd8frame"]
        assert [m.payload for m in rec.on("streamd/box/door/event/snapshot")] == [b"\xff\xd8best"]
        assert rec.on("streamd/box/door/event")[0].json()["track_id"] == 3
    finally:
        out.close(2)
