"""Checks of the RTSP test server and its fixtures, with real processes and real readers.

Other tests rely on these properties (frame size, pacing, bursting, auth, stall and
restart behaviour), so they are asserted here once, where a failure points at the test
infrastructure rather than at the daemon.
"""

from __future__ import annotations

import bisect
import selectors
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_rtsp import (
    GST_PYTHON,
    SERVER_SCRIPT,
    MediaSetLike,
    RtspServer,
    RtspServerFactory,
    gst_rtsp_unavailable_reason,
    open_capture,
    read_times,
    redact,
    wait_for_frames,
)

pytestmark = pytest.mark.rtsp

Media = dict[str, MediaSetLike]


def _needs_h264(media: MediaSetLike) -> None:
    if media.h264 is None:
        pytest.skip("no H.264 clip (ffmpeg missing)")


def _live_rate(url: str, reach: float, window_s: float, deadline_s: float = 20.0,
               read_timeout_ms: int = 5000) -> tuple[float, float, int]:
    """Read a live stream until some ``window_s`` of it ran at ``reach`` frames/s or more.

    Returns the best window's rate, the rate over everything read, and the frame count.
    A loaded box can starve the reader or the server for a while, which only ever lowers a
    rate: so the floor is a condition waited for (up to ``deadline_s``), and the ceiling is
    judged on the whole read, where a stall cannot raise it.

    Opening buffers what arrived while FFmpeg probed the stream, and those frames come
    out at once; so reading starts to count only after a read had to wait for the
    server (longer than 40 ms), which means the backlog is gone. An unpaced stream never
    makes a read wait, so draining also ends after 3 s.
    """
    cap = open_capture(url, read_timeout_ms=read_timeout_ms)
    try:
        assert cap.isOpened(), f"cannot open {redact(url)}"
        last = [time.monotonic()]

        def caught_up(_count: int, now: float) -> bool:
            waited = now - last[0]
            last[0] = now
            return waited > 0.04

        drain_deadline = time.monotonic() + 3.0
        drained = read_times(cap, lambda c, now: caught_up(c, now) or now > drain_deadline)
        assert drained, "stream ended while draining the open backlog"
        start = time.monotonic()
        times: list[float] = []
        best = [0.0]

        def reached(_count: int, now: float) -> bool:
            times.append(now)
            if now - start >= window_s:
                in_window = len(times) - bisect.bisect_right(times, now - window_s)
                best[0] = max(best[0], (in_window - 1) / window_s)
            return best[0] >= reach or now - start > deadline_s
        read_times(cap, reached)
    finally:
        cap.release()
    assert len(times) >= 2, f"only {len(times)} frames in {deadline_s} s"
    return best[0], (len(times) - 1) / (times[-1] - times[0]), len(times)


@pytest.mark.parametrize("size", [(640, 480), (320, 240)])
def test_images_mount_serves_frames_of_requested_size(
    rtsp_server: RtspServerFactory, test_media: Media, size: tuple[int, int]
) -> None:
    width, height = size
    server = rtsp_server({"/cam1": test_media["bus"].images_spec(10)}, width=width, height=height)
    frames = wait_for_frames(server.url("/cam1"), n=5)
    assert all(f.shape == (height, width, 3) for f in frames)
    # Real picture content, not a black or flat frame from a broken pipeline.
    assert float(frames[-1].std()) > 20.0


def test_images_mount_is_paced_and_moving(rtsp_server: RtspServerFactory, test_media: Media) -> None:
    fps = 10
    server = rtsp_server({"/cam1": test_media["bus"].images_spec(fps)})
    best, overall, count = _live_rate(server.url("/cam1"), reach=0.6 * fps, window_s=3.0)
    assert best >= 0.6 * fps, f"never {0.6 * fps:.0f} frames/s in 3 s (best {best:.1f}), asked for {fps}"
    assert overall <= 1.4 * fps, f"{overall:.1f} frames/s ({count} frames), asked for {fps}"

    frames = wait_for_frames(server.url("/cam1"), n=6)
    diffs = [float(np.abs(a.astype(np.int16) - b).mean()) for a, b in zip(frames, frames[1:])]
    assert max(diffs) > 1.0, f"consecutive frames identical (mean abs diffs {diffs})"


def test_h264_mount_serves_frames(rtsp_server: RtspServerFactory, test_media: Media) -> None:
    media = test_media["zidane"]
    _needs_h264(media)
    server = rtsp_server({"/clip": media.h264_spec()})
    frames = wait_for_frames(server.url("/clip"), n=20)
    width, height = media.size
    assert all(f.shape == (height, width, 3) for f in frames)
    assert float(frames[-1].std()) > 20.0


def test_h264_mount_bursts_unless_given_a_rate(rtsp_server: RtspServerFactory, test_media: Media) -> None:
    media = test_media["zidane"]
    _needs_h264(media)
    server = rtsp_server({"/burst": media.h264_spec(), "/paced": f"{media.h264_spec()}@25"})
    # The clip is made at 10 frames/s; an unpaced mount goes as fast as the reader reads.
    burst, _, count = _live_rate(server.url("/burst"), reach=40.0, window_s=1.0)
    assert burst >= 40.0, f"unpaced mount gave at best {burst:.1f} frames/s ({count} frames)"
    paced, overall, count = _live_rate(server.url("/paced"), reach=15.0, window_s=3.0)
    assert paced >= 15.0, f"mount paced at 25 never gave 15 frames/s in 3 s (best {paced:.1f})"
    assert overall <= 35.0, f"mount paced at 25 gave {overall:.1f} frames/s ({count} frames)"


def test_two_mounts_in_one_server_and_two_readers_of_one_mount(
    rtsp_server: RtspServerFactory, test_media: Media
) -> None:
    server = rtsp_server({
        "/bus": test_media["bus"].images_spec(10),
        "/zidane": test_media["zidane"].images_spec(10),
    })
    bus = wait_for_frames(server.url("/bus"), n=3)[-1]
    zidane = wait_for_frames(server.url("/zidane"), n=3)[-1]
    assert float(np.abs(bus.astype(np.int16) - zidane).mean()) > 20.0, "both mounts serve the same picture"

    first, second = open_capture(server.url("/bus")), open_capture(server.url("/bus"))
    try:
        assert first.isOpened() and second.isOpened()
        for _ in range(5):
            ok1, _f1 = first.read()
            ok2, _f2 = second.read()
            assert ok1 and ok2
    finally:
        first.release()
        second.release()


def test_auth_rejects_wrong_password_and_accepts_right_one(
    rtsp_server: RtspServerFactory, test_media: Media
) -> None:
    password = "s3cret-pw"
    server = rtsp_server({"/cam1": test_media["bus"].images_spec(10)}, user="viewer", password=password)
    good = server.url("/cam1")
    assert good.startswith(f"rtsp://viewer:{password}@127.0.0.1:{server.port}/")

    wrong = good.replace(password, "not-it")
    anonymous = server.url("/cam1", credentials=False)
    for url in (wrong, anonymous):
        t0 = time.monotonic()
        cap = open_capture(url, open_timeout_ms=60000)
        try:
            assert not cap.isOpened(), f"{redact(url)} opened without the right password"
        finally:
            cap.release()
        # Refused by the server, not left to time out: the open would take 60 s otherwise.
        assert time.monotonic() - t0 < 30.0

    frames = wait_for_frames(good, n=3)
    assert frames[0].shape == (480, 640, 3)
    assert password not in server.stderr_text()


def test_stalled_server_stops_reads_and_serves_again_after_resume(
    rtsp_server: RtspServerFactory, test_media: Media
) -> None:
    server = rtsp_server({"/cam1": test_media["bus"].images_spec(10)})
    read_timeout_ms = 2000
    cap = open_capture(server.url("/cam1"), read_timeout_ms=read_timeout_ms)
    try:
        assert cap.isOpened()
        assert len(read_times(cap, lambda count, _now: count >= 3)) == 3
        server.pause()
        stopped = time.monotonic()
        # Frames already buffered still come out; then a read must fail by the read
        # timeout. The deadline leaves room for the backlog and a busy machine.
        times = read_times(cap, lambda _c, now: now - stopped > 30.0)
        failed_after = time.monotonic() - stopped
    finally:
        cap.release()
    assert failed_after < 30.0, "reads went on for 30 s from a stopped server"
    print(f"read failed {failed_after:.1f} s after SIGSTOP ({len(times)} buffered frames first)")

    server.resume()
    assert len(wait_for_frames(server.url("/cam1"), n=3)) == 3


def test_restart_on_same_port_after_stop_and_after_kill(
    rtsp_server: RtspServerFactory, test_media: Media
) -> None:
    server = rtsp_server({"/cam1": test_media["bus"].images_spec(10)})
    url, port, first_pid = server.url("/cam1"), server.port, server.pid
    wait_for_frames(url, n=2)

    assert server.stop() == 0, f"SIGTERM did not stop the server cleanly:\n{server.stderr_text()}"
    server.restart()
    assert (server.port, server.url("/cam1")) == (port, url)
    assert server.pid != first_pid
    wait_for_frames(url, n=2)

    # A reader is connected while the server dies, as when a camera loses power.
    cap = open_capture(url)
    try:
        assert cap.isOpened()
        assert server.kill() == -9
    finally:
        cap.release()
    server.restart()
    assert server.port == port
    wait_for_frames(url, n=2)


def test_second_server_on_a_taken_port_fails_fast(rtsp_server: RtspServerFactory, test_media: Media) -> None:
    spec = test_media["bus"].images_spec(10)
    first = rtsp_server({"/cam1": spec})
    second = RtspServer({"/cam1": spec}, port=first.port, ready_timeout=10.0)
    try:
        with pytest.raises(RuntimeError, match="status 3"):
            second.start()
    finally:
        second.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "0.0.0.0"], "non-loopback"),
        (["--mount", "/x=images:/nonexistent/frame%03d.jpg@10"], "no image"),
        (["--mount", "/x=bogus:thing"], "mount spec"),
        (["--user", "u"], "go together"),
    ],
)
def test_server_rejects_bad_arguments(args: list[str], message: str, tmp_path: Path) -> None:
    if not Path(GST_PYTHON).is_file():
        pytest.skip(f"{GST_PYTHON} not found")
    cmd = [GST_PYTHON, str(SERVER_SCRIPT)]
    if "--mount" not in args:
        cmd += ["--mount", f"/x=h264:{tmp_path / 'empty.h264'}"]
        (tmp_path / "empty.h264").write_bytes(b"")
    proc = subprocess.run(cmd + args, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert proc.stdout == ""


def test_server_stops_cleanly_with_a_reader_connected(rtsp_server: RtspServerFactory, test_media: Media) -> None:
    server = rtsp_server({"/cam1": test_media["bus"].images_spec(10)})
    cap = open_capture(server.url("/cam1"), read_timeout_ms=60000)
    try:
        assert cap.isOpened() and cap.grab()
        t0 = time.monotonic()
        # 0, not -9: it exited on SIGTERM within the stop deadline instead of being killed
        assert server.stop() == 0, server.stderr_text()
        # Closed by the server, so the reader learns long before its 60 s read timeout;
        # the buffered frames come out first.
        failed = read_times(cap, lambda _c, now: now - t0 > 30.0)
        assert time.monotonic() - t0 < 30.0, f"reads went on after the server stopped ({len(failed)} frames)"
    finally:
        cap.release()


def test_server_exits_when_its_stdin_closes(test_media: Media) -> None:
    """The guard against leaked servers when a test run dies without teardown."""
    reason = gst_rtsp_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    cmd = [GST_PYTHON, str(SERVER_SCRIPT), "--port", "0", "--exit-on-stdin-eof",
           "--mount", f"/cam1={test_media['bus'].images_spec(10)}"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(timeout=20.0), "no READY line within 20 s"
        line = proc.stdout.readline().decode()
        assert line.startswith("READY rtsp://127.0.0.1:"), line
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
