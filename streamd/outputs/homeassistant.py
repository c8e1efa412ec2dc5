"""Home Assistant MQTT discovery: what each camera looks like to Home Assistant, and the
small state topics its entities read.

Per camera, one HA device with, per class, a binary sensor ``<class> present`` (ON/OFF) and a
sensor ``<class> count``, plus a sensor with the camera's state (from its health topic).
Configs go to ``<discovery_prefix>/<component>/<node_id>/<object_id>/config`` (retained), as
HA's MQTT discovery documents; every entity is unavailable while the daemon's availability
topic says ``offline``, and the class entities also while the camera is not streaming. States are published retained and only when they change, so HA shows
the right state at once after its own restart, and a busy camera costs nothing per frame.
Payloads are plain dicts built here by hand: no maintained Python library produces HA's
discovery schema without pulling in Home Assistant itself.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from .. import __version__

PAYLOAD_ON, PAYLOAD_OFF = "ON", "OFF"
AVAILABLE, NOT_AVAILABLE = "online", "offline"


def slug(text: str) -> str:
    """An id HA accepts in topics and object ids: ``[a-z0-9_-]``."""
    return re.sub(r"[^a-z0-9_-]+", "_", text.lower()).strip("_") or "x"


class Discovery:
    """Discovery configs and state changes for one daemon (``origin``)."""

    def __init__(self, topic_base: str, discovery_prefix: str, origin: str, classes: Iterable[str],
                 availability_topic: str, qos: int) -> None:
        self.topic_base = topic_base              # <topic_prefix>/<origin>
        self.discovery_prefix = discovery_prefix
        self.origin = origin
        self.node_id = slug(f"streamd_{origin}")
        # label as HA shows it -> its slug in topics and ids (labels are matched case-blind)
        self.classes = {c: slug(c) for c in dict.fromkeys(classes)}
        self._by_lower = {c.lower(): c for c in self.classes}
        self.availability_topic = availability_topic
        self.qos = qos
        self._states: dict[str, dict[str, int]] = {}     # camera -> class -> last published count

    def state_topic(self, camera: str, label: str, what: str) -> str:
        return f"{self.topic_base}/{camera}/{self.classes[label]}/{what}"

    def camera_configs(self, camera: str) -> list[tuple[str, dict[str, Any]]]:
        """(config topic, payload) for every entity of ``camera``."""
        cam = slug(camera)
        device = {"identifiers": [f"{self.node_id}_{cam}"], "name": f"{camera} ({self.origin})",
                  "manufacturer": "streamd", "model": "camera", "sw_version": __version__}
        daemon = {"topic": self.availability_topic, "payload_available": AVAILABLE,
                  "payload_not_available": NOT_AVAILABLE}
        # A count from a camera that is not streaming is no count: those entities are
        # unavailable until its (retained) health says streaming again.
        streaming = {"topic": f"{self.topic_base}/{camera}/health", "payload_available": AVAILABLE,
                     "payload_not_available": NOT_AVAILABLE,
                     "value_template": "{{ 'online' if value_json.state == 'streaming' else 'offline' }}"}
        common = {"device": device, "origin": {"name": "streamd", "sw_version": __version__}, "qos": self.qos}
        out: list[tuple[str, dict[str, Any]]] = []

        def add(component: str, object_id: str, payload: dict[str, Any], needs_stream: bool = True) -> None:
            unique_id = f"{self.node_id}_{object_id}"
            topic = f"{self.discovery_prefix}/{component}/{self.node_id}/{object_id}/config"
            availability: dict[str, Any] = {"availability": [daemon, streaming], "availability_mode": "all"} \
                if needs_stream else {"availability": [daemon]}
            out.append((topic, {**payload, "unique_id": unique_id, **availability, **common}))

        for label, cls in self.classes.items():
            add("binary_sensor", f"{cam}_{cls}_present", {
                "name": f"{label} present", "device_class": "occupancy",
                "state_topic": self.state_topic(camera, label, "present"),
                "payload_on": PAYLOAD_ON, "payload_off": PAYLOAD_OFF})
            add("sensor", f"{cam}_{cls}_count", {
                "name": f"{label} count", "state_topic": self.state_topic(camera, label, "count"),
                "state_class": "measurement", "icon": "mdi:counter"})
        add("sensor", f"{cam}_state", {
            "name": "state", "state_topic": f"{self.topic_base}/{camera}/health",
            "value_template": "{{ value_json.state }}", "icon": "mdi:cctv",
            "entity_category": "diagnostic"}, needs_stream=False)
        return out

    def state_changes(self, camera: str, body: dict[str, Any]) -> list[tuple[str, str]]:
        """(topic, payload) of each state that a detections message changed."""
        counts = dict.fromkeys(self.classes, 0)
        for det in body.get("detections", ()):
            label = self._by_lower.get(str(det.get("label", "")).lower())
            if label is not None:
                counts[label] += 1
        last = self._states.setdefault(camera, {})
        out: list[tuple[str, str]] = []
        for label, n in counts.items():
            before = last.get(label)
            if before == n:
                continue
            out.append((self.state_topic(camera, label, "count"), str(n)))
            if before is None or (before > 0) != (n > 0):
                out.append((self.state_topic(camera, label, "present"), PAYLOAD_ON if n else PAYLOAD_OFF))
            last[label] = n
        return out

    def forget_states(self) -> None:
        """After a reconnect the broker may have lost its retained states: send them anew."""
        self._states.clear()
