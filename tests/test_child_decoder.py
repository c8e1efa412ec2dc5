"""Child-process decoders (FFmpeg, GStreamer gst-launch) under the camera state machine: real
ffmpeg / gst-launch-1.0 processes against real RTSP servers and files, real faults (a child
stopped with SIGSTOP or killed), and the boxes of a real model in the camera's own pixels."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamd.config import CameraConfig, SourceDefaults
from streamd.pipeline.queues import RingQueue
from streamd.pipeline.sources.camera import CameraSource
from streamd.pipeline.sources.presets import DecoderChoice
from streamd.pipeline.sources.select import make_clip, try_preset
from streamd.redact import register_url
from tests.fixtures_daemon import free_tcp_port, wait_until
from tests.test_daemon import base_config, started

FAST = SourceDefaults(open_timeout_s=8, read_timeout_s=2, stall_timeout_s=4, backoff_initial_s=0.2,
                      backoff_max_s=1)
FIT = (320, 320)
PASSWORD = "pa55-w0rd-canary"
TOOLS = {"ffmpeg": "ffmpeg", "gstreamer": "gst-launch-1.0"}


def need(kind: str) -> None:
    if shutil.which(TOOLS[kind]) is None:
        pytest.skip(f"{TOOLS[kind]} is not installed (tools/setup_system.sh installs it)")


def child_pids(tool: str) -> set[int]:
    """Live (not zombie) children of this test process running ``tool``."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv0 = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and os.path.basename(argv0) == tool.encode():
            pids.add(int(entry))
    return pids


class Watched:
    """A camera thread with its queue and every health change it reported."""

    def __init__(self, cam: CameraConfig, choice: DecoderChoice, defaults: SourceDefaults = FAST) -> None:
        self.queue = RingQueue(1, threading.Condition())
        self.health: list[tuple[str, str]] = []
        self.source = CameraSource(cam, defaults, self.queue, lambda _c, state, _p, why, *_decoder: self.health.append(
            (state, why)), decoder=choice)

    def states(self) -> list[str]:
        return [s for s, _ in self.health]

    def frame(self, timeout: float = 30.0):
        return wait_until(self.queue.pop, timeout, what=f"a frame (health so far: {self.health})")


@pytest.fixture
def watch() -> Iterator[Any]:
    made: list[Watched] = []

    def start(cam: CameraConfig, choice: DecoderChoice, defaults: SourceDefaults = FAST) -> Watched:
        w = Watched(cam, choice, defaults)
        made.append(w)
        w.source.start()
        return w

    yield start
    for w in made:
        w.source.stop()
    for w in made:
        w.source.join(15)
        assert not w.source.is_alive(), "camera thread did not stop"


@pytest.mark.rtsp
@pytest.mark.parametrize("codec", ["h264", "h265"])
@pytest.mark.parametrize("kind", ["ffmpeg", "gstreamer"])
def test_child_decoder_streams_rtsp_scaled_with_the_cameras_size(kind: str, codec: str, test_media, rtsp_server,
                                                                 watch, caplog) -> None:
    need(kind)
    spec = test_media["bus"].images_spec(10)
    if codec == "h265":
        spec = spec.replace("images:", "images-h265:", 1)
    srv = rtsp_server(mounts={"/cam": spec}, user="viewer", password=PASSWORD, width=640, height=480)
    cam = CameraConfig(id="door", url=srv.url("/cam", credentials=False), username="viewer", password=PASSWORD)
    register_url(cam.open_url())
    caplog.set_level(logging.DEBUG, logger="streamd")
    w = watch(cam, DecoderChoice(kind, "none", FIT))
    frame = w.frame()
    assert frame.source_size == (640, 480) and frame.camera_size == (640, 480)
    assert frame.size == (320, 240), "scaled in the decoder to fit 320x320, aspect kept"
    # Joining a stream between keyframes, H.265 decoders give grey pictures until the next one.
    wait_until(lambda: (f := w.queue.pop()) is not None and f.image.dtype == np.uint8 and f.image.std() > 10,
               20, what="a real picture, not a blank")
    assert w.source.stats.width == 640 and w.source.stats.height == 480
    wait_until(lambda: w.source.stats.decoded >= 5, 20, what="five frames")
    pids = child_pids(TOOLS[kind])
    assert len(pids) == 1
    if kind == "ffmpeg":      # its URL travels on stdin: not even `ps` shows the password
        assert PASSWORD.encode() not in Path(f"/proc/{pids.pop()}/cmdline").read_bytes()
    assert any(s == "streaming" and f"{kind}/none" in why for s, why in w.health)
    assert PASSWORD not in caplog.text and PASSWORD not in repr(w.health)


@pytest.mark.rtsp
@pytest.mark.parametrize("kind", ["ffmpeg", "gstreamer"])
def test_a_hung_decoder_process_is_killed_and_restarted(kind: str, test_media, rtsp_server, watch) -> None:
    need(kind)
    srv = rtsp_server(mounts={"/cam": test_media["bus"].images_spec(10)})
    w = watch(CameraConfig(id="cam", url=srv.url("/cam")), DecoderChoice(kind, "none", FIT))
    w.frame()
    (hung,) = child_pids(TOOLS[kind])
    os.kill(hung, signal.SIGSTOP)          # a decoder that stops answering, as a stuck driver call does
    wait_until(lambda: "stalled" in w.states(), 15, what=f"stalled reported: {w.health}")
    wait_until(lambda: hung not in child_pids(TOOLS[kind]), 10, what="the hung decoder killed")
    n = len(w.health)
    wait_until(lambda: "streaming" in w.states()[n:], 30, what=f"streaming again: {w.health}")
    assert child_pids(TOOLS[kind]) - {hung}, "a fresh decoder process"
    w.frame()


@pytest.mark.rtsp
def test_a_killed_decoder_process_is_restarted(test_media, rtsp_server, watch) -> None:
    need("ffmpeg")
    srv = rtsp_server(mounts={"/cam": test_media["zidane"].images_spec(10)})
    w = watch(CameraConfig(id="cam", url=srv.url("/cam")), DecoderChoice("ffmpeg", "none", FIT))
    w.frame()
    (pid,) = child_pids("ffmpeg")
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: "lost" in w.states(), 15, what=f"lost reported: {w.health}")
    n = len(w.health)
    wait_until(lambda: "streaming" in w.states()[n:], 30, what=f"streaming again: {w.health}")
    assert w.source.stats.reconnects >= 1


@pytest.mark.rtsp
@pytest.mark.parametrize("kind", ["ffmpeg", "gstreamer"])
def test_camera_stall_offline_and_wrong_password_through_a_child(kind: str, test_media, rtsp_server, watch,
                                                                 caplog) -> None:
    need(kind)
    caplog.set_level(logging.DEBUG, logger="streamd")
    srv = rtsp_server(mounts={"/cam": test_media["bus"].images_spec(10)}, user="viewer", password=PASSWORD)
    ok = CameraConfig(id="ok", url=srv.url("/cam", credentials=False), username="viewer", password=PASSWORD)
    bad = CameraConfig(id="bad", url=srv.url("/cam", credentials=False), username="viewer",
                       password="wrong-canary-pw")
    off = CameraConfig(id="off", url=f"rtsp://127.0.0.1:{free_tcp_port()}/cam")
    for c in (ok, bad):
        register_url(c.open_url())
    w_ok, w_bad, w_off = (watch(c, DecoderChoice(kind, "none", FIT)) for c in (ok, bad, off))
    w_ok.frame()
    wait_until(lambda: any("authentication failed" in why for _, why in w_bad.health), 30,
               what=f"a wrong password named: {w_bad.health}")
    wait_until(lambda: any("connection refused" in why for _, why in w_off.health), 30,
               what=f"an offline camera named: {w_off.health}")
    srv.pause()                            # the camera itself freezes (SIGSTOP of the server)
    try:
        wait_until(lambda: "stalled" in w_ok.states() or "lost" in w_ok.states(), 20,
                   what=f"the frozen camera reported: {w_ok.health}")
    finally:
        srv.resume()
    n = len(w_ok.health)
    wait_until(lambda: "streaming" in w_ok.states()[n:], 40, what=f"back after the freeze: {w_ok.health}")
    text = caplog.text + repr(w_bad.health) + repr(w_ok.health)
    assert PASSWORD not in text and "wrong-canary-pw" not in text


def test_ffmpeg_loops_a_file_itself_and_gstreamer_ends_it(test_media, watch) -> None:
    need("ffmpeg")
    media = test_media["bus"]
    looped = watch(CameraConfig(id="loop", url=str(media.mp4), loop=True, realtime=False),
                   DecoderChoice("ffmpeg", "none", FIT))
    wait_until(lambda: looped.source.stats.decoded > 2 * media.frame_count, 60,
               what=f"more frames than the file has: {looped.health}")
    assert looped.source.stats.reconnects == 0, "looped inside the decoder, not by reconnecting"
    need("gstreamer")
    once = watch(CameraConfig(id="once", url=str(media.mp4), realtime=False), DecoderChoice("gstreamer", "none", FIT))
    wait_until(lambda: "ended" in once.states(), 60, what=f"the file's end: {once.health}")
    assert once.source.stats.decoded == media.frame_count


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.slow
def test_boxes_come_out_in_camera_pixels_as_with_the_in_process_decoder(
        fall_onnx_320: Path, test_media, tmp_path: Path, daemon_factory, collector_factory) -> None:
    """The same still picture through OpenCV at full size and through FFmpeg scaled in the
    decoder: the same people, in the same camera pixels."""
    need("ffmpeg")
    still = sorted(test_media["zidane"].frames_dir.glob("*.jpg"))[0]
    clip = tmp_path / "still.mp4"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-loop", "1", "-i", str(still),
                    "-t", "2", "-r", "10", "-vf", "scale=1280:-2", "-c:v", "libx264", "-qp", "0",
                    "-pix_fmt", "yuv420p", str(clip)], check=True, timeout=60)
    cams = [{"id": "inproc", "url": str(clip), "loop": True, "fps": 3, "decoder": "opencv"},
            {"id": "child", "url": str(clip), "loop": True, "fps": 3, "decoder": "ffmpeg", "hwaccel": "none"}]
    d, c = started(daemon_factory, collector_factory, base_config(fall_onnx_320, cams))
    ref, got = (c.wait_for(lambda m, cam=cam: m["type"] == "detections" and m["camera"] == cam and m["detections"],
                           90, f"people detected by camera {cam}\n{d.log()[-2000:]}") for cam in ("inproc", "child"))
    assert (got["width"], got["height"]) == (ref["width"], ref["height"]) == (1280, 960)
    assert max(det["box"][2] for det in got["detections"]) > 320, "boxes beyond the decoded 320 px"
    assert len(got["detections"]) == len(ref["detections"])
    for det in ref["detections"]:
        best = max(_iou(det["box"], g["box"]) for g in got["detections"] if g["label"] == det["label"])
        assert best > 0.9, (det, got["detections"])
    assert d.stop() == 0


@pytest.mark.parametrize("kind,preset", [("ffmpeg", "nvidia"), ("ffmpeg", "vaapi"), ("gstreamer", "jetson"),
                                         ("gstreamer", "vaapi"), ("ffmpeg", "none"), ("gstreamer", "none")])
def test_each_preset_decodes_h264_and_h265_where_its_hardware_exists(kind: str, preset: str,
                                                                     tmp_path: Path) -> None:
    need(kind)
    for codec in ("h264", "h265"):
        clip = make_clip(tmp_path, codec)
        problem = try_preset(kind, preset, clip, SourceDefaults())
        if problem and preset != "none":
            pytest.skip(f"{kind}/{preset} is not available on this machine: {problem}")
        assert problem == "", f"{kind}/{preset} on {codec}: {problem}"


def test_a_preset_the_decoder_lacks_is_a_config_error_naming_field_and_line(tmp_path: Path) -> None:
    from streamd.config import parse_config
    from streamd.errors import ConfigError

    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    text = ("model:\n  path: m.onnx\nsources:\n  decoder: ffmpeg\ncameras:\n  - id: a\n    url: a.mp4\n"
            "  - id: b\n    url: b.mp4\n    hwaccel: jetson\n")
    with pytest.raises(ConfigError) as err:
        parse_config(text, "edge.yaml", base_dir=tmp_path, check_files=False)
    assert "edge.yaml:10" in str(err.value) and "cameras[1].hwaccel" in str(err.value)
    assert "gstreamer" in str(err.value)
    cfg = parse_config(text.replace("jetson", "vaapi"), "edge.yaml", base_dir=tmp_path, check_files=False)
    assert cfg.cameras[1].hwaccel == "vaapi" and cfg.sources.decoder == "ffmpeg"


def test_ffmpeg_gets_the_password_on_stdin_not_in_its_arguments() -> None:
    from streamd.pipeline.sources.presets import ffmpeg_command

    cam = CameraConfig(id="a", url="rtsp://192.0.2.7:554/live", username="admin", password=PASSWORD)
    for preset in ("none", "nvidia", "vaapi"):
        cmd = ffmpeg_command(cam, SourceDefaults(), preset, (640, 640))
        assert PASSWORD not in " ".join(cmd.argv) and "192.0.2.7" not in " ".join(cmd.argv)
        assert cmd.stdin is not None and PASSWORD.encode() in cmd.stdin
        assert "-hwaccel" in cmd.argv if preset != "none" else "-hwaccel" not in cmd.argv


def test_boxes_of_a_scaled_frame_map_to_the_same_camera_pixels() -> None:
    """Letterboxing a decoder-scaled frame and mapping back gives the boxes of the full frame."""
    from streamd.pipeline.preprocess import BatchBuffer

    full = np.zeros((1080, 1920, 3), np.uint8)
    small = np.zeros((360, 640, 3), np.uint8)
    buf = BatchBuffer(2, 384, 640, fit=(640, 640))
    _, (lb_full, lb_small) = buf.fill([full, small], [None, (1920, 1080)])
    net_boxes = np.array([[100.5, 50.25, 300.0, 200.0], [0.0, 12.0, 640.0, 372.0]], np.float32)
    np.testing.assert_allclose(lb_small.boxes_to_frame(net_boxes), lb_full.boxes_to_frame(net_boxes), atol=1e-3)
    assert lb_small.boxes_to_frame(net_boxes)[1].tolist() == [0.0, 0.0, 1920.0, 1080.0]


def test_auto_prefers_working_hardware_then_ffmpeg_then_opencv() -> None:
    from streamd.pipeline.sources.presets import PRESETS
    from streamd.pipeline.sources.select import Trial, best

    def trials(*working: str) -> dict[tuple[str, str], Trial]:
        return {(k, p): Trial(k, p, "" if f"{k}/{p}" in working else "not here")
                for k, presets in PRESETS.items() for p in presets}

    assert best(trials("ffmpeg/none", "gstreamer/none")) == ("ffmpeg", "none")
    assert best(trials("gstreamer/none")) == ("opencv", "none")
    assert best(trials("ffmpeg/none", "gstreamer/jetson")) == ("gstreamer", "jetson")
    assert best(trials("ffmpeg/vaapi", "ffmpeg/nvidia", "ffmpeg/none")) == ("ffmpeg", "nvidia")
    assert best(trials("ffmpeg/vaapi", "ffmpeg/nvidia"), hwaccel="vaapi") == ("ffmpeg", "vaapi")
    assert best(trials("ffmpeg/nvidia"), kind="gstreamer") == ("gstreamer", "none")


@pytest.mark.parametrize("kind", ["ffmpeg", "gstreamer"])
def test_a_realtime_file_plays_at_its_own_rate_through_a_child(kind: str, test_media, watch) -> None:
    need(kind)
    media = test_media["bus"]          # its clips are written at media.fps
    w = watch(CameraConfig(id="rt", url=str(media.mp4), realtime=True), DecoderChoice(kind, "none", FIT))
    w.frame()
    t0, n0 = time.monotonic(), w.source.stats.decoded
    wait_until(lambda: w.source.stats.decoded >= n0 + 3 * media.fps, 30, what="three seconds of frames")
    # Not faster than the file's rate, less the one second a late camera thread may catch up.
    assert time.monotonic() - t0 >= 3 - 1 - 1 / media.fps


def test_a_snapshot_of_a_scaled_frame_is_in_the_cameras_pixels(test_media) -> None:
    """Boxes are in the camera's pixels, so the JPEG they are drawn on must be too."""
    import cv2

    from streamd.entities import Frame, FrameResult
    from streamd.pipeline.output.snapshots import SnapshotPolicy

    cam = CameraConfig(id="door", url="x.mp4", snapshot="always")
    small = cv2.imread(str(sorted(test_media["zidane"].frames_dir.glob("*.jpg"))[0]))
    small = cv2.resize(small, (320, 240))
    frame = Frame("door", 1, time.time(), time.monotonic(), small, source_size=(1280, 960))
    result = FrameResult("door", 1, frame.capture_ts, frame.capture_mono, 1280, 960, ())
    jpeg = SnapshotPolicy({"door": cam}.get).take(result, frame)
    assert jpeg is not None
    picture = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert picture.shape == (960, 1280, 3)
    back = cv2.resize(picture, (320, 240), interpolation=cv2.INTER_AREA)
    assert np.abs(back.astype(int) - small.astype(int)).mean() < 8, "the same picture, scaled up"
