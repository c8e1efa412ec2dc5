"""Objects end to end, with real processes: a real daemon tracking people on the ground-truth
sequence (tools/make_tracking_media.py), a real ``streamd alert`` judging its messages, real
RTSP cameras lost and back, real SIGHUP and SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import cv2
import pytest
import yaml

from tests.fixtures_daemon import free_tcp_port, wait_until
from tests.test_tracking_media import MEDIA, load_tool

pytest.importorskip("trackers", reason="the 'tracking' extra (trackers) is not installed")

FAST_SOURCES = {"open_timeout_s": 3, "read_timeout_s": 2, "stall_timeout_s": 4,
                "backoff_initial_s": 0.3, "backoff_max_s": 2}
# Person 1 walks left to right along y = 450 and passes x = 250 at about 3.5 s, before it
# crosses person 2 (y = 400); the others walk further up. Zone and line sit low enough that
# only person 1's feet reach them.
LOITER_ZONE = [[0, 425], [250, 425], [250, 480], [0, 480]]
CROSS_LINE = [[250, 425], [250, 480]]


def daemon_config(model: Path, endpoint: str, cameras: list[dict[str, Any]], **tracking: Any) -> dict[str, Any]:
    return {
        "model": {"path": str(model), "conf": 0.25},
        "scheduler": {"max_batch": 2, "max_frame_age_ms": 1500, "autotune_s": 0, "workers": 1},
        "publisher": {"endpoint": endpoint, "heartbeat_s": 0.5, "stats_interval_s": 5.0},
        "sources": FAST_SOURCES,
        "metrics": {"enabled": False},
        "tracking": {"tracker": "bytetrack", "update_interval_s": 0, **tracking},
        "cameras": cameras,
    }


def sequence_clip(tmp_path: Path, fps: int = 5) -> Path:
    """The ground-truth sequence as a video file played at its own rate."""
    seq = load_tool().make_sequences(MEDIA, rates=(fps,), h264=False)[fps]
    out = tmp_path / f"tracks-{fps}fps.mp4"
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, seq.size)
    try:
        for path in seq.frame_paths():
            writer.write(cv2.imread(str(path)))
    finally:
        writer.release()
    if not out.exists() or out.stat().st_size == 0:
        pytest.skip("OpenCV here cannot write an MP4 file")
    return out


class LineReader:
    """A child process's standard output, one JSON object per line, read on a thread."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.lines: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, args=(proc,), daemon=True)
        self._thread.start()

    def _run(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            with self._lock:
                self.lines.append(obj)

    def events(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.lines if e.get("event") == kind]


@pytest.mark.slow
def test_alert_fires_loitering_and_line_crossing_once_per_object(
        fall_onnx_320: Path, tmp_path: Path, daemon_factory, collector_factory) -> None:
    clip = sequence_clip(tmp_path)
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    rules = {
        "endpoint": endpoint, "silence_s": 1,
        "rules": [
            {"name": "loitering", "trigger": "dwell", "classes": ["Normal", "Fall"], "zone": LOITER_ZONE,
             "min_duration_s": 1.5, "cooldown_s": 600},
            {"name": "crossing", "trigger": "cross", "line": CROSS_LINE, "direction": "left_to_right",
             "cooldown_s": 600},
            # Nobody walks right to left across this line: it must stay quiet.
            {"name": "crossing-back", "trigger": "cross", "line": CROSS_LINE, "direction": "right_to_left"},
        ],
        "sinks": {"stdout": True},
    }
    rules_path = tmp_path / "rules.yaml"
    rules_path.write_text(yaml.safe_dump(rules))
    alert = subprocess.Popen([sys.executable, "-m", "streamd.cli", "alert", "-c", str(rules_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=tmp_path,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        out = LineReader(alert)
        # The alert process runs (and says the daemon is silent) before the daemon starts.
        wait_until(lambda: out.events("daemon_silent"), 20, what="streamd alert to start")
        cam = {"id": "walk", "url": str(clip), "realtime": True, "enabled": False}
        cfg = daemon_config(fall_onnx_320, endpoint, [cam])
        daemon = daemon_factory(cfg)
        coll = collector_factory(endpoint)
        # Only once streamd alert hears the daemon does the camera start (a real SIGHUP), so
        # it sees the whole scene from its first frame.
        wait_until(lambda: out.events("daemon_back"), 60, what="streamd alert to hear the daemon")
        daemon.config_path.write_text(yaml.safe_dump({**cfg, "cameras": [{**cam, "enabled": True}]}))
        daemon.signal(signal.SIGHUP)
        coll.wait_for(lambda b: b["type"] == "health" and b["state"] == "ended", 60, "the clip to end")
        assert daemon.stop() == 0
        # After the daemon went quiet the alert says so: every message before was judged.
        wait_until(lambda: len(out.events("daemon_silent")) >= 2, 20, what="streamd alert to notice the stop")
    finally:
        alert.send_signal(signal.SIGTERM)
        try:
            alert.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(alert.pid, signal.SIGKILL)
            alert.wait(5)
    alerts = out.events("alert")
    starts = [b for b in coll.of("event") if b["event"] == "start"]
    assert len(starts) >= 3, f"tracked objects: {starts}"
    loiter = [a for a in alerts if a["rule"] == "loitering"]
    cross = [a for a in alerts if a["rule"] == "crossing"]
    assert len(loiter) == 1 and len(cross) == 1, alerts
    assert loiter[0]["dwell_s"] >= 1.5 and loiter[0]["trigger"] == "dwell"
    assert cross[0]["direction"] == "left_to_right" and cross[0]["crossings"] == 1
    # Person 1 (the only one down there) fired both, under one id.
    assert loiter[0]["track_id"] == cross[0]["track_id"]
    assert not [a for a in alerts if a["rule"] == "crossing-back"], alerts


def starts_and_ends(coll: Any) -> tuple[list[dict[str, Any]], dict[int, list[dict[str, Any]]]]:
    events = coll.of("event")
    ends: dict[int, list[dict[str, Any]]] = {}
    for e in events:
        if e["event"] == "end":
            ends.setdefault(e["track_id"], []).append(e)
    return [e for e in events if e["event"] == "start"], ends


@pytest.mark.slow
def test_every_start_has_one_end_across_camera_loss_reload_and_shutdown(
        fall_onnx_320: Path, daemon_factory, collector_factory, rtsp_server) -> None:
    seq = load_tool().make_sequences(MEDIA, rates=(5,), h264=False)[5]
    server = rtsp_server(mounts={"/gt": f"images:{seq.folder / 'frame%03d.jpg'}@5"})
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    cfg = daemon_config(fall_onnx_320, endpoint, [{"id": "gt", "url": server.url("/gt")}])
    cfg["publisher"]["stats_interval_s"] = 1.0
    coll = collector_factory(endpoint)
    daemon = daemon_factory(cfg)

    def started_after(n: int) -> bool:
        return len(starts_and_ends(coll)[0]) > n

    def ended_by(reason: str) -> bool:
        return any(e["reason"] == reason for es in starts_and_ends(coll)[1].values() for e in es)

    wait_until(lambda: started_after(0), 90, what="a first object")
    server.stop()                                               # the camera is lost
    wait_until(lambda: ended_by("camera_offline"), 30, what="objects ended by the camera going offline")
    seen = len(starts_and_ends(coll)[0])
    server.restart()
    wait_until(lambda: started_after(seen), 60, what="objects after the camera came back")
    daemon.config_path.write_text(yaml.safe_dump({**cfg, "tracking": {**cfg["tracking"], "match_iou": 0.2}}))
    daemon.signal(signal.SIGHUP)                                # tracking settings changed
    wait_until(lambda: ended_by("tracking_changed"), 30, what="objects ended by the reload")
    seen = len(starts_and_ends(coll)[0])
    wait_until(lambda: started_after(seen), 60, what="objects tracked with the new settings")
    # The stats message counts each tracked camera's live objects.
    counted = coll.wait_for(lambda b: b["type"] == "stats"
                            and b["cameras"].get("gt", {}).get("objects", {}).get("live", 0) > 0,
                            30, "a stats message counting live objects")["cameras"]["gt"]["objects"]
    assert daemon.stop() == 0                                   # SIGTERM
    wait_until(lambda: ended_by("shutdown"), 10, what="objects ended by the shutdown")

    starts, ends = starts_and_ends(coll)
    ids = [s["track_id"] for s in starts]
    assert len(ids) == len(set(ids)), f"a track id started twice: {ids}"
    assert set(ends) == set(ids), f"starts {sorted(ids)} vs ends {sorted(ends)}"
    assert all(len(es) == 1 for es in ends.values()), ends
    assert all(ends[i][0]["duration_s"] >= 0 for i in ids)
    # Ids count up from 1 without gaps, across the outage and the reload; the stats message
    # counted every id handed out by then, no more.
    assert sorted(ids) == list(range(1, len(ids) + 1)), sorted(ids)
    assert 1 <= counted["live"] <= counted["total"] <= len(ids) and counted["errors"] == 0, counted
    jpegs = [b for b in coll.of("event") if b["event"] == "end" and "_snapshot" in b]
    assert jpegs and all(b["_snapshot"][:2] == b"\xff\xd8" and b["snapshot"]["bytes"] == len(b["_snapshot"])
                         for b in jpegs)
