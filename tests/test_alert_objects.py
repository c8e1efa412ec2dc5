"""``streamd alert`` rules that follow tracked objects: recorded streams of protocol 1.1
messages (detections with ``track_id``, ``event`` messages) through the real engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from streamd.alert.engine import AlertEngine, Event
from streamd.alert.objects import crossing_direction
from streamd.alert.rules import load_rules
from streamd.errors import ConfigError
from tests.test_alert import T0, Stream, engine_for, feet_at, obj

ZONE = "[[0, 0], [320, 0], [320, 480], [0, 480]]"   # the left half of a 640x480 frame


def tracked(tid: int, x: float, y: float = 400.0, label: str = "person", conf: float = 0.9,
            class_id: int = 0) -> dict[str, Any]:
    return {**obj(feet_at(x, y), label, conf, class_id), "track_id": tid, "first_seen_ts": T0, "age_s": 0.0}


def end_event(s: Stream, camera: str, tid: int) -> tuple[str, dict[str, Any]]:
    body = s._base("event", camera)
    body.update(event="end", track_id=tid, reason="lost", publish_ts=T0)
    return f"cam/{camera}/event", body


def run(engine: AlertEngine, msgs: list[tuple[str, dict[str, Any]]]) -> list[Event]:
    return [e for topic, body in msgs for e in engine.feed(topic, body, now=0.0) if e.kind == "alert"]


def test_dwell_is_per_object_two_people_taking_turns_do_not_add_up() -> None:
    eng = engine_for(f"rules: [{{name: loiter, trigger: dwell, zone: {ZONE}, min_duration_s: 3, cooldown_s: 60}}]")
    s = Stream()
    # Person 1 in the zone for 2 s, then person 2 for 2 s: 4 s of "someone", nobody for 3 s.
    msgs = [s.det("yard", T0 + i * 0.5, [tracked(1 if i < 5 else 2, 100 if i < 5 else 600 - i)]) for i in range(5)]
    msgs += [s.det("yard", T0 + 2.5 + i * 0.5, [tracked(1, 600), tracked(2, 100)]) for i in range(5)]
    assert run(eng, msgs) == []
    # Person 2 stays: it fires at 3 s of its own, once (cooldown), though hidden for a frame.
    more = [s.det("yard", T0 + 5.0, [tracked(2, 110)]), s.det("yard", T0 + 5.5, []),
            s.det("yard", T0 + 6.0, [tracked(2, 120)])]
    more += [s.det("yard", T0 + 6.5 + i * 0.5, [tracked(2, 130)]) for i in range(6)]
    alerts = run(eng, more)
    assert [(a.data["track_id"], a.data["dwell_s"], a.data["trigger"]) for a in alerts] == [(2, 3.5, "dwell")]
    assert alerts[0].data["detections"] == [tracked(2, 120)] and alerts[0].matches == [tracked(2, 120)]


def test_present_fires_once_per_object_and_a_sighting_of_another_class_restarts_it() -> None:
    eng = engine_for("rules: [{name: down, trigger: present, classes: [Fall], min_duration_s: 20, cooldown_s: 600}]")
    s = Stream()
    fall = [s.det("hall", T0 + t, [tracked(7, 300, label="Fall", class_id=1)]) for t in range(0, 15)]
    up = [s.det("hall", T0 + 15, [tracked(7, 300, label="Normal")])]          # got up: starts again
    again = [s.det("hall", T0 + t, [tracked(7, 300, label="Fall", class_id=1)]) for t in range(16, 60)]
    alerts = run(eng, fall + up + again)
    assert [(a.data["track_id"], a.data["dwell_s"], a.data["time"]) for a in alerts] == [(7, 20.0, T0 + 36)]


def test_enter_and_leave_fire_on_the_transition_once_per_cooldown_per_object() -> None:
    eng = engine_for(f"rules: [{{name: in, trigger: enter, zone: {ZONE}, cooldown_s: 10}},\n"
                     f"        {{name: out, trigger: leave, zone: {ZONE}, cooldown_s: 10}}]")
    s = Stream()
    # Object 1 first seen inside (not an entry), leaves at 1, comes back at 2, leaves at 3;
    # object 4 enters at 2 on its own.
    xs = [100, 400, 100, 400, 100]
    msgs = [s.det("door", T0 + t, [tracked(1, x)] + ([tracked(4, 600 - 400 * (t >= 2))] if t >= 1 else []))
            for t, x in enumerate(xs)]
    msgs.append(s.det("door", T0 + 12, [tracked(1, 400)]))   # out again, after the cooldown
    fired = [(a.data["rule"], a.data["track_id"], a.data["time"] - T0) for a in run(eng, msgs)]
    assert fired == [("out", 1, 1.0), ("in", 1, 2.0), ("in", 4, 2.0), ("out", 1, 12.0)]


def test_line_crossing_with_direction_and_counts() -> None:
    eng = engine_for("rules: [{name: north, trigger: cross, line: [[0, 240], [640, 240]], direction: bottom_to_top,"
                     " cooldown_s: 0},\n"
                     "        {name: any, trigger: cross, line: [[0, 240], [640, 240]], cooldown_s: 100}]")
    s = Stream()
    ys = {1: [300, 250, 240, 200, 300], 2: [100, 300, 200, 100]}    # 1: on the line, up, back down
    msgs = [s.det("road", T0 + t, [tracked(tid, 320, y[t]) for tid, y in ys.items() if t < len(y)])
            for t in range(5)]
    fired = [(a.data["rule"], a.data["track_id"], a.data["direction"], a.data["crossings"], a.data["time"] - T0)
             for a in run(eng, msgs)]
    assert fired == [("any", 2, "top_to_bottom", 1, 1.0),
                     ("north", 2, "bottom_to_top", 1, 2.0), ("north", 1, "bottom_to_top", 2, 3.0),
                     ("any", 1, "bottom_to_top", 3, 3.0)]
    # Object 2's second crossing and object 1's last were counted, but cooled down for 'any'.
    assert eng._objects._crossings[("any", "", "road")] == 4


def test_going_round_the_end_of_a_line_is_not_a_crossing() -> None:
    eng = engine_for("rules: [{name: gate, trigger: cross, line: [[300, 200], [300, 300]]}]")
    s = Stream()
    msgs = [s.det("gate", T0 + t, [tracked(3, x, y)]) for t, (x, y) in enumerate([(200, 400), (400, 400),
                                                                                  (400, 250), (200, 250)])]
    alerts = run(eng, msgs)
    assert [(a.data["direction"], a.data["time"] - T0) for a in alerts] == [("right_to_left", 3.0)]


def test_end_event_and_daemon_restart_forget_objects_and_untracked_detections_are_not_objects() -> None:
    eng = engine_for(f"rules: [{{name: loiter, trigger: dwell, zone: {ZONE}, min_duration_s: 2}},\n"
                     f"        {{name: frames, zone: {ZONE}, min_duration_s: 2}}]")
    s = Stream()
    msgs = [s.det("yard", T0, [tracked(1, 100)]), s.det("yard", T0 + 1, [tracked(1, 100)]), end_event(s, "yard", 1)]
    # The same id again after its end is a new object: its dwell starts over.
    msgs += [s.det("yard", T0 + 1.5, [tracked(1, 100)])]
    assert run(eng, msgs) == []
    restarted = Stream(pub="0123456789ab")   # a restarted daemon counts ids from 1 again
    msgs = [restarted.det("yard", T0 + 2 + t, [tracked(1, 100)]) for t in range(2)]
    assert run(eng, msgs) == []
    # Untracked detections: only the per-frame rule sees them.
    msgs = [restarted.det("yard", T0 + 10 + t, [obj(feet_at(100, 400))]) for t in range(3)]
    assert [a.data["rule"] for a in run(eng, msgs)] == ["frames"]


@pytest.mark.parametrize("rule, field, words", [
    ("{name: r, trigger: cross}", "line", "trigger cross needs a line"),
    ("{name: r, trigger: dwell}", "zone", "trigger dwell needs a zone"),
    ("{name: r, line: [[0, 1], [2, 3]]}", "line", "only used with trigger: cross"),
    ("{name: r, trigger: cross, line: [[0, 5], [9, 5]], direction: left_to_right}", "direction",
     "a horizontal line has no left and right"),
    ("{name: r, trigger: cross, line: [[0, 5], [0, 5]]}", "line", "needs two different points"),
    ("{name: r, trigger: enter, zone: [[0, 0], [9, 0], [9, 9]], min_duration_s: 3}", "min_duration_s",
     "use dwell or present"),
    ("{name: r, trigger: present, min_frames: 3}", "min_frames", "only used with trigger: frames"),
])
def test_bad_object_rules_name_the_field_and_line(tmp_path: Path, rule: str, field: str, words: str) -> None:
    path = tmp_path / "alerts.yaml"
    path.write_text(f"silence_s: 5\nrules:\n  - {rule}\n")
    with pytest.raises(ConfigError) as info:
        load_rules(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:3: ") and f"rule 'r' (rules[0]).{field}:" in msg and words in msg, msg


def test_crossing_direction_names_both_axes() -> None:
    down = ((0.0, 0.0), (10.0, 10.0))   # a diagonal: left/right and top/bottom both mean something
    assert crossing_direction(down, 1) == ("right_to_left", "top_to_bottom")
    assert crossing_direction(down, -1) == ("left_to_right", "bottom_to_top")
