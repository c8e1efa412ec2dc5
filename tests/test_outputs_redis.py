"""Redis Streams output against a real redis-server: a real daemon's entries, MAXLEN trimming,
a consumer group that resumes from its last id, Redis going away and coming back."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from streamd.config import RedisOutputConfig
from streamd.outputs.base import Outbound
from tests.fixtures_brokers import redis_factory  # noqa: F401 - fixture
from tests.fixtures_daemon import wait_until
from tests.test_daemon import base_config

redis = pytest.importorskip("redis", reason="redis-py is not installed (pip install -e '.[test]')")
from streamd.outputs.redis_streams import RedisStreamsOutput  # noqa: E402

ORIGIN = "edge-1"
STREAM = f"streamd:{ORIGIN}:detections"


def decoded(entry: tuple[bytes, dict[bytes, bytes]]) -> dict[str, Any]:
    return {k.decode(): v.decode() for k, v in entry[1].items()}


@pytest.mark.slow
def test_daemon_appends_entries_trimmed_by_maxlen_and_a_consumer_group_resumes_from_its_last_id(
        fall_onnx_320: Path, test_media, daemon_factory, redis_factory) -> None:  # noqa: F811
    # Small stream nodes, so MAXLEN ~ trims at a granularity this short test can see.
    server = redis_factory(stream_node_max_entries=10)
    r = redis.Redis.from_url(server.url)
    r.xgroup_create(STREAM, "alerts", id="0", mkstream=True)
    cfg = base_config(fall_onnx_320, [{"id": "bus", "url": str(test_media["bus"].mp4), "loop": True, "fps": 4}])
    cfg["publisher"]["name"] = ORIGIN
    cfg["outputs"] = {"redis": {"url": server.url, "maxlen": 20}}
    d = daemon_factory(cfg)

    def read(client: Any, start: str, count: int) -> list[Any]:
        got = client.xreadgroup("alerts", "worker-1", {STREAM: start}, count=count, block=500)
        return got[0][1] if got else []

    first = wait_until(lambda: read(r, ">", 5), 90, what=f"entries in {STREAM}\n{d.log()[-2000:]}")
    for entry in first:
        f = decoded(entry)
        body = json.loads(f["body"])
        assert (f["type"], f["camera"], f["origin"]) == ("detections", "bus", ORIGIN)
        assert int(f["count"]) == len(body["detections"])
        assert body["v"] == 1 and body["camera"] == "bus" and body["origin"] == ORIGIN and body["width"] == 640
    r.xack(STREAM, "alerts", *[e[0] for e in first])
    last_id = first[-1][0]
    r.close()

    # The consumer is away while the daemon appends more; then it comes back on a new connection.
    probe = redis.Redis.from_url(server.url)
    wait_until(lambda: len(probe.xrange(STREAM, min=b"(" + last_id, count=3)) == 3, 30, what="more entries")
    back = redis.Redis.from_url(server.url)
    assert read(back, "0", 10) == [], "everything read before was acknowledged: nothing pending"
    expected = back.xrange(STREAM, min=b"(" + last_id, count=3)
    resumed = read(back, ">", 3)
    assert [e[0] for e in resumed] == [e[0] for e in expected], "resumes right after its last id"
    assert all(json.loads(decoded(e)["body"])["frame"] > json.loads(decoded(first[-1])["body"])["frame"]
               for e in resumed)

    # MAXLEN ~ 20: once well over 20 entries went in, the stream holds about 20 (whole nodes of 10).
    wait_until(lambda: probe.xinfo_stream(STREAM)["entries-added"] >= 45, 60, what="45 entries appended")
    assert 20 <= probe.xlen(STREAM) <= 30
    health = probe.xrange(f"streamd:{ORIGIN}:health")
    assert health and decoded(health[0])["camera"] == "bus"
    assert d.stop() == 0
    back.close()
    probe.close()


def frame(i: int, deadline: float = math.inf) -> Outbound:
    return Outbound("detections", "door", {"type": "detections", "camera": "door", "frame": i,
                                           "detections": [{"label": "person"}]}, deadline=deadline)


def frames_in(client: Any, stream: str) -> list[int]:
    return [json.loads(fields[b"body"])["frame"] for _, fields in client.xrange(stream)]


def test_redis_away_keeps_the_newest_then_reconnects_without_losing_what_it_held(redis_factory) -> None:  # noqa: F811
    server = redis_factory(start=False, stream_node_max_entries=10)
    out = RedisStreamsOutput(RedisOutputConfig(url=server.url, maxlen=1000, queue_size=10, backoff_initial_s=0.1,
                                               backoff_max_s=0.5), "box")
    out.start()
    stream = "streamd:box:detections"
    try:
        for i in range(30):
            out.offer(frame(i))
        out.offer(Outbound("stats", "", {"type": "stats"}))     # not in kinds: ignored, not counted
        assert out.counters()["dropped"] == 20 and out.counters()["queued"] == 10
        server.start()
        wait_until(lambda: out.counters()["sent"] == 10, 15, what="the 10 held entries")
        client = redis.Redis.from_url(server.url)
        assert frames_in(client, stream) == list(range(20, 30))
        client.close()

        server.stop()
        for i in range(30, 35):
            out.offer(frame(i))      # the first write finds the link dead: these go back to the queue
        out.offer(frame(35, deadline=0.0))   # already too old when its turn comes
        wait_until(lambda: out.counters()["connected"] == 0, 15, what="the lost connection to be noticed")
        server.start()               # a fresh, empty Redis (no persistence)
        wait_until(lambda: out.counters()["reconnects"] == 1 and out.counters()["sent"] == 15, 15,
                   what="the reconnect and the held entries")
        client = redis.Redis.from_url(server.url)
        assert frames_in(client, stream) == list(range(30, 35))
        assert out.counters()["stale"] == 1 and out.counters()["dropped"] == 20
        client.close()
    finally:
        out.close(2)
    assert not out.is_alive()


def test_maxlen_trims_each_stream_to_about_n_entries(redis_factory) -> None:  # noqa: F811
    server = redis_factory(stream_node_max_entries=10)
    out = RedisStreamsOutput(RedisOutputConfig(url=server.url, maxlen=50, queue_size=1000), "box")
    out.start()
    try:
        for i in range(600):
            out.offer(frame(i))
        wait_until(lambda: out.counters()["sent"] == 600, 30, what="600 entries written")
    finally:
        out.close(2)
    client = redis.Redis.from_url(server.url)
    frames = frames_in(client, "streamd:box:detections")
    assert 50 <= len(frames) <= 60 and frames[-1] == 599 and frames == list(range(600 - len(frames), 600))
    client.close()
