"""MQTT output (paho-mqtt 2.x): detections, events, health and stats on
``<topic_prefix>/<origin>/<camera>/<kind>``, availability with a last will, optional Home
Assistant discovery.

One thread owns the paho client and drives its network loop itself (``Client.loop``), so
every paho call happens in that thread; reconnecting with capped backoff is the base
class's. The pipeline only ever appends to the bounded queue (:meth:`offer`).
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from ..config import MqttOutputConfig
from .base import Outbound
from .homeassistant import AVAILABLE, NOT_AVAILABLE, Discovery
from .worker import ConnectionLost, QueuedOutput

log = logging.getLogger("streamd.outputs.mqtt")

CONNACK_TIMEOUT_S = 10.0
# Publishes handed to paho but not yet confirmed (written for QoS 0, acknowledged for 1/2):
# beyond this the rest waits in our own queue, where the bound and the drop count apply.
MAX_PENDING = 200
CAMERA_KINDS = {"detections": "detections", "event": "event", "health": "health"}


class MqttOutput(QueuedOutput):
    def __init__(self, cfg: MqttOutputConfig, origin: str, class_names: list[str]) -> None:
        super().__init__("mqtt", origin, cfg.queue_size, cfg.backoff_initial_s, cfg.backoff_max_s)
        self.cfg = cfg
        self.base = f"{cfg.topic_prefix}/{origin}"
        self.availability_topic = f"{self.base}/availability"
        self.discovery = Discovery(self.base, cfg.homeassistant.discovery_prefix, origin, class_names,
                                   self.availability_topic, cfg.qos) if cfg.homeassistant.enabled else None
        self._pending: dict[int, int] = {}        # mid -> QoS of queue messages paho has not confirmed
        self._cameras: dict[str, None] = {}       # cameras seen; discovery is sent for each per connection
        self._announced: set[str] = set()
        self._connack: mqtt.ReasonCode | None = None
        self._link_down = False
        self._goodbye: mqtt.MQTTMessageInfo | None = None
        self._client = self._make_client(cfg.read_password())

    def _make_client(self, password: str | None) -> mqtt.Client:
        cfg = self.cfg
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cfg.client_id or f"streamd-{self.origin}",
                             protocol=mqtt.MQTTv311, clean_session=True)
        if cfg.username is not None or password is not None:
            client.username_pw_set(cfg.username, password)
        if cfg.tls is not None:
            client.tls_set(ca_certs=str(cfg.tls.ca_file) if cfg.tls.ca_file else None,
                           certfile=str(cfg.tls.cert_file) if cfg.tls.cert_file else None,
                           keyfile=str(cfg.tls.key_file) if cfg.tls.key_file else None,
                           cert_reqs=ssl.CERT_REQUIRED)
            client.tls_insecure_set(cfg.tls.insecure)
        # The broker publishes this (retained) when the connection dies without a goodbye:
        # a SIGKILLed daemon or a cut network reads as offline within 1.5 keepalives.
        client.will_set(self.availability_topic, NOT_AVAILABLE, qos=1, retain=True)
        client.connect_timeout = CONNACK_TIMEOUT_S
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_publish = self._on_publish
        client.on_disconnect = self._on_disconnect
        return client

    # ---- paho callbacks (run inside Client.loop, i.e. in this thread) --------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: mqtt.ReasonCode,
                    properties: Any) -> None:
        self._connack = reason

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        if self._pending.pop(mid, None) is not None:
            self.sent += 1

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self._link_down = True

    # ---- QueuedOutput -------------------------------------------------------------------------
    def wants(self, msg: Outbound) -> bool:
        return msg.kind != "result"     # request results answer their own client, not a broker

    def _where(self) -> str:
        return f"mqtt{'s' if self.cfg.tls else ''}://{self.cfg.host}:{self.cfg.port}"

    def _open(self) -> None:
        self._connack, self._link_down = None, False
        self._client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        deadline = time.monotonic() + CONNACK_TIMEOUT_S
        while self._connack is None:
            rc = self._client.loop(0.1)
            if rc != mqtt.MQTT_ERR_SUCCESS and self._connack is None:
                raise ConnectionError(mqtt.error_string(rc))
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer to CONNECT within {CONNACK_TIMEOUT_S:.0f}s")
            if self.stop_event.is_set():
                raise ConnectionError("stopping before the broker answered")
        if self._connack.is_failure:     # e.g. "Not authorized": the broker's own words
            raise ConnectionRefusedError(f"the broker refused the connection: {self._connack}")
        self._client.publish(self.availability_topic, AVAILABLE, qos=1, retain=True)
        self._announced.clear()
        if self.discovery is not None:
            self.discovery.forget_states()
            for camera in self._cameras:
                self._announce(camera)

    def _serve(self) -> None:
        while not self.draining_done():
            room = MAX_PENDING - len(self._pending)
            batch = self.take(room) if room > 0 else []
            for i, msg in enumerate(batch):
                if not self._publish(msg):
                    self.put_back(batch[i:])
                    break
            # Short waits: the queue is fed from other threads, which cannot wake paho's select.
            rc = self._client.loop(0.0 if batch else 0.05)
            if rc != mqtt.MQTT_ERR_SUCCESS or self._link_down:
                raise ConnectionLost(mqtt.error_string(rc) if rc != mqtt.MQTT_ERR_SUCCESS else "disconnected")

    def _release(self, clean: bool) -> None:
        if clean:
            # A goodbye: availability offline (the will is not sent after a DISCONNECT), then
            # wait for what is still unconfirmed, within the close deadline.
            info = self._client.publish(self.availability_topic, NOT_AVAILABLE, qos=1, retain=True)
            deadline = min(self._close_deadline, time.monotonic() + 5.0)
            while (self._pending or not info.is_published()) and time.monotonic() < deadline and \
                    not self._link_down:
                self._client.loop(0.05)
            self._client.disconnect()
            self._client.loop(0.05)
        else:
            self._client.disconnect()
        # QoS 0 publishes not yet written when a link dies are gone; QoS 1/2 ones paho keeps
        # and sends again after the reconnect.
        lost = [mid for mid, qos in self._pending.items() if qos == 0 or clean]
        for mid in lost:
            del self._pending[mid]
        self.dropped += len(lost)

    # ---- publishing ---------------------------------------------------------------------------
    def _topic(self, msg: Outbound) -> str:
        if msg.kind in CAMERA_KINDS:
            return f"{self.base}/{msg.key}/{CAMERA_KINDS[msg.kind]}"
        return f"{self.base}/{msg.kind}"

    def _announce(self, camera: str) -> None:
        if self.discovery is None or camera in self._announced:
            return
        for topic, payload in self.discovery.camera_configs(camera):
            self._client.publish(topic, json.dumps(payload), qos=1, retain=True)
        self._announced.add(camera)

    def _publish(self, msg: Outbound) -> bool:
        """Hand ``msg`` to paho; False when paho no longer has a connection to take it."""
        cfg = self.cfg
        if msg.kind in CAMERA_KINDS:
            self._cameras.setdefault(msg.key)
            self._announce(msg.key)
        if msg.kind == "detections":
            if self.discovery is not None:
                for topic, payload in self.discovery.state_changes(msg.key, msg.body):
                    self._client.publish(topic, payload, qos=cfg.qos, retain=True)
            if cfg.only_non_empty and not msg.body.get("detections"):
                return True
        # Last known health and stats are what a late subscriber wants: always retained.
        retain = cfg.retain if msg.kind in ("detections", "event") else True
        payload = self.encode(msg)
        if payload is None:
            return True
        info = self._client.publish(self._topic(msg), payload, qos=cfg.qos, retain=retain)
        if info.rc == mqtt.MQTT_ERR_NO_CONN and cfg.qos == 0:
            return False
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            self.dropped += 1
            log.debug("mqtt publish of %s refused: %s", msg.kind, mqtt.error_string(info.rc))
            return True
        if info.is_published():     # written already, inside publish(): on_publish found no mid
            self.sent += 1
        else:
            self._pending[info.mid] = cfg.qos
        if msg.attachment is not None and cfg.snapshots and msg.kind in CAMERA_KINDS:
            # An ended object's best frame is not the camera's latest picture: a topic of its own.
            where = "event/snapshot" if msg.kind == "event" else "snapshot"
            self._client.publish(f"{self.base}/{msg.key}/{where}", msg.attachment, qos=cfg.qos, retain=True)
        return True
