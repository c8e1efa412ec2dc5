"""Camera faults injected from outside into a running daemon: a reload storm against a
hung camera, a stall, a camera that never answers.

Everything is real: the daemon and the RTSP cameras are processes, the storm is SIGHUPs,
the hang is SIGSTOP, the subscribers are ZeroMQ sockets."""

from __future__ import annotations

import re
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from tests.fixtures_daemon import wait_until
from tests.fixtures_rtsp import load_make_test_media
from tests.test_daemon import base_config

# Reads longer than the daemon's join of a retired decoder (3 s): a decoder blocked in a
# read outlives its retirement, which is what makes a reload storm dangerous.
SLOW_READ_SOURCES = {"open_timeout_s": 6, "read_timeout_s": 6, "stall_timeout_s": 8,
                     "backoff_initial_s": 0.3, "backoff_max_s": 2}


def _connections_to(pid: int, port: int) -> int:
    """The daemon's TCP connections to a camera: one per decoder holding it open."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return 0
    return sum(1 for c in conns if c.raddr and c.raddr.port == port
               and c.status in (psutil.CONN_ESTABLISHED, psutil.CONN_SYN_SENT))


def _chain_breaks(health: list[dict[str, Any]]) -> list[str]:
    """Places where one camera's health messages do not follow each other: each ``previous``
    must be the state before it, or ``starting`` for a new decoder right after a ``stopped``."""
    breaks = []
    for a, b in zip(health, health[1:]):
        ok = b["previous"] == a["state"] or (a["state"] == "stopped" and b["previous"] == "starting")
        if not ok or b.get("decoder", 0) < a.get("decoder", 0):
            breaks.append(f"{a['state']}({a.get('decoder')}: {a['reason']}) -> "
                          f"{b['previous']}->{b['state']}({b.get('decoder')}: {b['reason']})")
    return breaks


@pytest.mark.rtsp
@pytest.mark.slow
def test_reload_storm_against_a_hung_camera_leaves_one_decoder_and_no_ghosts(
        yolov8n_onnx_320: Path, test_media, rtsp_server, daemon_factory, collector_factory) -> None:
    srv = rtsp_server(mounts={"/cam": test_media["bus"].images_spec(8)})
    cam = {"id": "door", "url": srv.url("/cam")}
    cfg = {**base_config(yolov8n_onnx_320, [cam]), "sources": SLOW_READ_SOURCES}
    d = daemon_factory(cfg)
    c = collector_factory(cfg["publisher"]["endpoint"])
    wait_until(lambda: len(c.of("detections", "door")) >= 3, 90, what=f"the camera publishing\n{d.log()[-2000:]}")

    most = [0]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.05):
            most[0] = max(most[0], _connections_to(d.pid, srv.port))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    srv.pause()             # SIGSTOP: the decoder blocks in a read, its connection open
    try:
        # Ten SIGHUPs in 5 s, each flipping the camera out of and back into the config; the
        # last one leaves it in.
        without = {**cfg, "cameras": []}
        for i in range(10):
            d.config_path.write_text(yaml.safe_dump(cfg if i % 2 else without, sort_keys=False))
            d.signal(signal.SIGHUP)
            threading.Event().wait(0.5)     # the storm's pace, not a synchronisation
        wait_until(lambda: d.log().count("reload applied") >= 2, 60, what="reloads applied")
    finally:
        srv.resume()
    n = len(c.of("detections", "door"))
    wait_until(lambda: len(c.of("detections", "door")) >= n + 5, 90,
               what=f"the camera publishing after the storm\n{d.log()[-3000:]}")
    wait_until(lambda: _connections_to(d.pid, srv.port) == 1, 30, what="one connection to the camera")
    sampling.set()
    sampler.join(2)
    assert d.stop() == 0

    health = c.of("health", "door")
    assert most[0] == 1, f"{most[0]} decoders connected to the camera at once"
    assert not _chain_breaks(health), "\n".join(_chain_breaks(health))
    assert all("decoder" in h for h in health)
    # The last decoder streamed to the end; nothing said it was removed after it started.
    assert [h["state"] for h in health[-2:]] == ["streaming", "stopped"], health[-3:]
    assert health[-1]["reason"] == "daemon stopping"
    assert len({h["decoder"] for h in health[-2:]}) == 1


def _seconds_in(reason: str, pattern: str) -> float:
    m = re.search(pattern, reason)
    assert m, f"{pattern!r} not in {reason!r}"
    return float(m.group(1))


@pytest.mark.rtsp
@pytest.mark.slow
def test_a_stall_is_reported_stall_timeout_after_the_last_frame_with_the_real_gap(
        yolov8n_onnx_320: Path, test_media, rtsp_server, daemon_factory, collector_factory) -> None:
    srv = rtsp_server(mounts={"/cam": test_media["bus"].images_spec(8)})
    stall_s = 3.0
    # Reads time out later than the stall timeout: the stall is the supervisor's to see.
    sources = {**SLOW_READ_SOURCES, "read_timeout_s": 8, "stall_timeout_s": stall_s}
    cfg = {**base_config(yolov8n_onnx_320, [{"id": "door", "url": srv.url("/cam")}]), "sources": sources}
    d = daemon_factory(cfg)
    c = collector_factory(cfg["publisher"]["endpoint"])
    wait_until(lambda: len(c.of("detections", "door")) >= 5, 90, what=f"the camera publishing\n{d.log()[-2000:]}")
    srv.pause()
    try:
        stalled = c.wait_for(lambda m: m["type"] == "health" and m["camera"] == "door" and m["state"] == "stalled",
                             30, f"the stall\n{d.log()[-2000:]}")
    finally:
        srv.resume()
    last = max(m["capture_ts"] for m in c.of("detections", "door") if m["capture_ts"] < stalled["publish_ts"])
    gap = stalled["publish_ts"] - last      # at least the real gap: later frames may not have been published
    said = _seconds_in(stalled["reason"], r"no frame for ([\d.]+)s")
    assert stall_s <= said <= gap + 0.2, (said, gap)
    assert gap <= stall_s + 1.5, f"reported {gap:.1f}s after the last published frame"
    assert d.stop() == 0


@pytest.mark.slow
def test_a_failed_open_says_how_long_the_attempt_took(yolov8n_onnx_320: Path, daemon_factory,
                                                      collector_factory) -> None:
    # A camera that accepts the connection and never answers: the kernel completes the
    # handshake for a listening socket nobody accepts on.
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        url = f"rtsp://127.0.0.1:{hole.getsockname()[1]}/cam"
        sources = {**SLOW_READ_SOURCES, "open_timeout_s": 3}
        cfg = {**base_config(yolov8n_onnx_320, [{"id": "mute", "url": url}]), "sources": sources}
        d = daemon_factory(cfg)
        c = collector_factory(cfg["publisher"]["endpoint"])
        # The second attempt: the subscriber may have joined too late for the first one's start.
        wait_until(lambda: [m["state"] for m in c.of("health", "mute")].count("reconnecting") >= 2, 90,
                   what=f"two failed opens\n{d.log()[-2000:]}")
        health = c.of("health", "mute")
        i = max(i for i, m in enumerate(health) if m["state"] == "reconnecting")
        began, retry = health[i - 1], health[i]
        assert began["state"] == "connecting"
        took = retry["publish_ts"] - began["publish_ts"]
        said = _seconds_in(retry["reason"], r"gave up ([\d.]+)s after the attempt began")
        assert abs(said - took) < 0.5, (said, took, retry["reason"])
        assert took > 3.0       # the open's timeout, then a probe: more than either alone says
        assert d.stop() == 0


@pytest.mark.slow
def test_a_corrupt_file_is_read_to_its_real_end_and_its_errors_counted(
        yolov8n_onnx_320: Path, test_media, daemon_factory, collector_factory, tmp_path: Path) -> None:
    clip = test_media["bus"]
    corrupt = load_make_test_media().corrupt_clip(clip.mp4, tmp_path / "bus-corrupt.mp4")
    cams = [{"id": "once", "url": str(corrupt)}, {"id": "looped", "url": str(corrupt), "loop": True}]
    cfg = base_config(yolov8n_onnx_320, cams)
    d = daemon_factory(cfg)
    c = collector_factory(cfg["publisher"]["endpoint"])
    ended = c.wait_for(lambda m: m["type"] == "health" and m["camera"] == "once" and m["state"] == "ended", 90,
                       f"the file's end\n{d.log()[-2000:]}")
    assert ended["reason"] == "end of file"
    once = wait_until(lambda: next((m["cameras"]["once"] for m in reversed(c.of("stats"))
                                    if m["cameras"]["once"]["state"] == "ended"), None), 30, what="final stats")
    read = once["decoded"] + once["skipped"] + once["dropped"]["fps_cap"]
    # Every frame of the clip was either read or counted as undecodable; FFmpeg's concealed
    # frames are counted too.
    assert once["decode_errors"] >= 1 and once.get("corrupt_frames", 0) >= 1, once
    assert read + once["decode_errors"] >= clip.frame_count - 1, (once, clip.frame_count)

    def looped_twice() -> dict[str, Any] | None:
        m = c.of("stats")[-1]["cameras"]["looped"]
        return m if m["decoded"] + m["skipped"] >= 2 * read + 2 else None
    looped = wait_until(looped_twice, 60, what="the looped camera's second pass")
    # A second pass over the whole clip, errors and all: not the first seconds replayed.
    assert looped["decode_errors"] >= 2 * once["decode_errors"] - 1, (looped, once)
    assert looped["state"] == "streaming"
    assert d.stop() == 0
