"""Turn the daemon's messages into alerts and notices: pure logic, no sockets, no threads.

Feed it decoded messages (``feed``) and let time pass (``tick``); both return the events
that became due. Everything about a rule is measured on the messages' own clock
(``capture_ts``), so a recorded stream replays to the same alerts; only silence needs the
local clock, since it is exactly the absence of messages.

Rule semantics, per (rule, daemon, camera) - a relay may merge daemons whose camera ids
collide, so a camera is known by its daemon's ``origin`` as well:

* A detections message *matches* when at least ``min_count`` of its detections pass the
  class, confidence and zone filters.
* Consecutive matching messages of that camera form a streak; a message that does not
  match ends it. "Consecutive" means consecutive detection messages: a frame the daemon
  dropped to stay fresh was never looked at, so it neither breaks nor extends a streak.
  A camera leaving ``streaming`` ends that camera's streaks, and a daemon restart those of
  all its cameras, since nothing was seen in between.
* The rule fires once the streak is ``min_frames`` messages long and spans
  ``min_duration_s`` (first to current capture time). It fires again, while the streak goes
  on, each time ``cooldown_s`` has passed since it last fired; a new streak inside the
  cooldown does not fire either.

Rules with another ``trigger`` follow tracked objects one by one (``alert/objects.py``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from .. import protocol
from ..client.subscriber import GapTracker
from .objects import TIME_EPS, CompiledRule, ObjectRules
from .rules import AlertConfig, Rule

log = logging.getLogger("streamd.alert")



@dataclass
class Event:
    """One alert or notice. ``data`` is what the sinks get (JSON-ready); for alerts ``body``
    is the detections message that fired and ``matches`` its matching detections, kept
    for drawing the snapshot."""

    data: dict[str, Any]
    rule: Rule | None = None
    body: dict[str, Any] | None = None
    matches: list[dict[str, Any]] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return str(self.data["event"])


@dataclass
class _Streak:
    start_ts: float | None = None
    frames: int = 0
    last_fire_ts: float | None = None

    def reset(self) -> None:
        self.start_ts, self.frames = None, 0


def iso_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class _Daemon:
    """What one daemon (one ``origin``) last did, for silence and restart notices."""

    pub: str
    last_message: float                        # monotonic
    last_message_wall: float
    pubs: set[str] = field(default_factory=set)
    silent: bool = False


def origin_of(body: dict[str, Any]) -> str:
    """Which daemon sent this: ``origin`` (its ``publisher.name`` or host), else ``host``; ""
    for publishers that send neither."""
    return str(body.get("origin") or body.get("host") or "")


class AlertEngine:
    """Stateful rule evaluation over one subscriber's message stream.

    The stream may merge several daemons (``streamd relay``); they are told apart by
    ``origin``, so silence, restarts, dwell and camera health are tracked per daemon."""

    def __init__(self, cfg: AlertConfig, now: float | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self._clock, self._wall = clock, wall
        compiled = [CompiledRule(r) for r in cfg.rules if r.enabled]
        self._rules = [cr for cr in compiled if not cr.rule.per_object]
        self._objects = ObjectRules([cr for cr in compiled if cr.rule.per_object], self._object_alert)
        self._streaks: dict[tuple[str, str, str], _Streak] = {}     # (rule, origin, camera)
        self._gaps = GapTracker(per_camera=False)                   # keyed by pub: fine for merged streams
        self._daemons: dict[str, _Daemon] = {}
        self._started = clock() if now is None else now
        self._never_heard_silent = False     # silence before the first message of any daemon
        self._unhealthy: dict[tuple[str, str], str] = {}            # (origin, camera) -> state that raised it
        self.messages = 0
        self.alerts = 0
        self.lost = 0

    # ---- input ------------------------------------------------------------------------------
    def feed(self, topic: str, body: dict[str, Any], now: float | None = None) -> list[Event]:
        """Events caused by one decoded message (``now``: monotonic receive time)."""
        now = self._clock() if now is None else now
        self.messages += 1
        kind = body.get("type")
        if kind == "invalid" or "seq" not in body:
            # Proof that something is publishing, but not of which daemon.
            return self._back(None, None, now)
        origin, pub = origin_of(body), str(body.get("pub", "?"))
        events = self._back(origin, pub, now)
        try:
            events += self._sequence(origin, pub, body, now)
            if kind == protocol.TYPE_DETECTIONS:
                events += self._detections(origin, body)
                events += self._objects.detections(origin, body)
            elif kind == protocol.TYPE_EVENT and body.get("event") == "end":
                self._objects.ended(origin, body)
            elif kind == protocol.TYPE_HEALTH:
                events += self._health(origin, body)
        except (KeyError, TypeError, ValueError) as exc:
            # A malformed message must not take the alerting down with it.
            log.warning("skipped a malformed %s message on %s (%s: %s)", kind, topic, type(exc).__name__, exc)
        return events

    def tick(self, now: float | None = None) -> list[Event]:
        """Events due to time passing: ``daemon_silent`` once per silence, when a daemon sent
        nothing for ``silence_s`` (or, before any message, nothing came since start)."""
        now = self._clock() if now is None else now
        limit = self.cfg.silence_s
        if not self._daemons:
            if self._never_heard_silent or now - self._started < limit:
                return []
            self._never_heard_silent = True
            return [self._notice("daemon_silent", origin=None, pub=None, silent_s=round(now - self._started, 3),
                                 last_message_time=None)]
        events = []
        for origin, d in self._daemons.items():
            if not d.silent and now - d.last_message >= limit:
                d.silent = True
                events.append(self._notice("daemon_silent", origin=origin or None, pub=d.pub,
                                           silent_s=round(now - d.last_message, 3),
                                           last_message_time=round(d.last_message_wall, 6)))
        return events

    @property
    def silent(self) -> bool:
        """Nothing heard at all for ``silence_s``, or every daemon heard so far is silent."""
        if not self._daemons:
            return self._never_heard_silent
        return all(d.silent for d in self._daemons.values())

    # ---- the parts ----------------------------------------------------------------------------
    def _notice(self, kind: str, **fields: Any) -> Event:
        return Event({"event": kind, "time": round(self._wall(), 6), **fields})

    def _back(self, origin: str | None, pub: str | None, now: float) -> list[Event]:
        events = []
        if self._never_heard_silent:
            self._never_heard_silent = False
            events.append(self._notice("daemon_back", origin=origin or None, pub=pub,
                                       silent_for_s=round(now - self._started, 3)))
        d = self._daemons.get(origin) if origin is not None else None
        if d is not None and d.silent:
            d.silent = False
            events.append(self._notice("daemon_back", origin=origin or None, pub=pub,
                                       silent_for_s=round(now - d.last_message, 3)))
        return events

    def _sequence(self, origin: str, pub: str, body: dict[str, Any], now: float) -> list[Event]:
        events = []
        d = self._daemons.get(origin)
        if d is None:
            d = self._daemons[origin] = _Daemon(pub, now, self._wall(), {pub})
        elif pub not in d.pubs:
            # A pub id this daemon never used: it restarted. (A pub seen before is two
            # unnamed daemons on one host taking turns; one notice, not one per message.)
            events.append(self._notice("publisher_restarted", origin=origin or None, pub=pub, previous=d.pub))
            d.pubs.add(pub)
            for (_, o, _), streak in self._streaks.items():
                if o == origin:
                    streak.reset()   # frame counters start over; nothing was seen in between
            self._objects.forget(origin)
        d.pub, d.last_message, d.last_message_wall = pub, now, self._wall()
        before = self._gaps.missing
        self._gaps.check(body)
        if self._gaps.missing > before:
            n = self._gaps.missing - before
            self.lost += n
            events.append(self._notice("messages_lost", origin=origin or None, pub=pub, count=n, total=self.lost,
                                       before_seq=body["seq"]))
        return events

    def _detections(self, origin: str, body: dict[str, Any]) -> list[Event]:
        camera = str(body["camera"])
        dets = body["detections"]
        ts = float(body.get("capture_ts") or body["publish_ts"])
        events = []
        for cr in self._rules:
            if not cr.applies_to(camera):
                continue
            rule = cr.rule
            matches = [d for d in dets if cr.matches(d)]
            streak = self._streaks.setdefault((rule.name, origin, camera), _Streak())
            if len(matches) < rule.min_count:
                streak.reset()
                continue
            if streak.start_ts is None:
                streak.start_ts = ts
            streak.frames += 1
            dwell = ts - streak.start_ts
            if streak.frames < rule.min_frames or dwell < rule.min_duration_s - TIME_EPS:
                continue
            if streak.last_fire_ts is not None and ts - streak.last_fire_ts < rule.cooldown_s - TIME_EPS:
                continue
            streak.last_fire_ts = ts
            self.alerts += 1
            events.append(Event({
                "event": "alert", "rule": rule.name, "camera": camera, "origin": origin or None,
                "time": ts, "time_iso": iso_time(ts), "frame": body.get("frame"),
                "count": len(matches), "detections": matches,
                "width": body.get("width"), "height": body.get("height"),
                "dwell_s": round(dwell, 6), "frames": streak.frames,
                "pub": body.get("pub"), "seq": body.get("seq"), "snapshot": None,
            }, rule=rule, body=body, matches=matches))
        return events

    def _object_alert(self, rule: Rule, origin: str, body: dict[str, Any], det: dict[str, Any],
                      fields: dict[str, Any]) -> Event:
        ts = float(body.get("capture_ts") or body["publish_ts"])
        self.alerts += 1
        return Event({
            "event": "alert", "rule": rule.name, "trigger": rule.trigger, "camera": str(body["camera"]),
            "origin": origin or None, "time": ts, "time_iso": iso_time(ts), "frame": body.get("frame"),
            "track_id": det["track_id"], "label": det.get("label"), "count": 1, "detections": [det],
            "width": body.get("width"), "height": body.get("height"), **fields,
            "pub": body.get("pub"), "seq": body.get("seq"), "snapshot": None,
        }, rule=rule, body=body, matches=[det])

    def _health(self, origin: str, body: dict[str, Any]) -> list[Event]:
        camera, state = str(body["camera"]), str(body["state"])
        if state != "streaming":
            for (_, o, cam), streak in self._streaks.items():
                if o == origin and cam == camera:
                    streak.reset()
        if not self.cfg.health_alerts:
            return []
        # One camera_health per outage: a camera cycling reconnecting -> connecting ->
        # reconnecting while it retries is one problem, not one alert per try.
        key = (origin, camera)
        if state in self.cfg.health_states and key not in self._unhealthy:
            self._unhealthy[key] = state
            return [self._notice("camera_health", camera=camera, origin=origin or None, state=state,
                                 previous=body.get("previous"), reason=body.get("reason"), pub=body.get("pub"))]
        if state == "streaming" and key in self._unhealthy:
            was = self._unhealthy.pop(key)
            return [self._notice("camera_recovered", camera=camera, origin=origin or None, state=state, was=was,
                                 reason=body.get("reason"), pub=body.get("pub"))]
        return []
