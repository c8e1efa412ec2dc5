"""What leaves the box: the one interface the output stage fans messages out through.

ZeroMQ PUB, MQTT and Redis Streams all receive the same :class:`Outbound` records. The body
is the protocol message (docs/PROTOCOL.md) before the transport adds its envelope (sequence
numbers, origin, topic spelling), so every transport carries the same fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol

Kind = Literal["detections", "health", "event", "stats", "result"]


@dataclass(frozen=True)
class Outbound:
    kind: Kind
    # The camera the message is about; for a request's result, the client id it answers.
    key: str
    body: dict[str, Any]
    # JPEG bytes sent beside the body (a detections snapshot, an event's best frame).
    attachment: bytes | None = None
    # Monotonic time after which a detections message is too old to be worth sending: each
    # transport judges it again just before sending, so the age bound holds end to end.
    deadline: float = math.inf


class Output(Protocol):
    """A transport. Implementations own their socket/connection in one thread of their own."""

    name: str

    def offer(self, msg: Outbound) -> None:
        """Queue ``msg`` and return at once: a full queue drops (and counts), never blocks."""

    def close(self, timeout_s: float = 2.0) -> None:
        """Send what is queued within ``timeout_s``, then release the connection."""

    def counters(self) -> dict[str, int]:
        """Monotonic counters for metrics, e.g. ``{"sent": n, "dropped": n, "stale": n}``."""
