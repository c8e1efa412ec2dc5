"""``streamd status``: the table it prints from a ``stats`` message, and a real run against a
real PUB socket on loopback."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from typing import Any, Callable

import zmq

from streamd import protocol
from streamd.client.status import format_status, format_uptime, run_status
from tests.fixtures_stats import camera_stats, daemon_stats


def stats_body(seq: int = 1, version: int = protocol.PROTOCOL_VERSION) -> dict[str, Any]:
    body = daemon_stats({"door": {**camera_stats(), "objects": {"live": 3, "total": 17, "errors": 0}},
                         "yard": {**camera_stats("reconnecting", 6), "width": 0, "height": 0, "reconnects": 12,
                                  "objects": {"live": 0, "total": 4, "errors": 2}},
                         "gate": camera_stats()})
    return {"v": version, "type": protocol.TYPE_STATS, "seq": seq, "pub": "3f9c2a71b0de",
            "publish_ts": time.time(), **body}


def test_format_status_table() -> None:
    text = format_status(stats_body(seq=42))
    lines = text.splitlines()
    assert lines[0].startswith("streamd 3f9c2a71b0de") and "(seq 42)" in lines[0]
    header, door, yard, gate = lines[1], lines[2], lines[3], lines[4]
    assert header.split()[:6] == ["CAMERA", "STATE", "DECODED", "SKIPPED", "INFERRED", "PUBLISHED"]
    assert door.split() == ["door", "streaming", "100", "200", "95", "94", "3/2/40", "0/7", "1", "2", "1920x1080",
                            "3/17"]
    assert yard.split() == ["yard", "reconnecting", "6", "12", "1", "0", "3/2/40", "0/7", "12", "2", "-",
                            "0/4", "(2", "failed)"]
    assert gate.split()[-2:] == ["1920x1080", "-"]    # a camera without a tracker
    # Fixed width: every column starts at the same offset on every row.
    col = header.index("DECODED")
    end = col + len("DECODED")
    assert door[end - 3:end] == "100" and yard[end - 1] == "6"    # numbers right-aligned under their header
    assert door.index("1920x1080") == yard.index("-", header.index("RESOLUTION")) == header.index("RESOLUTION")
    footer, pool = lines[-2], lines[-1]
    assert pool.split() == ["workers", "2", "x", "1", "thread(s)", "batches", "per", "worker", "21/19",
                            "age", "bound", "1000", "ms"]
    assert "uptime 1h 02m 03s" in footer and "batches 40" in footer and "mean batch 2.95" in footer
    assert "inference 38.2 ms/batch" in footer and "publisher sent 130 dropped 1" in footer


def test_format_status_tolerates_sparse_bodies() -> None:
    text = format_status({"cameras": {"x": {"state": "starting"}}, "scheduler": {"batches": 0, "frames": 0,
                                                                                 "infer_ms_mean": None}})
    assert "(no cameras)" not in text
    assert text.splitlines()[1].split() == ["x", "starting", "-", "-", "-", "-", "-/-/-", "-/-", "-", "-", "-", "-"]
    assert "mean batch -" in text and "inference -/batch" in text and "uptime -" in text
    assert "(no cameras)" in format_status({})
    assert [format_uptime(s) for s in (5, 65, 3600, 90061, None)] == ["5s", "1m 05s", "1h 00m 00s",
                                                                       "1d 01h 01m", "-"]


class StatsPublisher:
    """A real PUB socket sending protocol-format messages until stopped (PUB/SUB has no
    handshake: a subscriber that connects late only sees what comes after, so keep sending)."""

    def __init__(self, make_parts: Callable[[int], list[bytes]]) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        port = self._sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._make = make_parts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-stats-pub", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seq = 0
        while not self._stop.is_set():
            seq += 1
            self._sock.send_multipart(self._make(seq))
            self._stop.wait(0.02)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close(0)
        self._ctx.term()


def stats_parts(seq: int) -> list[bytes]:
    return [protocol.TOPIC_STATS, json.dumps(stats_body(seq)).encode()]


def test_run_status_prints_the_table_from_a_real_publisher() -> None:
    # Heartbeats on the same socket must be ignored (the SUB filters on sys/stats).
    pub = StatsPublisher(lambda seq: stats_parts(seq) if seq % 2 else
                         [protocol.TOPIC_HEARTBEAT, json.dumps({"v": 1, "type": "heartbeat", "seq": seq}).encode()])
    out, err = io.StringIO(), io.StringIO()
    try:
        assert run_status(pub.endpoint, timeout_s=20, out=out, err=err) == 0
    finally:
        pub.close()
    assert err.getvalue() == ""
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("streamd 3f9c2a71b0de")
    assert lines[2].split()[:2] == ["door", "streaming"] and lines[3].split()[:2] == ["yard", "reconnecting"]


def test_run_status_times_out_with_a_clear_message() -> None:
    # A live publisher that only sends heartbeats: connected, but no stats within the wait.
    pub = StatsPublisher(lambda seq: [protocol.TOPIC_HEARTBEAT,
                                      json.dumps({"v": 1, "type": "heartbeat", "seq": seq}).encode()])
    out, err = io.StringIO(), io.StringIO()
    t0 = time.monotonic()
    try:
        assert run_status(pub.endpoint, timeout_s=0.5, out=out, err=err) == 1
    finally:
        pub.close()
    assert 0.45 <= time.monotonic() - t0 < 10
    assert out.getvalue() == ""
    assert err.getvalue() == (f"no stats message from {pub.endpoint} within 0.5 s: is streamd running, "
                              f"and is publisher.stats_interval_s shorter than that?\n")


def test_run_status_says_when_stats_were_unreadable() -> None:
    pub = StatsPublisher(lambda seq: [protocol.TOPIC_STATS, json.dumps(stats_body(seq, version=2)).encode()])
    err = io.StringIO()
    try:
        # Long enough for several messages to arrive even on a busy machine, yet bounded.
        assert run_status(pub.endpoint, timeout_s=2, out=io.StringIO(), err=err) == 1
    finally:
        pub.close()
    line = err.getvalue()
    assert line.count("\n") == 1 and "unreadable stats message(s): protocol version 2" in line


def test_run_status_with_nothing_listening_and_a_bad_endpoint() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = io.StringIO()
    assert run_status(f"tcp://127.0.0.1:{port}", timeout_s=0.3, out=io.StringIO(), err=err) == 1
    assert err.getvalue().startswith(f"no stats message from tcp://127.0.0.1:{port} within 0.3 s")
    err = io.StringIO()
    assert run_status("nonsense://x", timeout_s=0.3, out=io.StringIO(), err=err) == 1
    assert err.getvalue().startswith("cannot connect to nonsense://x:")
