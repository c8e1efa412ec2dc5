"""The wire format on the PUB socket (version 1), shared by the publisher and subscribers.

Every message is a ZeroMQ multipart message ``[topic, body]``:
- ``topic`` (ASCII) starts with ``cam/<camera_id>/`` for camera messages, so a SUB socket
  subscribed to ``cam/door/`` gets exactly camera ``door``'s messages (ids cannot hold
  ``/``, so ``cam/door/`` never matches ``cam/door2/``); daemon-wide messages use ``sys/``.
- ``body`` is UTF-8 JSON. Full description: docs/PROTOCOL.md.
"""

from __future__ import annotations

import json
from typing import Any

PROTOCOL_VERSION = 1
# Additions within version 1 (readers ignore fields they don't know): 1 = track ids on
# detections and the cam/<id>/event message.
PROTOCOL_MINOR = 1

TYPE_DETECTIONS = "detections"
TYPE_HEALTH = "health"
TYPE_HEARTBEAT = "heartbeat"
TYPE_STATS = "stats"
TYPE_EVENT = "event"

TOPIC_HEARTBEAT = b"sys/heartbeat"
TOPIC_STATS = b"sys/stats"
SYSTEM_PREFIX = b"sys/"


def camera_prefix(camera_id: str) -> bytes:
    return f"cam/{camera_id}/".encode()


def detections_topic(camera_id: str) -> bytes:
    return camera_prefix(camera_id) + b"det"


def health_topic(camera_id: str) -> bytes:
    return camera_prefix(camera_id) + b"health"


def event_topic(camera_id: str) -> bytes:
    return camera_prefix(camera_id) + b"event"


def encode(topic: bytes, body: dict[str, Any]) -> list[bytes]:
    return [topic, json.dumps(body, separators=(",", ":"), allow_nan=False).encode()]


class ProtocolError(ValueError):
    pass


def decode(parts: list[bytes]) -> tuple[str, dict[str, Any]]:
    """Parse one multipart message; raise ProtocolError on anything malformed.

    A snapshot (third part) is returned in the body under ``_snapshot`` as bytes."""
    if len(parts) < 2:
        raise ProtocolError(f"expected at least 2 parts, got {len(parts)}")
    try:
        topic = parts[0].decode("ascii")
        body = json.loads(parts[1])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"undecodable message ({exc})") from None
    if not isinstance(body, dict) or "v" not in body or "type" not in body:
        raise ProtocolError("body lacks 'v' or 'type'")
    if body["v"] != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {body['v']} (this reader knows {PROTOCOL_VERSION})")
    snap = body.get("snapshot")
    if isinstance(snap, dict):
        idx = snap.get("part", 2)
        if not isinstance(idx, int) or idx >= len(parts):
            raise ProtocolError("snapshot announced but its message part is missing")
        body["_snapshot"] = parts[idx]
    return topic, body
