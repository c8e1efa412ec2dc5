"""``streamd alert``: rules on recorded streams, rules-file errors, real sinks, real sockets,
and the whole chain against a real daemon process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import pytest
import yaml
import zmq

from streamd import protocol
from streamd.alert.runner import AlertRunner
from streamd.alert.engine import AlertEngine, Event
from streamd.geometry import intersection_area, overlap_fraction, point_in_polygon
from streamd.alert.rules import CommandSinkConfig, WebhookSinkConfig, load_rules, parse_rules
from streamd.alert.sinks import CommandSink, WebhookSink
from streamd.alert.snapshots import save_alert_snapshot
from streamd.errors import ConfigError
from tests.fixtures_daemon import free_tcp_port, wait_until
from tests.test_daemon import base_config

REPO = Path(__file__).resolve().parents[1]
ALERT_CMD = [sys.executable, "-m", "streamd.cli", "alert"]
T0 = 1764079200.0   # a realistic capture_ts; multiples of 1/4 s after it are exact in binary


# ---- recorded streams ------------------------------------------------------------------------

class Stream:
    """Builds protocol-v1 message bodies the way one publisher numbers them."""

    def __init__(self, pub: str = "3f9c2a71b0de", origin: str | None = None) -> None:
        self.pub = pub
        self.origin = origin
        self.seq = 0
        self.cam_seq: dict[str, int] = {}
        self.frames: dict[str, int] = {}

    def _base(self, type_: str, camera: str | None = None) -> dict[str, Any]:
        self.seq += 1
        body: dict[str, Any] = {"v": 1, "type": type_, "seq": self.seq, "pub": self.pub}
        if self.origin is not None:
            body.update(origin=self.origin, host=self.origin)
        if camera is not None:
            self.cam_seq[camera] = self.cam_seq.get(camera, 0) + 1
            body.update(camera=camera, cam_seq=self.cam_seq[camera])
        return body

    def det(self, camera: str, ts: float, detections: list[dict[str, Any]],
            width: int = 640, height: int = 480) -> tuple[str, dict[str, Any]]:
        self.frames[camera] = self.frames.get(camera, 0) + 1
        body = self._base("detections", camera)
        body.update(frame=self.frames[camera], capture_ts=ts, publish_ts=ts + 0.1, width=width, height=height,
                    detections=detections, timings_ms={"infer": 10.0})
        return f"cam/{camera}/det", body

    def health(self, camera: str, state: str, previous: str, reason: str = "") -> tuple[str, dict[str, Any]]:
        body = self._base("health", camera)
        body.update(state=state, previous=previous, reason=reason, publish_ts=T0)
        return f"cam/{camera}/health", body

    def heartbeat(self) -> tuple[str, dict[str, Any]]:
        body = self._base("heartbeat")
        body.update(host="edge-01", pid=4242, publish_ts=T0)
        return "sys/heartbeat", body


def obj(box: tuple[float, float, float, float] = (100, 100, 200, 300), label: str = "person",
        conf: float = 0.9, class_id: int = 0) -> dict[str, Any]:
    return {"class_id": class_id, "label": label, "confidence": conf, "box": list(box)}


def feet_at(x: float, y: float) -> tuple[float, float, float, float]:
    """A box whose bottom-centre is exactly (x, y)."""
    return (x - 20.0, y - 80.0, x + 20.0, y)


def engine_for(rules_yaml: str) -> AlertEngine:
    return AlertEngine(parse_rules(rules_yaml, "rules.yaml"), now=0.0)


def feed_all(engine: AlertEngine, msgs: list[tuple[str, dict[str, Any]]]) -> list[Event]:
    out: list[Event] = []
    for i, (topic, body) in enumerate(msgs):
        # A steady local clock: message i arrives at i/10 s, far inside silence_s.
        out += engine.feed(topic, body, now=i / 10)
    return out


def alerts(events: list[Event]) -> list[dict[str, Any]]:
    return [e.data for e in events if e.kind == "alert"]


SQUARE = "[[100, 100], [300, 100], [300, 300], [100, 300]]"
TRIANGLE = "[[0, 0], [400, 200], [0, 400]]"   # its top edge is the line y = x / 2


@pytest.mark.parametrize("zone, feet, fires", [
    (SQUARE, (200, 300), True),          # exactly on the bottom edge
    (SQUARE, (200, 299.99), True),       # just inside
    (SQUARE, (200, 300.01), False),      # just outside
    (SQUARE, (100, 200), True),          # exactly on the left edge
    (SQUARE, (100.01, 200), True),
    (SQUARE, (99.99, 200), False),
    (SQUARE, (300, 300), True),          # on a corner
    (TRIANGLE, (200, 100), True),        # exactly on a slanted edge
    (TRIANGLE, (200, 100.01), True),     # just inside (below the line)
    (TRIANGLE, (200, 99.99), False),     # just outside
    (TRIANGLE, (400, 200), True),        # on the apex
    (TRIANGLE, (400.01, 200), False),
])
def test_zone_bottom_center_edges(zone: str, feet: tuple[float, float], fires: bool) -> None:
    eng = engine_for(f"rules:\n  - name: z\n    zone: {zone}\n    cooldown_s: 0\n")
    s = Stream()
    got = alerts(feed_all(eng, [s.det("door", T0, [obj(feet_at(*feet))])]))
    assert bool(got) is fires
    assert point_in_polygon(feet, yaml.safe_load(zone)) is fires


@pytest.mark.parametrize("box, min_overlap, fires", [
    ((0, 0, 200, 100), 0.5, True),       # exactly half inside, threshold exactly half
    ((0, 0, 200, 100), 0.51, False),
    ((50, 0, 250, 100), 0.75, True),     # 150 of 200 px wide inside
    ((50, 0, 250, 100), 0.76, False),
    ((100, 0, 300, 100), 1.0, True),     # entirely inside
    ((-300, 0, -100, 100), 0.01, False),  # entirely outside
])
def test_zone_overlap_fraction(box: tuple[float, float, float, float], min_overlap: float, fires: bool) -> None:
    zone = "[[100, -10], [500, -10], [500, 500], [100, 500]]"
    eng = engine_for(f"rules:\n  - name: o\n    zone: {zone}\n    zone_test: overlap\n"
                     f"    min_overlap: {min_overlap}\n    cooldown_s: 0\n")
    got = alerts(feed_all(eng, [Stream().det("door", T0, [obj(box)])]))
    assert bool(got) is fires


def test_overlap_area_matches_opencv_on_convex_and_raster_on_concave() -> None:
    # Convex: cross-check against OpenCV's convex intersection.
    tri = [(30.0, 20.0), (260.0, 60.0), (120.0, 240.0)]
    box = (50.0, 40.0, 200.0, 180.0)
    rect = np.array([[box[0], box[1]], [box[2], box[1]], [box[2], box[3]], [box[0], box[3]]], np.float32)
    cv_area, _ = cv2.intersectConvexConvex(np.array(tri, np.float32), rect)
    assert intersection_area(tri, box) == pytest.approx(cv_area, rel=1e-4)
    # Concave (a U whose two legs both cross the box): exactly 2 x 50 x 100 px inside.
    u_shape = [(0, 0), (300, 0), (300, 300), (200, 300), (200, 100), (100, 100), (100, 300), (0, 300)]
    box2 = (50.0, 150.0, 250.0, 250.0)
    assert intersection_area(u_shape, box2) == pytest.approx(10000.0)
    assert overlap_fraction(u_shape, box2) == pytest.approx(0.5)
    # ... and a rasterised check of the same on a 1/4-pixel grid.
    scale = 4
    mask = np.zeros((300 * scale, 300 * scale), np.uint8)
    cv2.fillPoly(mask, [np.array(u_shape, np.int32) * scale], 1)
    inside = mask[150 * scale:250 * scale, 50 * scale:250 * scale].sum() / scale ** 2
    assert intersection_area(u_shape, box2) == pytest.approx(inside, rel=0.02)


def test_concave_zone_overlap_rule_counts_both_legs() -> None:
    zone = "[[0, 0], [300, 0], [300, 300], [200, 300], [200, 100], [100, 100], [100, 300], [0, 300]]"
    eng = engine_for(f"rules:\n  - name: u\n    zone: {zone}\n    zone_test: overlap\n    min_overlap: 0.5\n"
                     "    cooldown_s: 0\n")
    s = Stream()
    assert alerts(feed_all(eng, [s.det("door", T0, [obj((50, 150, 250, 250))])]))       # 0.5 inside
    assert not alerts(feed_all(eng, [s.det("door", T0 + 1, [obj((110, 150, 190, 250))])]))  # in the gap


def test_dwell_by_duration() -> None:
    eng = engine_for("rules:\n  - name: dwell\n    min_duration_s: 2\n    cooldown_s: 60\n")
    s = Stream()
    msgs = [s.det("door", T0 + k * 0.25, [obj()]) for k in range(12)]   # 4 fps, 2.75 s
    events = []
    for i, m in enumerate(msgs):
        got = alerts(eng.feed(*m, now=i / 10))
        events.append((i, got))
    fired = [(i, a) for i, got in events for a in got]
    assert [i for i, _ in fired] == [8]                     # at capture_ts T0 + 2.0, not before
    a = fired[0][1]
    assert a["dwell_s"] == pytest.approx(2.0) and a["frames"] == 9 and a["time"] == T0 + 2.0


def test_dwell_by_frames_resets_on_a_frame_without_a_match() -> None:
    eng = engine_for("rules:\n  - name: three\n    min_frames: 3\n    cooldown_s: 0\n")
    s = Stream()
    pattern = [1, 1, 0, 1, 1, 1, 1]   # 1: a person in the frame, 0: nothing
    msgs = [s.det("door", T0 + k, [obj()] if p else []) for k, p in enumerate(pattern)]
    fired_frames = [a["frame"] for a in alerts(feed_all(eng, msgs))]
    # Frames 1-2 are cut short by frame 3; 4, 5, 6 are the first three in a row; 7 continues.
    assert fired_frames == [6, 7]


def test_duration_resets_on_a_frame_without_a_match() -> None:
    eng = engine_for("rules:\n  - name: d\n    min_duration_s: 1.5\n    cooldown_s: 0\n")
    s = Stream()
    ts = [0, 0.5, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0]
    present = [1, 1, 1, 0, 1, 1, 1, 1]
    msgs = [s.det("door", T0 + t, [obj()] if p else []) for t, p in zip(ts, present)]
    fired = [a["time"] - T0 for a in alerts(feed_all(eng, msgs))]
    assert fired == [3.0]          # streak restarted at 1.5 s: 1.5 s later is 3.0 s


def test_both_duration_and_frames_must_hold() -> None:
    eng = engine_for("rules:\n  - name: both\n    min_duration_s: 1\n    min_frames: 5\n    cooldown_s: 99\n")
    s = Stream()
    # 1 fps: the duration is reached at frame 2, the frame count only at frame 5.
    msgs = [s.det("door", T0 + k, [obj()]) for k in range(6)]
    assert [a["frame"] for a in alerts(feed_all(eng, msgs))] == [5]


def test_cooldown_per_rule_and_camera() -> None:
    eng = engine_for("rules:\n  - name: c\n    cooldown_s: 5\n")
    s = Stream()
    msgs = []
    for k in range(12):   # 1 fps on two cameras; "yard" sees someone from t=3
        msgs.append(s.det("door", T0 + k, [obj()]))
        msgs.append(s.det("yard", T0 + k, [obj()] if k >= 3 else []))
    fired = [(a["camera"], a["time"] - T0) for a in alerts(feed_all(eng, msgs))]
    assert fired == [("door", 0), ("yard", 3), ("door", 5), ("yard", 8), ("door", 10)]


def test_a_new_streak_inside_the_cooldown_does_not_fire() -> None:
    eng = engine_for("rules:\n  - name: c\n    cooldown_s: 10\n")
    s = Stream()
    present = [1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    msgs = [s.det("door", T0 + k, [obj()] if p else []) for k, p in enumerate(present)]
    assert [a["time"] - T0 for a in alerts(feed_all(eng, msgs))] == [0, 11]


def test_min_count() -> None:
    eng = engine_for("rules:\n  - name: crowd\n    classes: [person]\n    min_count: 2\n    cooldown_s: 0\n")
    s = Stream()
    one = [obj((0, 0, 10, 10)), obj((0, 0, 10, 10), label="car", class_id=2)]
    two = [obj((0, 0, 10, 10)), obj((20, 0, 30, 10), conf=0.5), obj((0, 0, 5, 5), label="car", class_id=2)]
    got = alerts(feed_all(eng, [s.det("door", T0, one), s.det("door", T0 + 1, two)]))
    assert len(got) == 1
    assert got[0]["count"] == 2 and got[0]["frame"] == 2
    assert [d["label"] for d in got[0]["detections"]] == ["person", "person"]


@pytest.mark.parametrize("rule, det, camera, fires", [
    ("classes: [person]", obj(label="Person"), "door", True),       # names ignore case
    ("classes: [person]", obj(label="car", class_id=2), "door", False),
    ("classes: [2]", obj(label="car", class_id=2), "door", True),   # ids
    ("classes: [2]", obj(label="person", class_id=0), "door", False),
    ("min_confidence: 0.5", obj(conf=0.5), "door", True),
    ("min_confidence: 0.5", obj(conf=0.4999), "door", False),
    ("cameras: [door]", obj(), "door", True),
    ("cameras: [door]", obj(), "door2", False),
    ('cameras: "*"', obj(), "anything", True),
    ("cameras: [yard, door]", obj(), "yard", True),
])
def test_class_confidence_and_camera_filters(rule: str, det: dict[str, Any], camera: str, fires: bool) -> None:
    eng = engine_for(f"rules:\n  - name: f\n    {rule}\n    cooldown_s: 0\n")
    assert bool(alerts(feed_all(eng, [Stream().det(camera, T0, [det])]))) is fires


def test_alert_json_has_what_was_asked_for() -> None:
    eng = engine_for("rules:\n  - name: door-person\n    cameras: [door]\n    classes: [person]\n"
                     f"    zone: {SQUARE}\n")
    s = Stream()
    inside, outside = obj(feet_at(200, 200), conf=0.8), obj(feet_at(500, 400), conf=0.95)
    [a] = alerts(feed_all(eng, [s.det("door", T0 + 0.5, [outside, inside])]))
    assert a["event"] == "alert" and a["rule"] == "door-person" and a["camera"] == "door"
    assert a["time"] == T0 + 0.5 and a["time_iso"] == "2025-11-25T14:00:00.500Z"
    assert a["frame"] == 1 and a["count"] == 1 and a["detections"] == [inside]
    assert a["snapshot"] is None and (a["width"], a["height"]) == (640, 480)
    json.dumps(a, allow_nan=False)   # everything in it is plain JSON


def test_disabled_rule_never_fires() -> None:
    eng = engine_for("rules:\n  - name: muted\n    enabled: false\n")
    assert not alerts(feed_all(eng, [Stream().det("door", T0, [obj()])]))


def test_lost_messages_and_publisher_restart() -> None:
    eng = engine_for("rules:\n  - name: r\n    min_frames: 3\n    cooldown_s: 0\n")
    s = Stream("aaaa")
    msgs = [s.det("door", T0, [obj()]), s.det("door", T0 + 1, [obj()])]
    s.seq += 3                                   # three messages never arrived
    msgs.append(s.heartbeat())
    events = feed_all(eng, msgs)
    [lost] = [e.data for e in events if e.kind == "messages_lost"]
    assert lost["count"] == 3 and lost["total"] == 3 and lost["before_seq"] == 6
    # A restarted daemon numbers from 1 again: a restart, not a loss, and the dwell starts over.
    s2 = Stream("bbbb")
    events = feed_all(eng, [s2.det("door", T0 + 2, [obj()]), s2.det("door", T0 + 3, [obj()])])
    kinds = [e.kind for e in events]
    assert kinds == ["publisher_restarted"]
    assert events[0].data["pub"] == "bbbb" and events[0].data["previous"] == "aaaa"
    assert [a["frame"] for a in alerts(feed_all(eng, [s2.det("door", T0 + 4, [obj()])]))] == [3]
    assert eng.lost == 3


def test_health_alerts_once_per_outage_and_recovery() -> None:
    eng = engine_for("health_alerts: true\nrules: []\n")
    s = Stream()
    msgs = [s.health("door", "streaming", "connecting"),
            s.health("door", "lost", "streaming", "stream ended"),
            s.health("door", "reconnecting", "lost", "retry in 1.0s"),
            s.health("door", "connecting", "reconnecting"),
            s.health("door", "reconnecting", "connecting", "connection refused; retry in 2.0s"),
            s.health("door", "streaming", "connecting", "connected"),
            s.health("yard", "stalled", "streaming", "no frame for 10s")]
    events = feed_all(eng, msgs)
    got = [(e.kind, e.data["camera"], e.data["state"]) for e in events]
    assert got == [("camera_health", "door", "lost"), ("camera_recovered", "door", "streaming"),
                   ("camera_health", "yard", "stalled")]
    assert events[0].data["reason"] == "stream ended" and events[1].data["was"] == "lost"
    assert not feed_all(engine_for("rules: []\n"), msgs)   # off by default


def test_camera_leaving_streaming_resets_its_dwell() -> None:
    eng = engine_for("rules:\n  - name: r\n    min_frames: 3\n    cooldown_s: 0\n")
    s = Stream()
    msgs = [s.det("door", T0, [obj()]), s.det("door", T0 + 1, [obj()]),
            s.health("door", "stalled", "streaming"), s.health("door", "streaming", "stalled"),
            s.det("door", T0 + 20, [obj()]), s.det("door", T0 + 21, [obj()]), s.det("door", T0 + 22, [obj()])]
    assert [a["frame"] for a in alerts(feed_all(eng, msgs))] == [5]


def test_engine_silence_and_back() -> None:
    eng = AlertEngine(parse_rules("silence_s: 5\nrules: []\n"), now=100.0)
    assert eng.tick(104.9) == []
    [silent] = eng.tick(105.0)
    assert silent.kind == "daemon_silent" and silent.data["last_message_time"] is None
    assert eng.tick(200.0) == []                        # once per silence
    s = Stream()
    [back] = [e for e in eng.feed(*s.heartbeat(), now=201.0)]
    assert back.kind == "daemon_back" and back.data["silent_for_s"] == pytest.approx(101.0)
    assert eng.tick(205.9) == []
    assert [e.kind for e in eng.tick(206.0)] == ["daemon_silent"]


def test_merged_daemons_are_tracked_apart() -> None:
    # A relay interleaves two daemons that both have a camera "door".
    eng = AlertEngine(parse_rules("silence_s: 5\nrules:\n  - name: r\n    min_frames: 2\n    cooldown_s: 0\n"),
                      now=0.0)
    a, b = Stream("aaaa", origin="edge-a"), Stream("bbbb", origin="edge-b")
    events = []
    for k in range(3):
        events += eng.feed(*a.det("door", T0 + k, [obj()] if k != 1 else []), now=k)
        events += eng.feed(*b.det("door", T0 + k, [obj()]), now=k)
    # Neither a restart nor a loss: each daemon numbers its own messages.
    assert [e.kind for e in events if e.kind != "alert"] == []
    fired = [(x["origin"], x["frame"]) for x in alerts(events)]
    assert fired == [("edge-b", 2), ("edge-b", 3)]      # edge-a's streak was broken at its frame 2
    # edge-a goes quiet, edge-b keeps talking: only edge-a is silent.
    for t in (3.0, 7.0, 9.0):
        events = eng.feed(*b.heartbeat(), now=t) + eng.tick(t)
        assert [(e.kind, e.data["origin"]) for e in events] == ([("daemon_silent", "edge-a")] if t == 7.0 else [])
    assert not eng.silent
    [back] = eng.feed(*a.heartbeat(), now=10.0)
    assert back.kind == "daemon_back" and back.data["origin"] == "edge-a" and back.data["silent_for_s"] == 8.0
    # edge-a restarts: a new pub id from the same origin.
    a2 = Stream("cccc", origin="edge-a")
    [restart] = eng.feed(*a2.heartbeat(), now=11.0)
    assert restart.kind == "publisher_restarted" and restart.data["origin"] == "edge-a"
    assert restart.data["previous"] == "aaaa" and restart.data["pub"] == "cccc"


# ---- the rules file --------------------------------------------------------------------------

BAD_RULES = [
    ("rules:\n  - name: door\n    zone: [[0, 0], [10, 10]]\n",
     "rules[0]", "door", "zone", 3, "at least 3 points"),
    ("rules:\n  - name: ok\n  - name: loud\n    min_confidence: 1.5\n",
     "rules[1]", "loud", "min_confidence", 4, "less than or equal to 1"),
    ("rules:\n  - name: a\n  - name: bowtie\n    cameras: [door]\n    zone: [[0, 0], [10, 10], [10, 0], [0, 20]]\n",
     "rules[1]", "bowtie", "zone", 5, "edges cross"),
    ("rules:\n  - name: line\n    zone: [[0, 0], [5, 5], [10, 10]]\n",
     "rules[0]", "line", "zone", 3, "no area"),
    ("rules:\n  - name: typo\n    min_confidance: 0.5\n",
     "rules[0]", "typo", "min_confidance", 3, "unknown key"),
    ("rules:\n  - name: ov\n    zone_test: overlap\n",
     "rules[0]", "ov", "zone_test", 3, "with a zone"),
    ("rules:\n  - name: ov\n    zone: [[0, 0], [9, 0], [0, 9]]\n    min_overlap: 0.3\n",
     "rules[0]", "ov", "min_overlap", 4, "zone_test: overlap"),
    ("rules:\n  - name: twice\n  - name: other\n  - name: twice\n",
     "rules[2]", "twice", "name", 4, "duplicate rule name"),
    ("rules:\n  - name: cams\n    cameras: [door, 'bad/id']\n",
     "rules[0]", "cams", "cameras", 3, "not a camera id"),
    ("rules:\n  - name: dwell\n    min_frames: 0\n",
     "rules[0]", "dwell", "min_frames", 3, "greater than or equal to 1"),
    ("rules:\n  - name: cool\n\n    cooldown_s: soon\n",
     "rules[0]", "cool", "cooldown_s", 4, "valid number"),
    ("rules:\n  - name: pts\n    zone: [[0, 0], [5], [0, 9]]\n",
     "rules[0]", "pts", "zone", 3, "point 1 must be [x, y], got [5]"),
    ("rules:\n  - cameras: [door]\n",
     "rules[0]", "", "name", 2, "is required"),
]


@pytest.mark.parametrize("text, index, name, field, line, words", BAD_RULES)
def test_bad_rules_name_the_rule_field_and_line(tmp_path: Path, text: str, index: str, name: str, field: str,
                                                line: int, words: str) -> None:
    path = tmp_path / "alerts.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_rules(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:{line}: "), msg
    assert index in msg and f"{field}:" in msg and words in msg, msg
    if name:
        assert f"rule '{name}' ({index})" in msg, msg
    assert info.value.line == line


@pytest.mark.parametrize("text, field, line, words", [
    ("sinks:\n  webhooks:\n    - url: ftp://example.com/x\n", "sinks.webhooks[0].url", 3, "http:// or https://"),
    ("sinks:\n  commands:\n    - argv: []\n", "sinks.commands[0].argv", 3, "at least 1 item"),
    ("sinks:\n  webhooks:\n    - url: http://x\n      events: [alert, explosion]\n",
     "sinks.webhooks[0].events[1]", 4, "'alert'"),
    ("silence_s: 0\n", "silence_s", 1, "greater than 0"),
    ("health_states: [lost, broken]\n", "health_states[1]", 1, "'stalled'"),
    ("rules:\n  - name: a\n    zone: [[0, 0], [1, 0], [0, 1]]\n  - name: a\n", "rules[1]", 4, "duplicate"),
    ("rules: [\n", None, 2, "invalid YAML"),
    ("- name: a\n", None, 1, "mapping with rules:"),
    ("sinks:\n  webhooks:\n    - url: http://h/${NO_SUCH_VAR_FOR_ALERT_TEST}\n", "sinks.webhooks[0].url", 3,
     "NO_SUCH_VAR_FOR_ALERT_TEST is not set"),
])
def test_bad_top_level_and_sinks(tmp_path: Path, text: str, field: str | None, line: int, words: str) -> None:
    path = tmp_path / "alerts.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_rules(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:{line}: ") and words in msg, msg
    if field:
        assert field in msg, msg


def test_example_rules_file_loads() -> None:
    cfg = load_rules(REPO / "configs" / "alerts.example.yaml", env={"ALERT_WEBHOOK_TOKEN": "t0ken-xyz"})
    names = [r.name for r in cfg.rules]
    assert names == ["person-in-loading-bay", "fall", "lobby-crowd", "loitering", "person-down", "entered-porch",
                     "cars-north"]
    assert [r.trigger for r in cfg.rules[3:]] == ["dwell", "present", "enter", "cross"]
    bay, fall = cfg.rules[0], cfg.rules[1]
    assert bay.min_duration_s == 2 and bay.cooldown_s == 60 and bay.zone and len(bay.zone) == 4
    assert fall.all_cameras and fall.classes == ["Fall"] and fall.min_confidence == 0.5
    assert cfg.sinks.webhooks[0].headers["Authorization"] == "Bearer t0ken-xyz"
    assert cfg.sinks.commands[0].argv[0] == "/usr/local/bin/notify-guard"
    assert cfg.snapshots_dir == REPO / "configs" / ".." / "alerts"


# ---- sinks -----------------------------------------------------------------------------------

class Hook:
    """A real HTTP server on a loopback port, in a thread; answers with ``statuses`` in turn
    (then 200), or holds every request until ``release`` is set."""

    def __init__(self, port: int = 0, statuses: list[int] | None = None, hold: bool = False) -> None:
        self.requests: list[dict[str, Any]] = []
        self.statuses = list(statuses or [])
        self.release = threading.Event()
        self.hold = hold
        self.lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with hook.lock:
                    hook.requests.append({"body": body, "headers": dict(self.headers)})
                    status = hook.statuses.pop(0) if hook.statuses else 200
                if hook.hold:
                    hook.release.wait(60)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r["body"] for r in self.requests]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def hooks() -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for m in made:
        m.close()


def webhook(url: str, **kw: Any) -> WebhookSink:
    opts = {"url": url, "timeout_s": 5, "retries": 5, "backoff_initial_s": 0.05, "backoff_max_s": 0.2, **kw}
    return WebhookSink(WebhookSinkConfig(**opts))


def test_webhook_retries_after_server_errors(hooks: list[Any]) -> None:
    server = Hook(statuses=[500, 503])
    hooks.append(server)
    sink = webhook(server.url, headers={"Authorization": "Bearer abc"})
    hooks.append(sink)
    event = {"event": "alert", "rule": "r", "camera": "door", "count": 1}
    sink.emit(event)
    wait_until(lambda: sink.delivered == 1, 10, what="delivery after two 5xx answers")
    assert len(server.requests) == 3 and server.bodies() == [event] * 3
    assert sink.attempts == 3 and sink.failed == 0 and sink.dropped == 0
    assert server.requests[0]["headers"]["Authorization"] == "Bearer abc"
    assert server.requests[0]["headers"]["Content-Type"] == "application/json"


def test_webhook_waits_for_a_server_that_starts_later(hooks: list[Any]) -> None:
    port = free_tcp_port()
    sink = webhook(f"http://127.0.0.1:{port}/hook", retries=50)
    hooks.append(sink)
    sink.emit({"event": "alert", "n": 1})
    wait_until(lambda: sink.attempts >= 2, 10, what="two refused connection attempts")
    assert sink.delivered == 0
    server = Hook(port=port)
    hooks.append(server)
    wait_until(lambda: sink.delivered == 1, 10, what="delivery once the server is up")
    assert server.bodies() == [{"event": "alert", "n": 1}]


def test_webhook_does_not_retry_a_client_error(hooks: list[Any]) -> None:
    server = Hook(statuses=[400])
    hooks.append(server)
    sink = webhook(server.url)
    hooks.append(sink)
    sink.emit({"event": "alert"})
    wait_until(lambda: sink.failed == 1, 10, what="the 400 to count as a failure")
    assert sink.attempts == 1 and len(server.requests) == 1


def test_webhook_queue_is_bounded_drops_oldest_and_never_blocks(hooks: list[Any]) -> None:
    server = Hook(hold=True)     # accepts, reads, then never answers until released
    hooks.append(server)
    sink = webhook(server.url, queue_size=10, timeout_s=30)
    hooks.append(sink)
    sink.emit({"event": "alert", "n": 0})
    wait_until(lambda: len(server.requests) == 1, 10, what="the first request to be in flight")
    n = 1000
    # The one request in flight is held for the sink's whole 30 s timeout: an emit that waited
    # for room in the queue could not finish until then, so finishing well before proves it never blocks.
    feeder = threading.Thread(target=lambda: [sink.emit({"event": "alert", "n": i}) for i in range(1, n)],
                              daemon=True)
    feeder.start()
    wait_until(lambda: not feeder.is_alive(), 10, what=f"feeding {n} alerts while the server holds the first")
    assert not server.release.is_set() and len(server.requests) == 1
    assert sink.dropped == n - 1 - 10 and sink.pending() == 11
    server.release.set()
    wait_until(lambda: sink.delivered == 11, 10, what="the queued alerts to go out")
    # The oldest waiting were dropped: what went out is the one in flight plus the newest ten.
    assert [b["n"] for b in server.bodies()] == [0, *range(n - 10, n)]


def test_command_sink_runs_a_real_program_without_a_shell(tmp_path: Path, hooks: list[Any]) -> None:
    out = tmp_path / "got.json"
    marker = tmp_path / "injected"
    script = ("import json, os, sys, pathlib; pathlib.Path(sys.argv[1]).write_text(json.dumps("
              "{'stdin': sys.stdin.read(), 'argv': sys.argv[2:], 'rule': os.environ['STREAMD_RULE']}))")
    sink = CommandSink(CommandSinkConfig(argv=[sys.executable, "-c", script, str(out), f"; touch {marker}"],
                                         timeout_s=20))
    hooks.append(sink)
    event = {"event": "alert", "rule": "door-person", "camera": "door", "count": 2}
    sink.emit(event)
    wait_until(lambda: sink.delivered == 1, 30, what="the command to finish")
    got = json.loads(out.read_text())
    assert json.loads(got["stdin"]) == event and got["rule"] == "door-person"
    assert got["argv"] == [f"; touch {marker}"] and not marker.exists()


def test_command_sink_kills_a_program_that_hangs(tmp_path: Path, hooks: list[Any]) -> None:
    pid_file = tmp_path / "pid"
    script = ("import os, sys, time, pathlib; pathlib.Path(sys.argv[1]).write_text(str(os.getpid()));"
              " time.sleep(120)")
    sink = CommandSink(CommandSinkConfig(argv=[sys.executable, "-c", script, str(pid_file)], timeout_s=1.5))
    hooks.append(sink)
    t0 = time.monotonic()
    sink.emit({"event": "alert"})
    wait_until(lambda: sink.failed == 1, 30, what="the hanging command to be given up")
    assert time.monotonic() - t0 < 20
    pid = int(pid_file.read_text())

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    wait_until(gone, 5, what=f"process {pid} to be gone")


def test_command_sink_counts_a_failing_program(hooks: list[Any]) -> None:
    sink = CommandSink(CommandSinkConfig(argv=[sys.executable, "-c", "import sys; sys.exit(3)"]))
    hooks.append(sink)
    sink.emit({"event": "alert"})
    wait_until(lambda: sink.failed == 1, 30, what="the failing command to be counted")
    assert sink.delivered == 0


def test_alert_snapshot_is_annotated_and_named_by_camera_time_rule(test_media: Any, tmp_path: Path) -> None:
    frame = cv2.imread(str(sorted(test_media["bus"].frames_dir.glob("*.jpg"))[0]))
    assert frame is not None
    h, w = frame.shape[:2]
    ok, jpeg = cv2.imencode(".jpg", frame)
    assert ok
    eng = engine_for(f"rules:\n  - name: bay person\n    zone: [[0, 0], [{w}, 0], [{w}, {h}], [0, {h}]]\n")
    topic, body = Stream().det("bus", T0 + 0.25, [obj((100, 100, 200, 300)), obj((300, 50, 350, 90), label="car",
                                                                                    class_id=2, conf=0.3)],
                               width=w, height=h)
    body["snapshot"] = {"format": "jpeg", "part": 2, "bytes": len(jpeg)}
    body["_snapshot"] = jpeg.tobytes()
    [event] = eng.feed(topic, body, now=0.0)
    path = save_alert_snapshot(event, tmp_path)
    assert path == tmp_path / "bus" / "20251125T140000.250Z-bay_person.jpg"
    img = cv2.imread(str(path))
    assert img is not None and img.shape == frame.shape
    # The matching box gets a white halo just outside its own (class-coloured) outline.
    thick = max(2, round(min(h, w) / 150))
    assert img[140:260, 100 - thick].min() > 200, img[140:260, 100 - thick]
    assert not list(tmp_path.rglob("*.tmp.jpg"))


# ---- a real socket ---------------------------------------------------------------------------

class Lines:
    """A text stream for the stdout sink that tests can read while it is written."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buf = ""

    def write(self, text: str) -> int:
        with self._lock:
            self._buf += text
        return len(text)

    def flush(self) -> None:
        pass

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(line) for line in self._buf.splitlines()]


def test_silence_and_resume_on_a_real_socket() -> None:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    silence = 0.6
    cfg = parse_rules(f"endpoint: tcp://127.0.0.1:{port}\nsilence_s: {silence}\nrules: []\n")
    out = Lines()
    runner = AlertRunner(cfg, out=out)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    s = Stream()
    try:
        def send() -> None:
            pub.send_multipart(protocol.encode(protocol.TOPIC_HEARTBEAT, s.heartbeat()[1]))

        # A SUB socket misses what is sent before it has connected: send until one lands.
        def heard() -> bool:
            send()
            return runner.received > 0
        wait_until(heard, 10, interval=0.05, what="the runner to hear a heartbeat")
        t_stop, t_stop_wall = time.monotonic(), time.time()

        # Events from now on (a slow connect may have caused a silent/back pair already).
        def since_stop(kind: str) -> list[dict[str, Any]]:
            return [e for e in out.events() if e["event"] == kind and e["time"] >= t_stop_wall]
        [silent] = wait_until(lambda: since_stop("daemon_silent"), 10, interval=0.02, what="daemon_silent")
        elapsed = time.monotonic() - t_stop
        assert silence <= elapsed < silence + 3, elapsed
        assert silent["silent_s"] >= silence and silent["pub"] == s.pub
        # Still silent for three times as long: still one notice, and nothing else.
        wait_until(lambda: time.monotonic() - t_stop > 3 * silence, 10, what="more silence")
        assert [e["event"] for e in out.events() if e["time"] >= t_stop_wall] == ["daemon_silent"]

        s.seq += 2     # and two messages got lost on the way

        def back_event() -> list[dict[str, Any]]:
            send()
            return since_stop("daemon_back")
        [back] = wait_until(back_event, 10, interval=0.05, what="daemon_back")
        assert back["silent_for_s"] >= 3 * silence
        lost = wait_until(lambda: next((e for e in out.events() if e["event"] == "messages_lost"), None), 5,
                          what="messages_lost")
        assert lost["count"] == 2
    finally:
        runner.stop_event.set()
        thread.join(10)
        pub.close(0)
        ctx.term()
    assert not thread.is_alive()


def test_alert_runner_subscribes_with_curve_keys(tmp_path: Path) -> None:
    from streamd.security import apply_server, generate_key_files, load_key_file, load_secret_key_file
    server_pub, server_sec, _ = generate_key_files(tmp_path / "keys", "daemon")
    client_pub, client_sec, _ = generate_key_files(tmp_path / "keys", "alert")
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    security = apply_server(pub, load_secret_key_file(server_sec), [load_key_file(client_pub).public])
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    rules = tmp_path / "alerts.yaml"
    rules.write_text(f"endpoint: tcp://127.0.0.1:{port}\nserver_key: keys/daemon.key\n"
                     "client_key: keys/alert.key_secret\nrules:\n  - name: any\n    cooldown_s: 0\n")
    out = Lines()
    runner = AlertRunner(load_rules(rules), out=out)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    s = Stream()
    try:
        def alerted() -> bool:
            topic, body = s.det("door", T0 + s.seq, [obj()])
            pub.send_multipart(protocol.encode(topic.encode(), body))
            return any(e["event"] == "alert" for e in out.events())
        wait_until(alerted, 15, interval=0.05, what="an alert over the encrypted connection")
    finally:
        runner.stop_event.set()
        thread.join(10)
        pub.close(0)
        security.stop()
        ctx.term()
    assert not thread.is_alive()


def test_curve_keys_come_in_pairs(tmp_path: Path) -> None:
    path = tmp_path / "alerts.yaml"
    path.write_text("endpoint: tcp://127.0.0.1:5555\nserver_key: daemon.key\n")
    with pytest.raises(ConfigError, match=r"alerts.yaml:2: server_key: CURVE needs client_key as well"):
        load_rules(path)


# ---- the command and the whole chain ---------------------------------------------------------

def test_cli_has_the_alert_command() -> None:
    from streamd.cli import build_parser
    args = build_parser().parse_args(["alert", "-c", "rules.yaml", "--snapshots", "snaps"])
    assert args.config == "rules.yaml" and args.snapshots == "snaps"


def test_cli_bad_rules_file_is_one_clear_error(tmp_path: Path) -> None:
    rules = tmp_path / "alerts.yaml"
    rules.write_text("rules:\n  - name: door\n    cooldown_s: -1\n")
    proc = subprocess.run([*ALERT_CMD, "-c", str(rules)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"streamd: error: {rules}:3: rule 'door' (rules[0]).cooldown_s: "
                                   "Input should be greater than or equal to 0 (got -1)")
    assert proc.stdout == ""


@pytest.mark.slow
def test_end_to_end_real_daemon_and_alert_process(fall_onnx_320: Path, test_media: Any, daemon_factory: Any,
                                                  tmp_path: Path) -> None:
    media = test_media["bus"]
    w, h = media.size
    cams = [{"id": "bus", "url": str(media.mp4), "loop": True, "fps": 4, "snapshot": "on_detection"}]
    cfg = base_config(fall_onnx_320, cams)
    cfg["metrics"] = {"enabled": False}   # its fixed default port may be taken by another daemon
    endpoint = cfg["publisher"]["endpoint"]
    rules = tmp_path / "alerts.yaml"
    rules.write_text(yaml.safe_dump({
        "endpoint": endpoint, "silence_s": 60,
        "rules": [{"name": "person-on-bus", "cameras": ["bus"], "classes": ["Normal"], "min_confidence": 0.25,
                   "zone": [[0, 0], [w, 0], [w, h], [0, h]], "min_frames": 2, "cooldown_s": 600}],
    }, sort_keys=False))
    snaps = tmp_path / "snaps"
    out_path, err_path = tmp_path / "alert.out", tmp_path / "alert.err"
    daemon = daemon_factory(cfg)
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen([*ALERT_CMD, "-c", str(rules), "--snapshots", str(snaps)], stdout=out, stderr=err,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        def first_alert() -> dict[str, Any] | None:
            for line in out_path.read_text().splitlines():
                event = json.loads(line)
                if event["event"] == "alert":
                    return event
            assert proc.poll() is None, f"alert process exited:\n{err_path.read_text()[-3000:]}"
            assert daemon.proc.poll() is None, f"daemon exited:\n{daemon.log()[-3000:]}"
            return None
        alert = wait_until(first_alert, 120, interval=0.2,
                           what=f"an alert\n--- alert log:\n{err_path.read_text()[-2000:]}\n"
                                f"--- daemon log:\n{daemon.log()[-2000:]}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
            raise
        daemon_rc = daemon.stop()
    assert rc == 0, err_path.read_text()[-2000:]
    assert daemon_rc == 0
    assert alert["rule"] == "person-on-bus" and alert["camera"] == "bus" and alert["count"] >= 1
    assert alert["frames"] >= 2 and (alert["width"], alert["height"]) == (w, h)
    assert all(d["label"] == "Normal" and d["confidence"] >= 0.25 for d in alert["detections"])
    snapshot = Path(alert["snapshot"])
    assert snapshot.parent == snaps / "bus" and snapshot.name.endswith("-person-on-bus.jpg")
    img = cv2.imread(str(snapshot))
    assert img is not None and img.shape == (h, w, 3)
    log = err_path.read_text()
    assert "Traceback" not in log and "alert: stopped" in log

