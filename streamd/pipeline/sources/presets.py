"""Command lines of the child-process decoders: FFmpeg, or a GStreamer ``gst-launch-1.0`` pipeline,
per hardware preset.

Each writes raw BGR frames, already scaled to fit the size the pipeline needs, to a pipe, so a
1080p camera costs a 640x360 frame through the pipe instead of a 1080p one. Plain functions of the
camera's settings: the process handling is in ``child.py``.

Presets: ``none`` (software), ``nvidia`` (NVDEC and CUDA scaling, FFmpeg), ``vaapi`` (Intel/AMD,
FFmpeg or GStreamer), ``jetson`` (``nvv4l2decoder`` + ``nvvidconv``, GStreamer). Only the software
presets run on the test machines; the hardware ones follow FFmpeg's and GStreamer's documented
filters and elements and are checked on a box by ``streamd doctor`` (which tries each on a
generated clip) before ``decoder: auto`` uses them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

from ...config import CameraConfig, SourceDefaults

FFMPEG_PRESETS = ("nvidia", "vaapi", "none")          # best first: what ``auto`` tries
GSTREAMER_PRESETS = ("jetson", "vaapi", "none")
PRESETS = {"ffmpeg": FFMPEG_PRESETS, "gstreamer": GSTREAMER_PRESETS}


@dataclass(frozen=True)
class DecoderChoice:
    """How one camera is decoded: ``kind`` opencv | ffmpeg | gstreamer, a hardware preset, and the
    (width, height) box frames are scaled to fit inside the decoder (None: the camera's own size)."""

    kind: str
    preset: str = "none"
    fit: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        return self.kind if self.kind == "opencv" else f"{self.kind}/{self.preset}"


@dataclass(frozen=True)
class ChildCommand:
    """argv of the child, what it must read on stdin (never in argv: it may hold credentials),
    and where its frames come out: ``stdout`` (FFmpeg) or the extra pipe (GStreamer, whose
    ``-v`` caps lines take stdout)."""

    argv: list[str]
    stdin: bytes | None
    frames_on_stdout: bool


def _ffconcat_quote(url: str) -> str:
    if "\n" in url or "\r" in url:
        raise ValueError("a camera URL cannot contain a line break")
    return "'" + url.replace("'", "'\\''") + "'"


def ffmpeg_command(cam: CameraConfig, defaults: SourceDefaults, preset: str,
                   fit: tuple[int, int] | None) -> ChildCommand:
    url = cam.open_url()
    head = ["ffmpeg", "-hide_banner", "-nostats", "-loglevel", "info", "-nostdin"]
    hw: list[str] = []
    if preset == "nvidia":
        hw = ["-hwaccel", "cuda", "-hwaccel_output_format", "cuda"]
    elif preset == "vaapi":
        hw = ["-hwaccel", "vaapi", "-hwaccel_device", defaults.vaapi_device, "-hwaccel_output_format", "vaapi"]
    elif preset != "none":
        raise ValueError(f"FFmpeg has no '{preset}' preset (use one of {', '.join(FFMPEG_PRESETS)})")
    if cam.kind == "usb":
        raise ValueError("USB cameras are decoded by opencv")
    # The filters (scaling, colour conversion) get the decoder's thread budget too: by default
    # FFmpeg gives the filter graph one thread per core, and on a box of many cameras those
    # threads only add hand-overs (about 10% more CPU per 1080p frame, benchmarks/RESULTS.md).
    threads = (["-threads", str(defaults.decoder_threads), "-filter_threads", str(defaults.decoder_threads)]
               if defaults.decoder_threads else [])
    # One second of probing is plenty for one video stream (FFmpeg's 5 s default slows every connect).
    src: list[str] = ["-analyzeduration", "1000000"]
    stdin = None
    if cam.kind == "file":
        # No -re: the camera thread paces a realtime file itself (as with OpenCV), and a pipe
        # one frame deep holds FFmpeg back to that pace.
        if cam.loop:
            src += ["-stream_loop", "-1"]
        src += ["-i", url]
    else:
        # The URL may carry a password, and a child's argv is visible to every user in `ps`:
        # it goes in an ffconcat list on stdin instead, with the protocol options beside it.
        listing = ["ffconcat version 1.0", f"file {_ffconcat_quote(url)}"]
        if cam.kind == "rtsp":
            listing += [f"option rtsp_transport {cam.transport}",
                        f"option timeout {int(defaults.read_timeout_s * 1_000_000)}"]
        elif cam.kind == "http":
            listing += [f"option rw_timeout {int(defaults.read_timeout_s * 1_000_000)}"]
        stdin = ("\n".join(listing) + "\n").encode()
        # Live: hand each frame on at once rather than buffering input (on files it loses frames).
        src += ["-fflags", "nobuffer", "-f", "concat", "-safe", "0", "-protocol_whitelist",
                "pipe,file,rtsp,rtsps,rtp,srtp,udp,tcp,tls,http,https,httpproxy,crypto", "-i", "pipe:0"]
    out: list[str] = []
    if fit is not None:
        w, h = fit
        # Down to fit the box, never up: a small camera is enlarged by the letterbox, not the pipe.
        fit_args = f"w=min(iw\\,{w}):h=min(ih\\,{h}):force_original_aspect_ratio=decrease:force_divisible_by=2"
        if preset == "nvidia":
            out = [f"scale_cuda={fit_args},hwdownload,format=nv12"]
        elif preset == "vaapi":
            out = [f"scale_vaapi={fit_args}:format=nv12,hwdownload,format=nv12"]
        else:
            # Scale in YUV (a quarter of the chroma to touch), then convert at the small size.
            out = [f"scale={fit_args}:flags=bilinear", "format=yuv420p"]
    elif preset in ("nvidia", "vaapi"):
        out = ["hwdownload", "format=nv12"]
    vf = ",".join(out + ["format=bgr24"])
    argv = head + hw + threads + src + ["-map", "0:v:0", "-an", "-sn", "-dn", "-vf", vf,
                                        "-f", "rawvideo", "-pix_fmt", "bgr24", "pipe:1"]
    return ChildCommand(argv, stdin, frames_on_stdout=True)


def _gst_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def gstreamer_command(cam: CameraConfig, defaults: SourceDefaults, preset: str,
                      fit: tuple[int, int] | None, frame_fd: int) -> ChildCommand:
    if preset not in GSTREAMER_PRESETS:
        raise ValueError(f"GStreamer has no '{preset}' preset (use one of {', '.join(GSTREAMER_PRESETS)})")
    if cam.kind == "rtsp":
        # gst-launch takes the whole pipeline from argv: user-id/user-pw are kept out of the
        # location, but remain visible to `ps` (use FFmpeg where that matters).
        bare, user, pw = _split_credentials(cam.open_url())
        src = (f"rtspsrc location={_gst_quote(bare)} "
               f"protocols={cam.transport} latency=200 tcp-timeout={int(defaults.open_timeout_s * 1_000_000)}")
        if user or pw:
            src += f" user-id={_gst_quote(user)} user-pw={_gst_quote(pw)}"
    elif cam.kind == "file":
        src = f"filesrc location={_gst_quote(cam.open_url())}"
    elif cam.kind == "http":
        src = f"souphttpsrc location={_gst_quote(cam.open_url())} timeout={max(1, int(defaults.read_timeout_s))}"
    else:
        raise ValueError(f"GStreamer decoding of {cam.kind} sources is not supported (use opencv)")
    w, h = fit or (0, 0)
    # Only the width is pinned: the height follows the camera's aspect (pixel-aspect-ratio 1/1),
    # which fits the box for every camera at least as wide as it is tall.
    size = f",width={w},pixel-aspect-ratio=1/1" if fit else ""
    if preset == "jetson":
        chain = f"decodebin ! nvvidconv ! video/x-raw,format=BGRx{size} ! videoconvert ! video/x-raw,format=BGR"
    elif preset == "vaapi":
        chain = (f"decodebin ! vapostproc ! video/x-raw{size} ! videoconvert ! video/x-raw,format=BGR")
    else:
        chain = f"decodebin ! videoconvert ! videoscale ! video/x-raw,format=BGR{size}"
    # sync=false: the camera thread paces a realtime file itself, and a live camera has its own pace.
    pipeline = f"{src} ! {chain} ! fdsink fd={frame_fd} sync=false"
    return ChildCommand(["gst-launch-1.0", "-v", "-e", *_split_gst(pipeline)], None, frames_on_stdout=False)


def _split_credentials(url: str) -> tuple[str, str, str]:
    p = urlsplit(url)
    bare = urlunsplit((p.scheme, p.netloc.rsplit("@", 1)[-1], p.path, p.query, p.fragment))
    return bare, unquote(p.username or ""), unquote(p.password or "")


def _split_gst(pipeline: str) -> list[str]:
    """gst-launch joins its arguments with spaces and parses the result; keep quoted values whole."""
    return re.findall(r'(?:[^\s"]+|"(?:\\.|[^"\\])*")+', pipeline)


# ---- what the child says about the stream ------------------------------------------------------------
_FF_STREAM = re.compile(r"Stream #\d+:\d+.*?: Video: (\w+).*?, (\d{2,5})x(\d{2,5})")
_FF_FPS = re.compile(r", ([\d.]+) fps")
_GST_CAPS = re.compile(r"caps = video/x-raw.*?width=\(int\)(\d+), height=\(int\)(\d+)")
_GST_CODEC = re.compile(r"caps = video/x-(h264|h265)")
_GST_RATE = re.compile(r"framerate=\(fraction\)(\d+)/(\d+)")


@dataclass
class StreamInfo:
    """Sizes and codec a child reported: the camera's own, then what it writes to the pipe."""

    codec: str = ""
    source: tuple[int, int] | None = None
    output: tuple[int, int] | None = None
    fps: float = 0.0

    def feed_ffmpeg(self, line: str) -> None:
        m = _FF_STREAM.search(line)
        if not m:
            return
        wh = (int(m.group(2)), int(m.group(3)))
        if self.source is None:          # FFmpeg prints the input's streams, then the output's
            self.codec, self.source = m.group(1), wh
            fps = _FF_FPS.search(line)
            self.fps = float(fps.group(1)) if fps else 0.0
        elif m.group(1) == "rawvideo":
            self.output = wh

    def feed_gstreamer(self, line: str) -> None:
        codec = _GST_CODEC.search(line)
        if codec and not self.codec:
            self.codec = codec.group(1)
        rate = _GST_RATE.search(line)
        if rate and not self.fps and int(rate.group(1)) and int(rate.group(2)):
            self.fps = int(rate.group(1)) / int(rate.group(2))
        m = _GST_CAPS.search(line)
        if not m:
            return
        wh = (int(m.group(1)), int(m.group(2)))
        if "GstFdSink" in line:
            self.output = wh
            self.source = self.source or wh
        elif self.source is None and "format=(string)BGR," not in line:
            self.source = wh             # the first raw caps: the decoder's own output
