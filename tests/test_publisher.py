"""The PUB socket with real SUB sockets on loopback: format, filtering, sequence numbers,
heartbeats, and a subscriber that never reads."""

from __future__ import annotations

import io
import time

import zmq

from streamd import protocol
from streamd.client.subscriber import GapTracker, format_line, run_sub
from streamd.config import PublisherConfig
from streamd.entities import Detection, FrameResult
from streamd.outputs.base import Outbound
from streamd.outputs.zmq_publisher import Publisher
from streamd.pipeline.output.messages import detections_message, health_message
from tests.fixtures_daemon import Collector, free_tcp_port, wait_until


def make_result(cam: str, n: int) -> FrameResult:
    now = time.time()
    return FrameResult(cam, n, now - 0.05, time.monotonic(), 640, 480,
                       (Detection(0, "person", 0.87654, (1.04, 2.0, 300.55, 400.0)),))


def make_message(cam: str, n: int) -> Outbound:
    """A camera's detections message as the output stage builds it."""
    return detections_message(make_result(cam, n))


def start_publisher(**kw: object) -> Publisher:
    cfg = PublisherConfig(endpoint=f"tcp://127.0.0.1:{free_tcp_port()}", **kw)  # type: ignore[arg-type]
    pub = Publisher(cfg)
    pub.start()
    return pub


def test_messages_carry_schema_and_filter_per_camera() -> None:
    pub = start_publisher(heartbeat_s=0.2)
    only_a = Collector(pub.bound_endpoint, [protocol.camera_prefix("a")])
    everything = Collector(pub.bound_endpoint)
    try:
        # Slow joiner: wait until the subscriptions are live (heartbeats arrive).
        wait_until(lambda: everything.of("heartbeat"), 10, what="first heartbeat")
        for i in range(1, 6):
            pub.offer(make_message("a", i))
            pub.offer(make_message("ab", i))
        pub.offer(health_message("a", "lost", "streaming", "connection dropped"))
        wait_until(lambda: len(everything.of("detections")) == 10, 10, what="10 detection messages")
        wait_until(lambda: only_a.of("health"), 10, what="health message for a")
        dets_a = only_a.of("detections")
        assert [m["camera"] for m in dets_a] == ["a"] * 5        # 'ab' is not matched by cam/a/
        m = dets_a[0]
        assert m["v"] == protocol.PROTOCOL_VERSION and m["type"] == "detections"
        assert m["frame"] == 1 and m["width"] == 640 and m["height"] == 480
        assert m["publish_ts"] >= m["capture_ts"]
        assert m["detections"] == [{"class_id": 0, "label": "person", "confidence": 0.8765,
                                    "box": [1.0, 2.0, 300.6, 400.0]}]
        assert [x["cam_seq"] for x in dets_a] == [1, 2, 3, 4, 5]
        seqs = [b["seq"] for b in everything.of()]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        h = only_a.of("health")[0]
        assert (h["state"], h["previous"], h["reason"]) == ("lost", "streaming", "connection dropped")
        assert h["cam_seq"] == 6
    finally:
        pub.stop()
        pub.join(5)
        only_a.close()
        everything.close()
    assert not pub.is_alive()


def test_heartbeat_only_when_idle() -> None:
    hb_s = 0.5
    pub = start_publisher(heartbeat_s=hb_s)
    c = Collector(pub.bound_endpoint)
    try:
        # Idle: heartbeats go out, one per heartbeat_s.
        wait_until(lambda: len(c.of("heartbeat")) >= 3, 10, what="three heartbeats while idle")
        hb = c.of("heartbeat")
        assert hb[0]["pid"] > 0 and hb[0]["host"]
        gaps = [b["publish_ts"] - a["publish_ts"] for a, b in zip(hb, hb[1:])]
        assert all(g >= 0.8 * hb_s for g in gaps), gaps
        # Busy: results every few ms for several heartbeat periods.
        frame = [0]

        def busy_for_a_while() -> bool:
            frame[0] += 1
            pub.offer(make_message("a", frame[0]))
            dets = c.of("detections")
            return len(dets) >= 2 and dets[-1]["publish_ts"] - dets[0]["publish_ts"] >= 4 * hb_s
        wait_until(busy_for_a_while, 30, interval=0.02, what=f"{4 * hb_s:.0f} s of detections")
        frame_end = frame[0]
        wait_until(lambda: c.of("detections") and c.of("detections")[-1]["frame"] == frame_end, 10,
                   what="the last detection")
    finally:
        pub.stop()
        pub.join(5)
        c.close()
    msgs = sorted(c.of(), key=lambda m: m["seq"])
    dets = [m for m in msgs if m["type"] == "detections"]
    during = [(prev, m) for prev, m in zip(msgs, msgs[1:])
              if m["type"] == "heartbeat" and dets[0]["seq"] < m["seq"] < dets[-1]["seq"]]
    # A heartbeat while busy is allowed only after a real pause of heartbeat_s (this box may
    # starve the feeding thread); one that follows a detection closely is the bug.
    early = [round(m["publish_ts"] - prev["publish_ts"], 3) for prev, m in during
             if m["publish_ts"] - prev["publish_ts"] < 0.8 * hb_s]
    assert not early, f"heartbeats sent {early} s after the previous message, while results were flowing"
    # and the busy stretch really was several heartbeat periods with results much closer together
    busy_gaps = sorted(b["publish_ts"] - a["publish_ts"] for a, b in zip(dets, dets[1:]))
    assert busy_gaps[len(busy_gaps) // 2] < hb_s / 4, busy_gaps


def test_subscriber_that_never_reads_does_not_slow_publisher() -> None:
    pub = start_publisher(sndhwm=100)
    ctx = zmq.Context()
    stuck = ctx.socket(zmq.SUB)
    stuck.setsockopt(zmq.RCVHWM, 10)
    stuck.setsockopt(zmq.SUBSCRIBE, b"")
    stuck.connect(pub.bound_endpoint)
    reader = Collector(pub.bound_endpoint)
    try:
        wait_until(lambda: reader.of("heartbeat"), 10, what="reader connected")
        n = 5000
        t0 = time.monotonic()
        for i in range(n):
            pub.offer(make_message("cam", i))
        enqueue_s = time.monotonic() - t0
        # Everything was handed to the socket (the stuck SUB just loses its share).
        wait_until(lambda: pub.sent_detections.get("cam", 0) >= n, 60, what="publisher to send all messages")
        assert pub.dropped == 0
        # The handoff never waits on the socket: 5k results in well under the time a
        # blocked send would take (the reader below receives them too).
        assert enqueue_s < 10, enqueue_s
        assert pub.is_alive()
    finally:
        pub.stop()
        pub.join(5)
        stuck.close(0)
        ctx.term()
        reader.close()


def test_flood_beyond_the_queue_is_dropped_and_counted_not_blocked() -> None:
    pub = start_publisher(queue_size=50)
    try:
        n = 5000
        for i in range(n):
            pub.offer(make_message("cam", i))
        wait_until(lambda: pub.sent_detections.get("cam", 0) + pub.dropped >= n, 30, what="all messages sent or dropped")
        assert pub.dropped > 0 and pub.sent_detections["cam"] + pub.dropped == n
    finally:
        pub.stop()
        pub.join(5)


def test_gap_tracker_reports_missing_and_restart() -> None:
    g = GapTracker(per_camera=False)
    assert g.check({"seq": 1, "pub": "x"}) is None
    assert g.check({"seq": 2, "pub": "x"}) is None
    assert "3 message(s) missing before seq 6" in (g.check({"seq": 6, "pub": "x"}) or "")
    assert g.missing == 3
    assert "restarted" in (g.check({"seq": 1, "pub": "y"}) or "")
    cam = GapTracker(per_camera=True)
    cam.check({"seq": 10, "cam_seq": 1, "camera": "a", "pub": "x"})
    assert cam.check({"seq": 50, "cam_seq": 2, "camera": "a", "pub": "x"}) is None   # other cameras' seq
    assert "missing" in (cam.check({"seq": 51, "cam_seq": 4, "camera": "a", "pub": "x"}) or "")


def test_sub_command_prints_lines() -> None:
    pub = start_publisher(heartbeat_s=0.2)
    out = io.StringIO()
    import threading
    t = threading.Thread(target=run_sub, args=(pub.bound_endpoint, ["a"], False, 3, 20, out), daemon=True)
    t.start()
    try:
        def feed() -> bool:
            pub.offer(make_message("a", 1))
            pub.offer(make_message("b", 1))
            return not t.is_alive()
        wait_until(feed, 20, interval=0.2, what="sub to print 3 detection lines")
    finally:
        pub.stop()
        pub.join(5)
    lines = out.getvalue().splitlines()
    det_lines = [line for line in lines if " cam=" in line]
    assert len(det_lines) == 3 and all("cam=a " in line for line in det_lines), lines
    assert "person:0.88@1,2,300,400" in det_lines[0]


def test_format_line_covers_all_types() -> None:
    base = {"v": 1, "seq": 1, "pub": "x", "publish_ts": time.time()}
    bodies = {
        protocol.TYPE_DETECTIONS: ("cam/a/det", {**base, "type": "detections", "camera": "a", "frame": 7,
                                                 "capture_ts": base["publish_ts"] - 0.25, "width": 640,
                                                 "height": 480, "detections": [
                                                     {"class_id": 0, "label": "person", "confidence": 0.875,
                                                      "box": [1.0, 2.0, 300.6, 400.0]},
                                                     {"class_id": 0, "label": "person", "confidence": 0.5,
                                                      "box": [10.0, 20.0, 30.0, 40.0], "track_id": 12,
                                                      "first_seen_ts": 1.0, "age_s": 2.5}]}),
        protocol.TYPE_HEALTH: ("cam/a/health", {**base, "type": "health", "camera": "a", "state": "lost",
                                                "previous": "streaming", "reason": "r"}),
        protocol.TYPE_EVENT: ("cam/a/event", {**base, "type": "event", "event": "end", "camera": "a",
                                              "track_id": 12, "class_id": 1, "label": "Fall", "duration_s": 26.33,
                                              "best": {"confidence": 0.91}, "zones": {"porch": 24.1},
                                              "reason": "lost"}),
        protocol.TYPE_HEARTBEAT: ("sys/heartbeat", {**base, "type": "heartbeat", "host": "h", "pid": 1}),
        protocol.TYPE_STATS: ("sys/stats", {**base, "type": "stats", "uptime_s": 12.5, "cameras": {
            "a": {"state": "streaming", "published": 40}, "b": {"state": "reconnecting", "published": 0}}}),
    }
    # every message type the protocol defines has a case here, so a new type cannot go unseen
    types = {v for k, v in vars(protocol).items() if k.startswith("TYPE_")}
    assert types == set(bodies), f"no example body for {types - set(bodies)}"
    lines = {t: format_line(topic, body) for t, (topic, body) in bodies.items()}
    for t, line in lines.items():
        assert "{" not in line, f"{t} fell through to the raw JSON form: {line}"
    assert "cam=a frame=7 640x480 age=250ms n=2 person:0.88@1,2,300,400 person#12:0.50@10,20,30,40" \
        in lines["detections"]
    assert "cam=a EVENT end Fall#12 for 26.3s best=0.91 zones=porch:24.1s reason=lost" in lines["event"]
    assert "cam=a HEALTH streaming -> lost (r)" in lines["health"]
    assert "heartbeat host=h pid=1" in lines["heartbeat"]
    assert "stats uptime=12.5s a:streaming/40 b:reconnecting/0" in lines["stats"]


def test_a_detection_older_than_the_bound_at_the_socket_is_not_sent() -> None:
    """The age bound is judged once more at the socket: a message whose frame aged past it
    while waiting for the publisher's thread is counted as stale, not sent as fresh."""
    stale: list[str] = []
    cfg = PublisherConfig(endpoint=f"tcp://127.0.0.1:{free_tcp_port()}", heartbeat_s=0.2)
    pub = Publisher(cfg, on_stale=stale.append)
    pub.start()
    sub = Collector(pub.bound_endpoint)
    try:
        wait_until(lambda: sub.of("heartbeat"), 10, what="first heartbeat")
        old = make_result("a", 1)
        old = FrameResult(old.camera_id, 1, old.capture_ts - 5, old.capture_mono - 5, 640, 480, old.detections)
        pub.offer(detections_message(old, max_age_s=2.0))
        pub.offer(detections_message(make_result("a", 2), max_age_s=2.0))
        wait_until(lambda: sub.of("detections"), 10, what="the fresh detection")
        wait_until(lambda: stale, 10, what="the stale one to be counted")
    finally:
        pub.stop()
        pub.join(5)
        sub.close()
    assert [m["frame"] for m in sub.of("detections")] == [2]
    assert stale == ["a"] and pub.stale == 1


def test_sub_exits_non_zero_when_nothing_arrived(capsys) -> None:
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"        # nobody publishes there
    assert run_sub(endpoint, None, False, None, 0.5, io.StringIO()) == 1
    assert f"no message from {endpoint}" in capsys.readouterr().err
