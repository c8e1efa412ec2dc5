"""Objects in the output stage: each tracked camera's results through the real ByteTrack,
lifecycle events on ``cam/<id>/event`` through a real PUB socket, and every object ended once,
with its reason, when its camera goes offline, a reload removes, restarts or re-tracks it,
or the daemon shuts down."""

from __future__ import annotations

import threading
import time
from typing import Any

import cv2
import numpy as np
import pytest

from streamd.config import Config, parse_config
from streamd.entities import Detection, Frame, FrameResult
from streamd.pipeline.output import OutputStage
from streamd.pipeline.output.objects import TrackedObjects
from streamd.pipeline.output.snapshots import SnapshotPolicy
from tests.fixtures_daemon import wait_until
from tests.test_output import started_publisher

pytest.importorskip("trackers", reason="the 'tracking' extra (trackers) is not installed")


def config(door: str = "", extra: str = "") -> Config:
    return parse_config("model: {path: m.onnx}\ntracking: {tracker: bytetrack, confirm_frames: 1}\ncameras:\n"
                        f"  - {{id: door, url: rtsp://127.0.0.1/door{door}}}\n"
                        "  - {id: yard, url: rtsp://127.0.0.1/yard}\n"
                        "  - {id: plain, url: rtsp://127.0.0.1/plain, tracking: {tracker: 'off'}}\n" + extra,
                        check_files=False)


class Walk:
    """A person walking right at 40 px/s on one camera, frame by frame at 5 frames/s."""

    def __init__(self, cam: str, mono0: float) -> None:
        self.cam, self.mono0, self.n = cam, mono0, 0

    def next(self, at: float | None = None) -> tuple[FrameResult, Frame]:
        self.n += 1
        t = self.n / 5 if at is None else at - self.mono0
        x = 50 + 40 * t
        img = np.zeros((480, 640, 3), np.uint8)
        img[:, :320] = (0, 0, 255)
        det = Detection(0, "person", 0.9, (x, 100.0, x + 60, 280.0))
        mono = self.mono0 + t
        return (FrameResult(self.cam, self.n, time.time(), mono, 640, 480, (det,), {"infer": 0.01}),
                Frame(self.cam, self.n, time.time(), mono, img))


def feed(stage: OutputStage, walk: Walk, frames: int) -> None:
    for _ in range(frames):
        r, f = walk.next()
        stage.results([r], [f])


def events(sub: Any, camera: str) -> list[dict[str, Any]]:
    return [b for b in sub.of("event") if b["camera"] == camera]


def test_objects_start_and_end_once_through_offline_reload_and_shutdown() -> None:
    pub, sub = started_publisher()
    stage = OutputStage([pub], SnapshotPolicy(lambda cam: None), age_bound=lambda: 60.0,
                        objects=TrackedObjects(config()))
    base = time.monotonic() - 10           # capture times in the past: "now" is after every frame
    door, yard, plain = Walk("door", base), Walk("yard", base), Walk("plain", base)
    try:
        for cam in (door, yard, plain):
            feed(stage, cam, 3)
        wait_until(lambda: len(sub.of("event")) >= 2 and len(sub.of("detections")) >= 9, 10, what="starts")
        dets = {b["camera"]: b["detections"][0] for b in sub.of("detections")}
        assert dets["door"]["track_id"] == 1 and dets["yard"]["track_id"] == 1 and "track_id" not in dets["plain"]
        assert dets["door"]["age_s"] == pytest.approx(0.2) and not events(sub, "plain")

        # The door camera is lost, reported by its decoder thread; a result still in flight
        # (captured before) goes out untracked; frames after it are a new object, id 2.
        t = threading.Thread(target=stage.health, args=("door", "lost", "streaming", "read failed"))
        t.start()
        t.join(5)
        in_flight = door.next()
        stage.results([in_flight[0]], [in_flight[1]])
        door.mono0 = time.monotonic() - 0.8  # back: captured after the outage
        feed(stage, door, 2)
        wait_until(lambda: len(events(sub, "door")) >= 3, 10, what="the door's end and new start")

        # A reload: door's URL changed (it restarts), yard removed, plain tracked now.
        stage.reconfigure(parse_config("model: {path: m.onnx}\ntracking: {tracker: bytetrack, confirm_frames: 1}\n"
                                       "cameras:\n  - {id: door, url: rtsp://127.0.0.1/door2}\n"
                                       "  - {id: plain, url: rtsp://127.0.0.1/plain}\n", check_files=False),
                          restarted=["door"])
        feed(stage, plain, 2)
        stage.shutting_down()
        stage.health("plain", "stopped", "streaming", "stopping")   # cameras stop first at shutdown
        stage.close()
        stage.results(*map(list, zip(plain.next())))                # nothing is tracked after close
        wait_until(lambda: len(sub.of("event")) >= 8, 10, what="every end")
    finally:
        pub.close(5)
        sub.close()

    seen = [(b["camera"], b["event"], b["track_id"], b.get("reason")) for b in sub.of("event")]
    assert seen == [("door", "start", 1, None), ("yard", "start", 1, None),
                    ("door", "end", 1, "camera_offline"), ("door", "start", 2, None),
                    ("yard", "end", 1, "camera_removed"), ("door", "end", 2, "camera_changed"),
                    ("plain", "start", 1, None), ("plain", "end", 1, "shutdown")]
    in_flight_body = [b for b in sub.of("detections") if b["camera"] == "door" and b["frame"] == in_flight[0].frame_no]
    assert "track_id" not in in_flight_body[0]["detections"][0]
    # An end carries its best frame: the left half red, as the frame was.
    ends = [b for b in sub.of("event") if b["event"] == "end"]
    assert all(b["snapshot"]["bytes"] == len(b["_snapshot"]) for b in ends)
    img = cv2.imdecode(np.frombuffer(ends[0]["_snapshot"], np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (480, 640, 3) and img[240, 100, 2] > 200 and img[240, 500, 2] < 50


def test_a_reload_of_zones_or_tracking_alone_does_not_restart_the_camera() -> None:
    from streamd.service.reload import camera_changes
    old = config()
    zones = config(extra="")
    zones = zones.model_copy(update={"cameras": [c.model_copy(update={"zones": {"porch": [(0, 0), (9, 0), (9, 9)]}})
                                                 for c in zones.cameras]})
    assert camera_changes(old, zones) == ([], [], [])
    assert camera_changes(old, config(door="2")) == ([], ["door"], [])


def test_sub_prints_track_ids_and_saves_an_ends_best_frame(tmp_path) -> None:
    from streamd.client.subscriber import format_line, save_snapshot
    ok, jpeg = cv2.imencode(".jpg", np.full((48, 64, 3), 200, np.uint8))
    body = {"v": 1, "type": "event", "event": "end", "seq": 9, "pub": "p", "camera": "door", "track_id": 12,
            "class_id": 0, "label": "person", "duration_s": 3.25, "best": {"confidence": 0.9}, "zones": {},
            "reason": "shutdown", "snapshot": {"format": "jpeg", "part": 2, "bytes": len(jpeg)},
            "publish_ts": time.time(), "_snapshot": jpeg.tobytes()}
    path = save_snapshot(body, tmp_path)
    assert path == tmp_path / "door-object12.jpg" and path.read_bytes() == jpeg.tobytes()
    assert "cam=door EVENT end person#12 for 3.2s best=0.90 zones=- reason=shutdown" in format_line("cam/door/event",
                                                                                                     body)
