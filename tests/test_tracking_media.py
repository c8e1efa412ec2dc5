"""Tracking measured on ground-truth sequences through the real model.

tools/make_tracking_media.py renders people cut from bus.jpg walking known paths (two
crossing, one leaving and coming back) at 5 and 15 frames/s with their boxes written beside
the frames. Each frame goes through letterbox -> ONNX Runtime (the Normal/Fall YOLOv8s) ->
postprocess -> the camera's tracker, at its capture time, and ``motmetrics`` scores the ids.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import pytest

from streamd.backends import open_backend
from streamd.config import parse_config
from streamd.entities import FrameResult
from streamd.pipeline.postprocess import PostprocessParams, postprocess
from streamd.pipeline import events as ev
from streamd.pipeline.preprocess import letterbox_batch
from streamd.pipeline.tracking import CameraTracker

pytest.importorskip("trackers", reason="the 'tracking' extra (trackers) is not installed")
pytest.importorskip("motmetrics", reason="motmetrics (the 'test' extra) is not installed")

REPO = Path(__file__).resolve().parent.parent
MEDIA = REPO / ".cache" / "test-media"


def load_tool() -> ModuleType:
    from tests.fixtures_rtsp import load_make_test_media
    tool: ModuleType = load_make_test_media().load_sibling("make_tracking_media")
    return tool


# The left half of the frame, for object events' zone times.
LEFT = [[0, 0], [320, 0], [320, 480], [0, 480]]


def track_sequence(seq: Any, model: Path, tool: ModuleType, drop: float = 0.0
                   ) -> tuple[dict[str, float], dict[int, list[Any]], list[ev.ObjectEvent]]:
    """Run one sequence through the real pipeline stages, the tracker and the object events;
    its scores, the tracks per frame and the events. With ``drop``, that share of the frames
    (at random) never reaches the model, as when frames are dropped to stay fresh; the scores
    are then of the frames that did."""
    cfg = parse_config("model: {path: m.onnx}\ntracking: {tracker: bytetrack}\n"
                       f"cameras: [{{id: gt, url: rtsp://127.0.0.1/gt, zones: {{left: {LEFT}}}}}]\n",
                       check_files=False)
    tracker = CameraTracker("gt", cfg.tracking_for("gt"))
    events = ev.ObjectEvents(cfg)
    happened: list[ev.ObjectEvent] = []
    backend = open_backend(model, threads=2)
    try:
        net_h, net_w = backend.info.input_hw
        rnd = random.Random(seq.fps)
        kept = [k for k in range(seq.frame_count) if k == 0 or rnd.random() >= drop]
        paths = seq.frame_paths()
        hyp: dict[int, list[Any]] = {}
        for start in range(0, len(kept), 4):
            chunk = kept[start:start + 4]
            images = [cv2.imread(str(paths[k])) for k in chunk]
            batch, boxes = letterbox_batch(images, net_h, net_w)
            dets = postprocess(backend.infer(batch), backend.info.output_layout, boxes, backend.info.names,
                               PostprocessParams(conf=0.25))
            for k, frame_dets, image in zip(chunk, dets, images):
                t = k / seq.fps
                out = tracker.update(FrameResult("gt", k, 1_764_000_000 + t, t, seq.size[0], seq.size[1],
                                                 frame_dets))
                happened += events.on_frame(out, image)
                hyp[k] = [(d.track_id, d.box) for d in out.result.detections if d.track_id is not None]
    finally:
        backend.close()
    happened += events.close()
    truth = {k: boxes for k, boxes in seq.ground_truth().items() if k in hyp}
    return tool.score(truth, hyp, seq.frame_count), hyp, happened


def left_seconds(track: list[tuple[float, tuple[float, float, float, float]]]) -> float:
    """Seconds an object's bottom-centre spent in LEFT, counted the way events count it."""
    inside = [(t, (b[0] + b[2]) / 2 <= 320) for t, b in track]
    return sum(t1 - t0 for (t0, in0), (t1, in1) in zip(inside, inside[1:]) if in0 and in1)


@pytest.mark.slow
@pytest.mark.parametrize("fps, drop", [(5, 0.0), (15, 0.0), (15, 0.5)])
def test_ids_hold_through_crossings_and_exits_on_ground_truth(fps: int, drop: float, fall_onnx_320: Path) -> None:
    tool = load_tool()
    seq = tool.make_sequences(MEDIA, rates=(fps,), h264=False)[fps]
    scores, hyp, events = track_sequence(seq, fall_onnx_320, tool, drop)
    print(f"{fps} fps, {drop:.0%} dropped: {scores}")
    assert scores["num_unique_objects"] == 4
    assert scores["idf1"] >= 0.9, scores
    assert scores["num_switches"] <= tool.CROSSINGS, scores

    # One object per person and visit: one start and one end each, ends naming why.
    starts = [e.track_id for e in events if e.kind == "start"]
    ends = {e.track_id: e for e in events if e.kind == "end"}
    assert len(starts) == len(set(starts)) == len(ends) == 4 and set(starts) == set(ends), events
    assert sorted(e.reason for e in ends.values()) == ["lost", "lost", "lost", "shutdown"]
    # Time in the left half, by the tracker's boxes, is what the events report.
    for tid, end in ends.items():
        track = [(k / seq.fps, b) for k in sorted(hyp) for i, b in hyp[k] if i == tid]
        assert end.zones.get("left", 0.0) == pytest.approx(left_seconds(track), abs=1e-6)
        assert end.duration_s == pytest.approx(track[-1][0] - track[0][0], abs=1e-6)
        assert end.jpeg is not None and end.jpeg[:2] == b"\xff\xd8"
