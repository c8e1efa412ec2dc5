"""The fleet request queue on Redis Streams: real redis-server, real daemon processes (the 320
model), real submitters; a daemon SIGKILLed mid-run, a bound reached, tasks of a dead
consumer taken over."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import pytest

from streamd import fleet
from streamd.config import parse_config
from streamd.errors import ConfigError
from tests.fixtures_brokers import redis_factory  # noqa: F401 - fixture
from tests.fixtures_daemon import REPO, DaemonProcess, wait_until
from tests.test_daemon import base_config

redis = pytest.importorskip("redis", reason="redis-py is not installed (pip install -e '.[test]')")
from streamd.client.redis_detect import FleetClient  # noqa: E402

STREAM = "streamd:requests"


def fleet_config(model: Path, url: str, name: str, **fleet_opts: Any) -> dict[str, Any]:
    cfg = base_config(model, [], workers=1, autotune_s=0)
    cfg["publisher"]["name"] = name
    cfg["requests"] = {"redis": {"url": url, "reclaim_idle_s": 2, **fleet_opts}}
    return cfg


@pytest.fixture
def small_jpegs(sample_images: list[Path]) -> list[bytes]:
    """The sample pictures at a quarter of their size: less decoding, the same model work."""
    out = []
    for p in sample_images:
        img = cv2.imread(str(p))
        ok, buf = cv2.imencode(".jpg", cv2.resize(img, (img.shape[1] // 4, img.shape[0] // 4)))
        assert ok
        out.append(buf.tobytes())
    return out


@pytest.fixture
def box_factory(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], DaemonProcess]]:
    """Daemons in folders of their own (config and log each), all killed by PID at the end."""
    made: list[DaemonProcess] = []

    def start(cfg: dict[str, Any]) -> DaemonProcess:
        work = tmp_path / f"box{len(made)}"
        work.mkdir()
        made.append(DaemonProcess(cfg, work))
        return made[-1]

    yield start
    for d in made:
        d.kill()


def consumers(r: Any, group: str = "streamd") -> dict[str, dict[str, Any]]:
    try:
        return {c["name"].decode(): c for c in r.xinfo_consumers(STREAM, group)}
    except redis.ResponseError:        # no stream or group yet
        return {}


def fleet_outcomes(d: DaemonProcess) -> dict[str, int]:
    """The daemon's ``streamd_fleet_requests_total`` by outcome, read from its /metrics page."""
    port = re.search(r"http on http://127.0.0.1:(\d+)", d.log()).group(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    return {m.group(1): int(float(m.group(2)))
            for m in re.finditer(r'^streamd_fleet_requests_total\{outcome="(\w+)"\} (\S+)$', text, re.M)}


def collect_answers(client: FleetClient, want: int, deadline: float, seen: Counter[str],
                    daemon: Any = None, at: dict[str, float] | None = None) -> None:
    """Pop answered task ids from the client's reply list until ``want`` distinct ones
    (``at``: when each was first popped); fails at once if ``daemon`` exits."""
    while len(seen) < want and time.monotonic() < deadline:
        if daemon is not None and daemon.proc.poll() is not None:
            raise AssertionError(f"the daemon exited ({daemon.proc.returncode}):\n{daemon.log()[-2000:]}")
        tid = client.next_answered(0.5)
        if tid is not None:
            seen[tid] += 1
            if at is not None:
                at.setdefault(tid, time.monotonic())


@pytest.mark.slow
def test_two_daemons_share_500_tasks_and_one_killed_mid_run_loses_none(
        yolov8n_onnx_320: Path, small_jpegs, box_factory, collector_factory, redis_factory) -> None:  # noqa: F811
    server = redis_factory()
    r = redis.Redis.from_url(server.url)
    # The small YOLOv8n at 320, so 500 pictures fit in a short test on a loaded 2-core box; what
    # is checked is who answered what and how often, not the detections.
    cfgs = [fleet_config(yolov8n_onnx_320, server.url, name) for name in ("box-a", "box-b")]
    daemons = [box_factory(c) for c in cfgs]
    pubs = [collector_factory(c["publisher"]["endpoint"], [b"req/"]) for c in cfgs]
    try:
        wait_until(lambda: len(consumers(r)) == 2, 90, what="both daemons to join the group")
    except AssertionError:
        raise AssertionError(f"{daemons[0].log()[-1500:]}\n{daemons[1].log()[-1500:]}") from None

    client = FleetClient(server.url, STREAM, client_id="fleet-test")
    tasks = {client.submit(small_jpegs[i % 2], request_id=i): i for i in range(500)}
    assert None not in tasks and len(tasks) == 500
    seen: Counter[str] = Counter()
    # Both boxes take some; half way through, one of them dies with tasks in hand.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not (len(seen) >= 250 and len(pubs[0].of("result")) >= 20
                                               and len(pubs[1].of("result")) >= 20):
        collect_answers(client, len(seen) + 1, time.monotonic() + 0.5, seen, daemons[1])
    taken_by_a = len(pubs[0].of("result"))
    assert taken_by_a >= 20 and len(pubs[1].of("result")) >= 20, "both daemons should have answered tasks"
    daemons[0].kill()                   # SIGKILL: no hand-back, its tasks stay pending under its name
    held_by_a = int(consumers(r)["box-a-%d" % daemons[0].pid]["pending"])
    collect_answers(client, 500, time.monotonic() + 120, seen, daemons[1])

    assert set(seen) == set(tasks), f"{500 - len(seen)} tasks never answered\n{daemons[1].log()[-2000:]}"
    assert max(seen.values()) == 1, "a task was announced twice"
    answers = [client.answer(t) for t in tasks]
    assert all(a is not None and a["type"] == "result" for a in answers), [a for a in answers if a][:3]
    assert sorted(a["request_id"] for a in answers) == list(range(500))
    for a in answers:
        assert (a["width"], a["height"]) in {(202, 270), (320, 180)} and a["client_id"] == "fleet-test"
    # Nothing waits, nothing is held: no answer can arrive later.
    assert r.xlen(STREAM) == 0 and r.xpending(STREAM, "streamd")["pending"] == 0
    assert int(consumers(r)["box-a-%d" % daemons[0].pid]["pending"]) == 0
    # box-b took over exactly what box-a held when it died.
    assert fleet_outcomes(daemons[1]).get("reclaimed", 0) == held_by_a
    print(f"box-a answered {taken_by_a} before the kill with {held_by_a} in hand; box-b the rest")
    assert daemons[1].stop() == 0
    client.close()


@pytest.mark.slow
def test_a_daemon_stopped_with_tasks_in_hand_hands_them_back_to_the_fleet(
        fall_onnx_320: Path, small_jpegs, box_factory, redis_factory) -> None:  # noqa: F811
    server = redis_factory()
    r = redis.Redis.from_url(server.url)
    # A long reclaim time: what box-a held can only reach box-b in time by being handed back.
    a, b = (box_factory(fleet_config(fall_onnx_320, server.url, name, reclaim_idle_s=600, prefetch=12))
            for name in ("box-a", "box-b"))
    wait_until(lambda: len(consumers(r)) == 2, 90, what="both daemons to join the group")
    client = FleetClient(server.url, STREAM)
    tasks = [client.submit(small_jpegs[i % 2], request_id=i) for i in range(60)]
    seen: Counter[str] = Counter()
    collect_answers(client, 10, time.monotonic() + 60, seen, a)
    held = int(consumers(r)[f"box-a-{a.pid}"]["pending"])
    assert a.stop() == 0
    assert int(consumers(r)[f"box-a-{a.pid}"]["pending"]) == 0, "box-a stopped with tasks still in its name"
    collect_answers(client, 60, time.monotonic() + 90, seen, b)
    assert set(seen) == set(tasks) and max(seen.values()) == 1, b.log()[-2000:]
    # One worker runs at most max_batch (4) at a time: the rest of what it held was waiting.
    handed_back = int(re.search(r"handed_back=(\d+)", a.log()).group(1))
    assert held > 4 and handed_back >= 1 and r.xlen(STREAM) == 0
    print(f"box-a held {held} when stopped, handed back {handed_back}")
    assert b.stop() == 0
    client.close()


@pytest.mark.slow
def test_submitters_get_busy_at_the_bound_and_a_restarted_daemon_answers_what_waited(
        fall_onnx_320: Path, small_jpegs, sample_images, daemon_factory, redis_factory, tmp_path) -> None:  # noqa: F811
    server = redis_factory()
    r = redis.Redis.from_url(server.url)
    cfg = fleet_config(fall_onnx_320, server.url, "edge", max_queued=10)
    d = daemon_factory(cfg)
    wait_until(lambda: r.get(fleet.limit_key(STREAM)) == b"10", 90, what=f"the daemon to connect\n{d.log()[-1500:]}")
    assert d.stop() == 0

    # No daemon running: the stream fills to its bound, then every submission is refused.
    client = FleetClient(server.url, STREAM)
    got = [client.submit(small_jpegs[0], request_id=i) for i in range(25)]
    accepted = [t for t in got if t is not None]
    assert len(accepted) == 10 and got[10:] == [None] * 15 and r.xlen(STREAM) == 10

    d2 = daemon_factory(cfg)
    seen: Counter[str] = Counter()
    collect_answers(client, 10, time.monotonic() + 90, seen, d2)
    assert set(seen) == set(accepted) and max(seen.values()) == 1, d2.log()[-2000:]
    assert [client.answer(t)["type"] for t in accepted] == ["result"] * 10
    assert r.xlen(STREAM) == 0

    # The command line client through the same stream.
    proc = subprocess.run([sys.executable, "-m", "streamd.cli", "detect", "--redis", server.url, "--json",
                           "--timeout", "60", *map(str, sample_images)],
                          capture_output=True, text=True, timeout=90, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [(x["width"], x["height"]) for x in lines] == [(810, 1080), (1280, 720)]
    assert all(x["type"] == "result" and x["detections"] for x in lines)
    assert d2.stop() == 0
    client.close()


@pytest.mark.slow
def test_tasks_of_a_dead_consumer_are_taken_over_after_the_idle_time_and_bad_tasks_answered_with_errors(
        fall_onnx_320: Path, small_jpegs, daemon_factory, redis_factory) -> None:  # noqa: F811
    password = "fleet-Secret-42"
    server = redis_factory(requirepass=password)
    url = server.url.replace("redis://", f"redis://:{password}@")
    r = redis.Redis.from_url(url)
    r.xgroup_create(STREAM, "streamd", id="0", mkstream=True)
    client = FleetClient(url, STREAM)
    orphans = [client.submit(small_jpegs[1], request_id=i) for i in range(3)]
    # A consumer that takes three tasks and is never heard of again.
    taken = r.xreadgroup("streamd", "gone-box", {STREAM: ">"}, count=3)
    assert len(taken[0][1]) == 3
    taken_at = time.monotonic()        # just after Redis handed them out: their idle time starts here
    # A picture that every daemon taking it died on: delivered five times already.
    poison = client.submit(small_jpegs[1], request_id="poison")
    poison_entry = r.xreadgroup("streamd", "gone-1", {STREAM: ">"}, count=1)[0][1][0][0]
    for k in range(2, 6):
        r.xclaim(STREAM, "streamd", f"gone-{k}", 0, [poison_entry])

    d = daemon_factory(fleet_config(fall_onnx_320, url, "edge", reclaim_idle_s=3))
    bad_image = client.submit(b"not a picture", request_id="bad-image")
    bad_header = client._submit(keys=[STREAM, fleet.limit_key(STREAM)],
                                args=[100, "task_id", "bad-header", "header", json.dumps({"colour": "red"}),
                                      "image", small_jpegs[0], "reply_to", client.reply_to])
    bad_client = client._submit(keys=[STREAM, fleet.limit_key(STREAM)],
                                args=[100, "task_id", "bad-client", "header", json.dumps({"client_id": "a/b"}),
                                      "image", small_jpegs[0]])
    assert bad_header is not None and bad_client is not None
    fresh = client.submit(small_jpegs[0], request_id="fresh")
    seen: Counter[str] = Counter()
    answered_at: dict[str, float] = {}
    # bad-client named no reply list: its answer is only stored.
    collect_answers(client, 7, time.monotonic() + 90, seen, d, answered_at)
    assert set(seen) == {*orphans, poison, bad_image, "bad-header", fresh} and max(seen.values()) == 1, \
        d.log()[-2000:]
    assert "given up after 5 daemons" in client.answer(poison)["error"]
    assert client.answer(fresh)["type"] == "result"
    for t in orphans:
        assert client.answer(t)["type"] == "result"
        assert answered_at[t] - taken_at >= 3.0, "taken over before the consumer was idle for reclaim_idle_s"
    assert "client_id" in wait_until(lambda: client.answer("bad-client"), 10, what="bad-client's answer")["error"]
    # Counted just after each answer is stored: read once they all are.
    want = {"reclaimed": 4, "pulled": 4, "completed": 4, "failed": 4, "rejected": 4}
    wait_until(lambda: fleet_outcomes(d) == want, 10, what=f"the counters to read {want}")
    assert "image" in client.answer(bad_image)["error"] and client.answer(bad_image)["request_id"] == "bad-image"
    assert "colour" in client.answer("bad-header")["error"]
    assert int(consumers(r)["gone-box"]["pending"]) == 0 and r.xlen(STREAM) == 0
    # The names of stopped daemons that hold nothing are removed from the group (idle 0 here).
    me = f"edge-{d.pid}"
    assert r.register_script(fleet.PRUNE_SCRIPT)(keys=[STREAM], args=["streamd", 0, me]) == 6
    assert list(consumers(r)) == [me]
    assert d.stop() == 0
    assert password not in d.log() and "edge" in d.log()
    client.close()


def test_fleet_config_errors_name_field_and_line_and_never_the_password(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    text = ("model:\n  path: m.onnx\nrequests:\n  redis:\n    url: http://user:pa55word@127.0.0.1:6379/0\n"
            "    reclaim_idle_s: 0.1\n")
    with pytest.raises(ConfigError) as err:
        parse_config(text, "fleet.yaml", base_dir=tmp_path)
    assert "fleet.yaml:5: requests.redis.url: must start with redis://" in str(err.value)
    assert "fleet.yaml:6: requests.redis.reclaim_idle_s: Input should be greater than or equal to 0.5" \
        in str(err.value)
    assert "pa55word" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config(text.replace("http://", "redis://").replace("reclaim_idle_s: 0.1", "password_file: nope"),
                     "fleet.yaml", base_dir=tmp_path)
    assert str(err.value).startswith("fleet.yaml:6: requests.redis.password_file: file not found")
    cfg = parse_config(text.replace("http://", "redis://").replace("0.1", "5"), "fleet.yaml", base_dir=tmp_path)
    assert cfg.requests.redis is not None and cfg.requests.redis.reclaim_idle_s == 5
    assert not cfg.requests.enabled        # the ZeroMQ door stays off: the Redis door alone is enough


@pytest.mark.slow
def test_a_refused_password_is_said_without_the_password_and_the_cameras_keep_running(
        fall_onnx_320: Path, test_media, daemon_factory, collector_factory, redis_factory) -> None:  # noqa: F811
    server = redis_factory(requirepass="the-right-one")
    wrong = "wrong-Pass-77"
    cfg = fleet_config(fall_onnx_320, server.url.replace("redis://", f"redis://:{wrong}@"), "edge")
    cfg["cameras"] = [{"id": "bus", "url": str(test_media["bus"].mp4), "loop": True, "fps": 4}]
    d = daemon_factory(cfg)
    pub = collector_factory(cfg["publisher"]["endpoint"], [b"cam/"])
    wait_until(lambda: "redis requests: not working" in d.log() or d.proc.poll() is not None, 90,
               what="the refusal in the log")
    pub.wait_for(lambda m: m["type"] == "detections" and m["detections"], 60, "detections from the camera")
    assert d.proc.poll() is None and "AuthenticationError" in d.log()
    assert d.stop() == 0
    assert wrong not in d.log()
