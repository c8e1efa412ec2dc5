"""Rules that follow tracked objects: dwell, present, enter, leave, cross.

Detections of a camera with ``tracking.tracker: bytetrack`` carry a ``track_id``
(docs/PROTOCOL.md 1.1); these rules keep per object what it did, so two people taking turns
in a zone are two objects, and a person hidden for a frame or two is still the same one. Each
rule fires at most once per object per ``cooldown_s``. State is keyed by (daemon, camera,
track id) and dropped at the object's ``end`` event, or when its daemon restarts (ids start
again at 1). Detections without a ``track_id`` are not objects: only ``trigger: frames`` rules
see them.

Times are capture times from the messages, as for the per-frame rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..geometry import Point, bottom_center, overlap_fraction, point_in_polygon, segments_intersect, side_of_line
from .rules import Rule

TIME_EPS = 1e-6          # capture_ts is published rounded to microseconds
FRACTION_EPS = 1e-9      # a box exactly min_overlap inside must pass
# Objects remembered per camera: beyond it (end events lost) the longest unseen are forgotten.
MAX_OBJECTS_PER_CAMERA = 10_000


class CompiledRule:
    """A rule's filters, ready to test detections."""

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.class_ids = {c for c in rule.classes if isinstance(c, int)}
        self.class_names = {c.strip().lower() for c in rule.classes if isinstance(c, str)}
        self.zone = [(float(x), float(y)) for x, y in rule.zone] if rule.zone else None
        self.line = (tuple(map(float, rule.line[0])), tuple(map(float, rule.line[1]))) if rule.line else None

    def applies_to(self, camera: str) -> bool:
        return self.rule.all_cameras or camera in self.rule.cameras

    def passes(self, det: dict[str, Any]) -> bool:
        """Class and confidence."""
        r = self.rule
        if r.classes and int(det["class_id"]) not in self.class_ids \
                and str(det.get("label", "")).lower() not in self.class_names:
            return False
        return float(det["confidence"]) >= r.min_confidence

    def in_zone(self, det: dict[str, Any]) -> bool:
        """In the zone by the rule's test (True without a zone)."""
        if self.zone is None:
            return True
        if self.rule.zone_test == "bottom_center":
            return point_in_polygon(bottom_center(det["box"]), self.zone)
        return overlap_fraction(self.zone, det["box"]) >= self.rule.min_overlap - FRACTION_EPS

    def matches(self, det: dict[str, Any]) -> bool:
        return self.passes(det) and self.in_zone(det)


@dataclass
class _Object:
    last_ts: float
    since_ts: float | None = None      # dwell/present: matching without a break since
    inside: bool | None = None         # enter/leave: in the zone at the last sighting
    point: Point | None = None         # cross: bottom-centre at the last sighting
    side: int = 0                      # cross: the side of the line it was last seen on
    last_fire_ts: float | None = None


def crossing_direction(line: tuple[Point, Point], to_side: int) -> tuple[str, str]:
    """A crossing onto ``to_side`` of the line, named on both picture axes: (left/right, top/bottom)."""
    (ax, ay), (bx, by) = line
    nx, ny = -(by - ay) * to_side, (bx - ax) * to_side   # the direction of travel across the line
    return ("left_to_right" if nx > 0 else "right_to_left" if nx < 0 else "",
            "top_to_bottom" if ny > 0 else "bottom_to_top" if ny < 0 else "")


class ObjectRules:
    """The per-object rules of one alert engine; ``alert`` builds an alert event's data."""

    def __init__(self, rules: list[CompiledRule], alert: Callable[..., Any]) -> None:
        self._rules = rules
        self._alert = alert
        self._objects: dict[tuple[str, str], dict[tuple[str, int], _Object]] = {}   # (origin, camera)
        self._crossings: dict[tuple[str, str, str], int] = {}                      # (rule, origin, camera)

    def detections(self, origin: str, body: dict[str, Any]) -> list[Any]:
        camera = str(body["camera"])
        ts = float(body.get("capture_ts") or body["publish_ts"])
        rules = [cr for cr in self._rules if cr.applies_to(camera)]
        tracked = [d for d in body["detections"] if d.get("track_id") is not None]
        if not rules or not tracked:
            return []
        objects = self._objects.setdefault((origin, camera), {})
        events = []
        for cr in rules:
            for det in tracked:
                key = (cr.rule.name, int(det["track_id"]))
                obj = objects.get(key)
                if obj is None:
                    obj = objects[key] = _Object(ts)
                fired = self._judge(cr, obj, det, ts, origin, camera)
                obj.last_ts = ts
                if fired is not None:
                    obj.last_fire_ts = ts
                    events.append(self._alert(cr.rule, origin, body, det, fired))
        if len(objects) > MAX_OBJECTS_PER_CAMERA:
            for key in sorted(objects, key=lambda k: objects[k].last_ts)[:len(objects) - MAX_OBJECTS_PER_CAMERA]:
                del objects[key]
        return events

    def ended(self, origin: str, body: dict[str, Any]) -> None:
        """An object's ``end`` event: it is forgotten by every rule."""
        objects = self._objects.get((origin, str(body["camera"])))
        if objects:
            tid = int(body["track_id"])
            for key in [k for k in objects if k[1] == tid]:
                del objects[key]

    def forget(self, origin: str) -> None:
        """The daemon restarted: its track ids start again at 1."""
        for key in [k for k in self._objects if k[0] == origin]:
            del self._objects[key]

    def _judge(self, cr: CompiledRule, obj: _Object, det: dict[str, Any], ts: float,
               origin: str, camera: str) -> dict[str, Any] | None:
        """What this sighting fires (the alert's own fields), or None."""
        rule = cr.rule
        cooled = obj.last_fire_ts is None or ts - obj.last_fire_ts >= rule.cooldown_s - TIME_EPS
        if rule.trigger in ("dwell", "present"):
            if not cr.matches(det):
                obj.since_ts = None   # seen not matching (left the zone, another class): the clock restarts
                return None
            if obj.since_ts is None:
                obj.since_ts = ts
            dwell = ts - obj.since_ts
            return {"dwell_s": round(dwell, 6)} if dwell >= rule.min_duration_s - TIME_EPS and cooled else None
        if not cr.passes(det):
            return None
        if rule.trigger in ("enter", "leave"):
            inside, was = cr.in_zone(det), obj.inside
            obj.inside = inside
            if was is None or was == inside or inside != (rule.trigger == "enter"):
                return None
            return {} if cooled else None
        return self._cross(cr, obj, bottom_center(det["box"]), cooled, origin, camera)

    def _cross(self, cr: CompiledRule, obj: _Object, p: Point, cooled: bool,
               origin: str, camera: str) -> dict[str, Any] | None:
        assert cr.line is not None
        a, b = cr.line
        side, prev_side, prev = side_of_line(p, a, b), obj.side, obj.point
        obj.point = p
        if side == 0:
            return None          # on the line: the crossing is judged once it is past
        obj.side = side
        if prev_side in (0, side) or prev is None or not segments_intersect(prev, p, a, b):
            return None          # same side, or went round the line's end
        names = crossing_direction(cr.line, side)
        want = cr.rule.direction
        if want != "any" and want not in names:
            return None
        key = (cr.rule.name, origin, camera)
        self._crossings[key] = self._crossings.get(key, 0) + 1
        if not cooled:
            return None
        direction = want if want != "any" else next(n for n in names if n)
        return {"direction": direction, "crossings": self._crossings[key]}
