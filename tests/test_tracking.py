"""Per-camera tracking (streamd.pipeline.tracking) and object lifecycle events (.events).

The tracker is the real ByteTrack of the ``trackers`` package, fed boxes moving along known
paths; the ground-truth sequences through the real model are in test_tracking_media.py.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from streamd.config import Config, parse_config
from streamd.entities import Detection, FrameResult
from streamd.errors import ConfigError
from streamd.pipeline import events as ev
from streamd.pipeline.tracking import CameraTracker, TrackedFrame, Tracking

pytest.importorskip("trackers", reason="the 'tracking' extra (trackers) is not installed")

T0 = 1_764_000_000.0   # wall clock of the first frame


def config(text: str = "", **tracking: object) -> Config:
    opts = "".join(f"\n  {k}: {v}" for k, v in tracking.items())
    return parse_config(f"model: {{path: m.onnx}}\ntracking:\n  tracker: bytetrack{opts}\n"
                        f"cameras:\n  - id: c\n    url: rtsp://127.0.0.1/c\n{text}", check_files=False)


def frame(t: float, boxes: list[tuple[float, float, float, float]], conf: float = 0.8, cam: str = "c",
          no: int = 0) -> FrameResult:
    dets = tuple(Detection(0, "person", conf, b) for b in boxes)
    return FrameResult(cam, no, T0 + t, t, 640, 480, dets)


def walk(x0: float, y: float, speed: float, t: float) -> tuple[float, float, float, float]:
    x = x0 + speed * t
    return (x, y, x + 60, y + 180)


# --- config ---------------------------------------------------------------------------------

def test_camera_tracking_overrides_only_the_keys_it_names() -> None:
    cfg = parse_config("model: {path: m.onnx}\ntracking: {tracker: bytetrack, track_buffer_s: 3}\n"
                       "cameras:\n  - {id: a, url: rtsp://h/a}\n"
                       "  - {id: b, url: rtsp://h/b, tracking: {tracker: 'off'}}\n"
                       "  - {id: c, url: rtsp://h/c, tracking: {high_conf: 0.6}}\n", check_files=False)
    assert cfg.tracking_for("a").tracker == "bytetrack" and cfg.tracking_for("a").track_buffer_s == 3
    assert cfg.tracking_for("b").tracker == "off"
    assert cfg.tracking_for("c").high_conf == 0.6 and cfg.tracking_for("c").track_buffer_s == 3
    assert parse_config("model: {path: m.onnx}\n", check_files=False).tracking.tracker == "off"


@pytest.mark.parametrize("text, field, line, words", [
    ("tracking:\n  tracker: deepsort\n", "tracking.tracker", 3, "bytetrack"),
    ("tracking:\n  track_buffer_s: 0\n", "tracking.track_buffer_s", 3, "greater than 0"),
    ("cameras:\n  - id: c\n    url: rtsp://h/c\n    zones:\n      door: [[0, 0], [10, 0]]\n",
     "cameras[0].zones", 5, "at least 3 points"),
    ("cameras:\n  - id: c\n    url: rtsp://h/c\n    zones:\n      bow: [[0, 0], [10, 10], [10, 0], [0, 30]]\n",
     "cameras[0].zones", 5, "edges cross"),
    ("cameras:\n  - id: c\n    url: rtsp://h/c\n    tracking:\n      update_interval_s: -1\n",
     "cameras[0].tracking.update_interval_s", 6, "greater than or equal"),
])
def test_bad_tracking_config_names_field_and_line(text: str, field: str, line: int, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config("model: {path: m.onnx}\n" + text, source="s.yaml", check_files=False)
    assert err.value.field == field and err.value.line == line, str(err.value)
    assert words in str(err.value)


def test_example_config_documents_tracking() -> None:
    example = Path(__file__).resolve().parent.parent / "configs" / "example.yaml"
    cfg = parse_config(example.read_text(), check_files=False, env={"DOOR_PASSWORD": "x", "YARD_PASSWORD": "y"})
    assert cfg.tracking.tracker == "bytetrack"
    assert cfg.camera("door").zones and cfg.tracking_for("door").update_interval_s > 0


# --- tracker --------------------------------------------------------------------------------

@pytest.mark.parametrize("fps, drop", [(2, 0.0), (5, 0.0), (15, 0.0), (25, 0.0), (15, 0.6), (25, 0.8)])
def test_two_people_crossing_keep_their_ids_at_any_rate_and_with_dropped_frames(fps: int, drop: float) -> None:
    tracker = CameraTracker("c", config().tracking_for("c"))
    rnd = random.Random(fps)
    seen: dict[str, set[int | None]] = {"a": set(), "b": set()}
    for k in range(int(8 * fps)):
        if k > 2 and rnd.random() < drop:
            continue   # dropped to stay fresh: the tracker only sees later capture times
        t = k / fps
        out = tracker.update(frame(t, [walk(20, 100, 60, t), walk(560, 130, -60, t)], no=k))
        assert not out.ended
        a, b = out.result.detections
        seen["a"].add(a.track_id)
        seen["b"].add(b.track_id)
        if a.track_id is not None:
            assert a.first_seen_ts is not None and 0 <= a.age_s <= t + 1e-6
    ids_a, ids_b = seen["a"] - {None}, seen["b"] - {None}
    assert len(ids_a) == 1 and len(ids_b) == 1 and ids_a != ids_b, seen


@pytest.mark.parametrize("fps", [2, 5, 25])
def test_track_buffer_is_seconds_whatever_the_frame_rate(fps: int) -> None:
    """Unseen for up to 1.5 s with a 2 s buffer: same id. Unseen for 3 s: the track ends at
    the first frame more than 2 s after its object was last seen, and it comes back as new."""
    buffer_s = 2.0
    tracker = CameraTracker("c", config(track_buffer_s=buffer_s).tracking_for("c"))
    ids: list[int | None] = []
    ended_gap: list[float] = []
    last_seen = 0.0
    for k in range(int(11 * fps)):
        t = k / fps
        hidden = 2.0 <= t < 2.6 or 5.0 <= t < 8.0
        out = tracker.update(frame(t, [] if hidden else [walk(100, 100, 10, t)], no=k))
        ids += [d.track_id for d in out.result.detections]
        if out.ended:
            ended_gap.append(t - last_seen)
        if not hidden:
            last_seen = t
    kept = [i for i in ids if i is not None]
    assert len(set(kept)) == 2, ids                 # one across the short gap, a new one after the long
    assert len(ended_gap) == 1 and buffer_s < ended_gap[0] <= buffer_s + 1.0 / fps + 1e-6, ended_gap


@pytest.mark.parametrize("fps", [5, 15])
def test_a_person_falling_keeps_the_id(fps: int) -> None:
    """Standing (60x180) to lying (180x60) in 0.4 s, as the fall model boxes a person going down."""
    tracker = CameraTracker("c", config().tracking_for("c"))
    ids = []
    for k in range(int(6 * fps)):
        t = k / fps
        f = min(max((t - 2) / 0.4, 0.0), 1.0)
        w, h = 60 + 120 * f, 180 - 120 * f
        out = tracker.update(frame(t, [(300 - w / 2 + 20 * t, 400 - h, 300 + w / 2 + 20 * t, 400)], no=k))
        ids.append(out.result.detections[0].track_id)
    assert set(ids[2:]) == {1}, ids


def test_weak_detections_stay_untracked_and_ids_are_never_reused() -> None:
    cfg = config()
    tracking = Tracking(cfg)
    for k in range(5):
        out = tracking.update(frame(k / 5, [walk(100, 100, 0, 0)], conf=0.3))
        assert [d.track_id for d in out.result.detections] == [None]   # kept, not tracked
    first = [tracking.update(frame(1 + k / 5, [walk(300, 100, 0, 0)])) for k in range(3)]
    old = first[-1].result.detections[0].track_id
    assert old is not None and tracking.reset("c") == (old,)
    again = [tracking.update(frame(3 + k / 5, [walk(300, 100, 0, 0)])) for k in range(3)]
    assert again[-1].result.detections[0].track_id == old + 1
    # a reload that changes the camera's tracking ends its tracks and keeps counting
    ended = tracking.configure(config(track_buffer_s=2))
    assert ended == {"c": (old + 1,)}
    assert [tracking.update(frame(4 + k / 5, [walk(300, 100, 0, 0)])).result.detections[0].track_id
            for k in range(3)][-1] == old + 2
    # an untracked camera's results pass through unchanged
    other = frame(0, [walk(0, 0, 0, 0)], cam="elsewhere")
    assert tracking.update(other).result is other


def test_a_bad_box_leaves_the_frame_untracked_and_the_tracker_working() -> None:
    tracker = CameraTracker("c", config().tracking_for("c"))
    tracker.update(frame(0.0, [walk(100, 100, 0, 0)]))
    bad = tracker.update(frame(0.2, [(float("nan"), 0.0, 10.0, 10.0)]))
    assert bad.result.detections[0].track_id is None and tracker.errors == 1
    late = tracker.update(frame(0.1, [walk(100, 100, 0, 0)]))   # older than one already seen
    assert late.result.detections[0].track_id is None
    good = [tracker.update(frame(0.4 + k / 5, [walk(100, 100, 0, 0)])) for k in range(2)]
    assert good[-1].result.detections[0].track_id == 1


# --- events ---------------------------------------------------------------------------------

ZONED = "    zones:\n      left: [[0, 0], [320, 0], [320, 480], [0, 480]]\n" \
        "      right: [[320, 0], [640, 0], [640, 480], [320, 480]]\n"


def run_events(cfg: Config, frames: list[FrameResult], images: bool = False,
               encode: ev.JpegEncoder = ev.encode_jpeg) -> tuple[Tracking, ev.ObjectEvents, list[ev.ObjectEvent]]:
    tracking, events = Tracking(cfg), ev.ObjectEvents(cfg, encode)
    out: list[ev.ObjectEvent] = []
    rnd = np.random.default_rng(0)
    for f in frames:
        image = rnd.integers(0, 255, (f.height, f.width, 3), dtype=np.uint8) if images else None
        out += events.on_frame(tracking.update(f), image)
    return tracking, events, out


def test_object_lifecycle_start_updates_end_with_zone_times_and_best_box() -> None:
    cfg = config(ZONED, update_interval_s=1.0, track_buffer_s=0.5)
    fps = 5
    frames = []
    for k in range(int(6 * fps)):
        t = k / fps
        conf = 0.9 if k == 12 else 0.7
        frames.append(frame(t, [walk(100, 100, 80, t)] if t < 5 else [], conf=conf, no=k))
    _, events, out = run_events(cfg, frames, images=True)
    kinds = [e.kind for e in out]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("start") == kinds.count("end") == 1
    assert 3 <= kinds.count("update") <= 5                  # throttled to one per second of 5 s
    end = out[-1]
    assert end.reason == ev.LOST and end.track_id == out[0].track_id
    assert end.best.confidence == pytest.approx(0.9) and end.best.capture_ts == pytest.approx(T0 + 12 / fps)
    # bottom-centre x = 130 + 80 t: in 'left' until t = 2.375 s, then 'right' until last seen (4.8 s)
    first_t, last_t = end.first_seen_ts - T0, end.last_seen_ts - T0
    assert last_t == pytest.approx(4.8) and end.duration_s == pytest.approx(last_t - first_t)
    assert end.zones["left"] == pytest.approx(2.2 - first_t, abs=0.01)
    assert end.zones["right"] == pytest.approx(4.8 - 2.4, abs=0.01)
    assert end.in_zones == ("right",)
    assert end.jpeg is not None and end.jpeg[:2] == b"\xff\xd8" and len(end.jpeg) <= 200_000
    body = end.body()
    assert body["snapshot"]["bytes"] == len(end.jpeg) and body["event"] == "end" and body["reason"] == "lost"
    assert events.live("c") == ()


def test_end_jpeg_is_scaled_down_to_the_limit() -> None:
    limit = 6000
    cfg = config(snapshot_max_bytes=limit)
    frames = [frame(k / 5, [walk(100, 100, 0, 0)]) for k in range(4)]
    _, events, _ = run_events(cfg, frames, images=True)   # random pixels: the hardest to compress
    (end,) = events.close()
    assert end.jpeg is not None and len(end.jpeg) <= limit and end.reason == ev.SHUTDOWN
    import cv2
    small = cv2.imdecode(np.frombuffer(end.jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert small is not None and small.shape[1] < 640


def test_every_start_gets_exactly_one_end_through_loss_offline_reload_and_shutdown() -> None:
    rnd = random.Random(7)
    text = "  - {id: d, url: rtsp://127.0.0.1/d}\n"
    cfg = config(text, update_interval_s=0.5, track_buffer_s=1.5)
    tracking, events = Tracking(cfg), ev.ObjectEvents(cfg)
    out: list[ev.ObjectEvent] = []
    people = {cam: [(rnd.uniform(0, 500), rnd.uniform(0, 300), rnd.uniform(-80, 80)) for _ in range(4)]
              for cam in ("c", "d")}
    t = 0.0
    for step in range(400):
        t += rnd.choice([0.04, 0.2, 0.5])
        cam = rnd.choice(["c", "d"])
        visible = [walk(x % 560, y, v, t % 5) for x, y, v in people[cam] if rnd.random() < 0.8]
        out += events.on_frame(tracking.update(frame(t, visible, cam=cam, no=step)))
        if step == 150:                         # camera d goes offline
            tracking.reset("d")
            out += events.end_camera("d", ev.CAMERA_OFFLINE)
        if step == 250:                         # a reload changes c's settings
            new = config(text, update_interval_s=0.5, track_buffer_s=2.0)
            out += events.reconfigure(new, tracking.configure(new))
        if step == 320:                         # a reload removes camera d
            new = config(update_interval_s=0.5, track_buffer_s=2.0)
            out += events.reconfigure(new, tracking.configure(new))
    out += events.close()
    starts = [(e.camera_id, e.track_id) for e in out if e.kind == "start"]
    ends = [(e.camera_id, e.track_id) for e in out if e.kind == "end"]
    assert len(starts) == len(set(starts)) and sorted(starts) == sorted(ends)
    reasons = {e.reason for e in out if e.kind == "end"}
    assert reasons == {ev.LOST, ev.CAMERA_OFFLINE, ev.TRACKING_CHANGED, ev.CAMERA_REMOVED, ev.SHUTDOWN}
    # no event about an object after its end
    ended: set[tuple[str, int]] = set()
    for e in out:
        assert (e.camera_id, e.track_id) not in ended
        if e.kind == "end":
            ended.add((e.camera_id, e.track_id))


def test_track_fields_appear_in_the_detections_body_only_when_tracked() -> None:
    from streamd.pipeline.output.messages import detection_json
    plain = Detection(0, "person", 0.8, (1.0, 2.0, 3.0, 4.0))
    assert set(detection_json(plain)) == {"class_id", "label", "confidence", "box"}
    tracker = CameraTracker("c", config().tracking_for("c"))
    out: TrackedFrame | None = None
    for k in range(3):
        out = tracker.update(frame(k / 5, [walk(100, 100, 0, 0)]))
    assert out is not None
    body = detection_json(out.result.detections[0])
    assert body["track_id"] == 1 and body["first_seen_ts"] == pytest.approx(T0 + 0.2)
    assert body["age_s"] == pytest.approx(0.2)


def test_bytetrack_without_the_library_is_a_config_error_naming_the_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    monkeypatch.setitem(sys.modules, "trackers", None)   # as on a box without the 'tracking' extra
    text = "model: {path: m.onnx}\ncameras:\n  - id: c\n    url: rtsp://h/c\n    tracking:\n      tracker: bytetrack\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text, source="s.yaml", check_files=False)
    assert err.value.field == "cameras[0].tracking.tracker" and err.value.line == 6
    assert "streamd[tracking]" in str(err.value)
    # a disabled camera, or tracking off, needs no library
    parse_config(text.replace("tracker: bytetrack", "tracker: 'off'"), check_files=False)
