"""The output stage: results become protocol messages, snapshots are attached where cameras
want them, requests are answered once through their front door, and every message is
fanned out to each transport. Real PUB sockets and real SUB readers on loopback."""

from __future__ import annotations

import time
from typing import Any

import cv2
import numpy as np

from streamd.config import CameraConfig, PublisherConfig
from streamd.entities import Detection, Frame, FrameResult, Request, RequestResult
from streamd.outputs.base import Outbound
from streamd.outputs.zmq_publisher import Publisher
from streamd.pipeline.output import OutputStage
from streamd.pipeline.output.snapshots import SnapshotPolicy
from tests.fixtures_daemon import Collector, free_tcp_port, wait_until

PERSON = Detection(0, "person", 0.8, (10.0, 20.0, 110.0, 220.0))


def started_publisher() -> tuple[Publisher, Collector]:
    pub = Publisher(PublisherConfig(endpoint=f"tcp://127.0.0.1:{free_tcp_port()}", heartbeat_s=0.2))
    pub.start()
    sub = Collector(pub.bound_endpoint)
    wait_until(lambda: sub.of("heartbeat"), 10, what="the reader to be subscribed")
    return pub, sub


def result(cam: str, n: int, mono: float, dets: tuple[Detection, ...] = (PERSON,)) -> tuple[FrameResult, Frame]:
    img = np.zeros((120, 160, 3), np.uint8)
    img[:, :80] = (0, 0, 255)                          # left half red: the JPEG must be this frame
    return (FrameResult(cam, n, time.time(), mono, 160, 120, dets, {"infer": 0.01}),
            Frame(cam, n, time.time(), mono, img))


class FrontDoor:
    """Answers each task once, as a real front door does, and keeps what it sent."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.answered: set[str] = set()

    def answer(self, result: RequestResult, body: dict[str, Any]) -> bool:
        if result.request.task_id in self.answered:
            return False
        self.answered.add(result.request.task_id)
        self.sent.append(body)
        return True

    def fail(self, request: Request, reason: str) -> None:
        self.answered.add(request.task_id)


def test_snapshots_follow_each_cameras_policy_and_carry_its_frame() -> None:
    cams = {"door": CameraConfig(id="door", url="rtsp://127.0.0.1/x", snapshot="on_detection",
                                 snapshot_interval_s=10),
            "yard": CameraConfig(id="yard", url="rtsp://127.0.0.1/y")}          # snapshot off by default
    pub, sub = started_publisher()
    stage = OutputStage([pub], SnapshotPolicy(cams.get), age_bound=lambda: 5.0)
    try:
        now = time.monotonic()
        batch = [result("door", 1, now, dets=()), result("door", 2, now), result("door", 3, now + 1),
                 result("yard", 1, now)]
        stage.results([r for r, _ in batch], [f for _, f in batch])
        wait_until(lambda: len(sub.of("detections")) == 4, 10, what="four detections messages")
    finally:
        pub.close(5)
        sub.close()
    with_snap = [(m["camera"], m["frame"]) for m in sub.of("detections") if "_snapshot" in m]
    # no detection -> none; the first with one -> a snapshot; 1 s later is inside the interval
    assert with_snap == [("door", 2)]
    m = next(m for m in sub.of("detections") if "_snapshot" in m)
    assert m["snapshot"]["bytes"] == len(m["_snapshot"])
    img = cv2.imdecode(np.frombuffer(m["_snapshot"], np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (120, 160, 3) and img[60, 20, 2] > 200 and img[60, 140, 2] < 50
    assert m["detections"] == [{"class_id": 0, "label": "person", "confidence": 0.8,
                                "box": [10.0, 20.0, 110.0, 220.0]}]


def test_a_request_result_is_answered_and_published_once_on_its_clients_topic() -> None:
    pub, sub = started_publisher()
    stage = OutputStage([pub], SnapshotPolicy(lambda cam: None), age_bound=lambda: 5.0)
    door = FrontDoor()
    img = np.zeros((90, 70, 3), np.uint8)
    req = Request("t1", img, time.time(), time.monotonic() - 0.2, reply_to=door, client_id="bell", request_id=7)
    rr = RequestResult(req, (PERSON,), queue_s=0.05, infer_s=0.1, done_mono=time.monotonic())
    try:
        stage.request_results([rr])
        stage.request_results([rr])                  # already answered: neither sent nor published again
        wait_until(lambda: sub.of("result"), 10, what="the published result")
        wait_until(lambda: len(sub.of("heartbeat")) >= 3, 10, what="a few heartbeats after it")
    finally:
        pub.close(5)
        sub.close()
    (published,) = sub.of("result")
    assert [t for t, b, _ in sub.messages if b["type"] == "result"] == ["req/bell/result"]
    assert len(door.sent) == 1 and "seq" not in door.sent[0]        # the reply is not the PUB envelope
    for body in (published, door.sent[0]):
        assert (body["task_id"], body["request_id"], body["client_id"]) == ("t1", 7, "bell")
        assert (body["width"], body["height"]) == (70, 90)
        assert body["detections"][0]["label"] == "person"
        assert body["timings_ms"]["queue"] == 50.0 and body["timings_ms"]["total"] >= 200


class Broken:
    name = "broken"

    def offer(self, msg: Outbound) -> None:
        raise RuntimeError("this transport is broken")

    def close(self, timeout_s: float = 2.0) -> None:
        pass

    def counters(self) -> dict[str, int]:
        return {}


def test_every_transport_gets_every_message_and_a_broken_one_costs_only_itself() -> None:
    (a, sub_a), (b, sub_b) = started_publisher(), started_publisher()
    stage = OutputStage([a, Broken(), b], SnapshotPolicy(lambda cam: None), age_bound=lambda: 5.0)
    try:
        r, f = result("door", 1, time.monotonic())
        stage.results([r], [f])
        stage.health("door", "lost", "streaming", "read failed for rtsp://admin:hunter2@10.0.0.5/live")
        for sub in (sub_a, sub_b):
            wait_until(lambda sub=sub: sub.of("detections") and sub.of("health"), 10, what="both messages")
    finally:
        a.close(5)
        b.close(5)
        sub_a.close()
        sub_b.close()
    for sub in (sub_a, sub_b):
        assert "hunter2" not in sub.of("health")[0]["reason"]
    # each transport numbered its own copy: the body handed out is never changed in place
    assert {sub_a.of("detections")[0]["pub"], sub_b.of("detections")[0]["pub"]} == {a.publisher_id, b.publisher_id}
