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


def track_sequence(seq: Any, model: Path, tool: ModuleType, drop: float = 0.0) -> dict[str, float]:
    """Run one sequence through the real pipeline stages and the tracker; its scores. With
    ``drop``, that share of the frames (at random) never reaches the model, as when frames are
    dropped to stay fresh; the scores are then of the frames that did."""
    tracking = parse_config("model: {path: m.onnx}\ntracking: {tracker: bytetrack}\n"
                            "cameras: [{id: gt, url: rtsp://127.0.0.1/gt}]\n", check_files=False)
    tracker = CameraTracker("gt", tracking.tracking_for("gt"))
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
            for k, frame_dets in zip(chunk, dets):
                t = k / seq.fps
                out = tracker.update(FrameResult("gt", k, 1_764_000_000 + t, t, seq.size[0], seq.size[1],
                                                 frame_dets))
                hyp[k] = [(d.track_id, d.box) for d in out.result.detections if d.track_id is not None]
    finally:
        backend.close()
    truth = {k: boxes for k, boxes in seq.ground_truth().items() if k in hyp}
    return tool.score(truth, hyp, seq.frame_count)


@pytest.mark.slow
@pytest.mark.parametrize("fps, drop", [(5, 0.0), (15, 0.0), (15, 0.5)])
def test_ids_hold_through_crossings_and_exits_on_ground_truth(fps: int, drop: float, fall_onnx_320: Path) -> None:
    tool = load_tool()
    seq = tool.make_sequences(MEDIA, rates=(fps,), h264=False)[fps]
    scores = track_sequence(seq, fall_onnx_320, tool, drop)
    print(f"{fps} fps, {drop:.0%} dropped: {scores}")
    assert scores["num_unique_objects"] == 4
    assert scores["idf1"] >= 0.9, scores
    assert scores["num_switches"] <= tool.CROSSINGS, scores
