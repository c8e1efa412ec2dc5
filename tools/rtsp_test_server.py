#!/usr/bin/python3
"""Loopback RTSP server that stands in for IP cameras in tests and the demo.

Runs with the system Python, which has GStreamer's introspection bindings (``gi``):

    /usr/bin/python3 tools/rtsp_test_server.py --port 0 \\
        --mount /cam1=images:.cache/test-media/bus/frame%03d.jpg@10 \\
        --mount /cam2=h264:.cache/test-media/zidane.h264

Mount specs:

``images:PATTERN@FPS``
    A printf-style JPEG pattern (``frame%03d.jpg``) or a single JPEG, looped, scaled to
    ``--width``x``--height`` and encoded live with x264 at FPS frames per second. It is
    paced by the clock like a real camera and costs CPU for the encoding.
``images-h265:PATTERN@FPS``
    The same, encoded live with x265: an H.265 camera.
``h264:FILE``
    An Annex-B H.264 file, looped without re-encoding and not paced: the server sends it
    as fast as the slowest reader of the mount takes it (TCP back-pressure is the only
    brake), which makes a camera that overloads its reader. The RTP timestamps do not
    advance in this mode.
``h264:FILE@FPS``
    The same file, looped without re-encoding but paced at FPS with fresh timestamps:
    a camera that costs the server almost no CPU.

Every mount is shared: all readers of one mount get the same stream. With ``--user``
and a password every mount needs RTSP basic authentication. The password comes from
``--password`` or, so it stays off command lines, from the environment variable named
by ``--password-env``; it is never printed.

Once listening, the server prints exactly one line ``READY rtsp://HOST:PORT`` to stdout;
``--port 0`` picks a free port and that line tells which. It stops cleanly on SIGTERM or
SIGINT, and with ``--exit-on-stdin-eof`` also when its standard input closes, so a
crashed parent cannot leave it running.

Exit status: 0 after a clean stop, 2 for bad arguments or media, 3 when the address
cannot be bound (the port is taken), 1 for other failures.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import signal
import sys
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

EXIT_USAGE = 2
EXIT_BIND = 3

GST_RTSP_INSTALL_HINT = (
    "GStreamer RTSP server not installed: apt-get install python3-gi gir1.2-gst-rtsp-server-1.0 "
    "gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad "
    "gstreamer1.0-plugins-ugly gstreamer1.0-libav"
)


class UsageError(Exception):
    pass


@dataclass(frozen=True)
class ImagesMount:
    path: str
    pattern: str
    start_index: int
    fps: Fraction
    codec: str = "h264"          # h264 | h265


@dataclass(frozen=True)
class H264Mount:
    path: str
    file: str
    fps: Fraction | None  # None: unpaced


Mount = ImagesMount | H264Mount


def _parse_fps(text: str) -> Fraction:
    try:
        fps = Fraction(text).limit_denominator(1001)
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"bad frame rate {text!r}") from None
    if not 0 < fps <= 240:
        raise UsageError(f"frame rate must be in (0, 240], got {text!r}")
    return fps


def _first_index(pattern: str) -> int:
    """Index of the first existing file of a printf pattern (0 or 1, as tools write)."""
    if "%" not in pattern:
        if not os.path.isfile(pattern):
            raise UsageError(f"image not found: {pattern}")
        return 0
    for index in (0, 1):
        try:
            name = pattern % index
        except (TypeError, ValueError):
            raise UsageError(f"bad image pattern {pattern!r}: one integer conversion expected") from None
        if os.path.isfile(name):
            return index
    raise UsageError(f"no image for pattern {pattern!r} (tried indices 0 and 1)")


def parse_mount(text: str) -> Mount:
    path, sep, spec = text.partition("=")
    if not sep or not path.startswith("/") or path == "/":
        raise UsageError(f"mount must look like /name=SPEC, got {text!r}")
    if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", path):
        raise UsageError(f"mount path {path!r} may only use letters, digits and . _ ~ -")
    kind, sep, rest = spec.partition(":")
    if kind in ("images", "images-h265") and sep:
        pattern, at, fps_text = rest.rpartition("@")
        if not at or not pattern:
            raise UsageError(f"images mount needs PATTERN@FPS, got {spec!r}")
        pattern = os.path.abspath(pattern)
        return ImagesMount(path, pattern, _first_index(pattern), _parse_fps(fps_text),
                           "h265" if kind == "images-h265" else "h264")
    if kind == "h264" and sep:
        file, fps = rest, None
        # A file name may itself contain '@'; only a trailing @NUMBER is a rate.
        head, at, tail = rest.rpartition("@")
        if at and head and re.fullmatch(r"[0-9]+(\.[0-9]+)?(/[0-9]+)?", tail):
            file, fps = head, _parse_fps(tail)
        file = os.path.abspath(file)
        if not os.path.isfile(file):
            raise UsageError(f"H.264 file not found: {file}")
        return H264Mount(path, file, fps)
    raise UsageError(f"mount spec must be images[-h265]:PATTERN@FPS or h264:FILE[@FPS], got {spec!r}")


def _quote(value: str) -> str:
    """A property value for a gst-launch description, safe for any file name."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def launch_line(mount: Mount, width: int, height: int) -> str:
    if isinstance(mount, ImagesMount):
        fps = mount.fps
        # One keyframe a second: a reader joining the shared stream waits at most that
        # long for a decodable picture.
        gop = max(1, round(float(fps)))
        return (
            "( multifilesrc location={loc} index={idx} start-index={idx} stop-index=-1 loop=true"
            " caps=\"image/jpeg,framerate={n}/{d}\""
            " ! jpegdec ! videoconvert ! videoscale"
            " ! video/x-raw,width={w},height={h},pixel-aspect-ratio=1/1"
            # Holding each buffer until its clock time is what paces the stream.
            " ! identity sync=true"
            " ! {enc} tune=zerolatency speed-preset=ultrafast key-int-max={gop}"
            " ! rtp{codec}pay name=pay0 pt=96 config-interval=1 )"
        ).format(
            enc="x265enc" if mount.codec == "h265" else "x264enc", codec=mount.codec,
            loc=_quote(mount.pattern), idx=mount.start_index, n=fps.numerator,
            d=fps.denominator, w=width, h=height, gop=gop,
        )
    # A plain .mp4 through qtdemux stops after one pass; raw Annex-B loops. The
    # timestamps h264parse derives are replaced by a probe on "parse" (see
    # retime_h264).
    return (
        "( multifilesrc location={loc} loop=true"
        " caps=\"video/x-h264,stream-format=byte-stream\""
        " ! h264parse name=parse ! rtph264pay name=pay0 pt=96 config-interval=1 )"
    ).format(loc=_quote(mount.file))


def retime_h264(Gst: Any, media: Any, fps: Fraction | None) -> None:
    """Give the looped H.264 stream the timing its mount asks for.

    h264parse stamps only DTS, from the frame rate in the SPS, and restarts nothing at
    the loop point; the server's sinks wait for those times, so left alone the stream
    would be paced at the file's own rate with RTP timestamps that never advance
    (readers then need seconds to open it). Without a rate, clearing the timestamps
    leaves the sinks nothing to wait for, so the stream bursts. With a rate, a frame
    counter gives monotonic PTS = DTS across loops (the files have no B-frames), which
    both paces the stream and gives readers proper RTP timestamps.
    """
    parse = media.get_element().get_by_name("parse")
    frames = 0

    def on_buffer(_pad: Any, info: Any) -> Any:
        nonlocal frames
        buf = info.get_buffer()
        if fps is None:
            buf.pts = buf.dts = Gst.CLOCK_TIME_NONE
        else:
            buf.pts = buf.dts = frames * Gst.SECOND * fps.denominator // fps.numerator
            buf.duration = Gst.SECOND * fps.denominator // fps.numerator
            frames += 1
        return Gst.PadProbeReturn.OK

    parse.get_static_pad("src").add_probe(Gst.PadProbeType.BUFFER, on_buffer)


def _check_host(host: str, allow_non_loopback: bool) -> str:
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"--host must be an IP address or 'localhost', got {host!r}") from None
    if not address.is_loopback and not allow_non_loopback:
        raise UsageError(
            f"refusing to serve on non-loopback address {host}: test media would be "
            "reachable from the network (pass --allow-non-loopback to do it anyway)"
        )
    return host


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Loopback RTSP server for tests: serves JPEG sequences and H.264 files as cameras.",
        epilog="Mount specs: images:PATTERN@FPS (live-encoded, paced), images-h265:PATTERN@FPS (the same "
               "in H.265), h264:FILE (Annex-B, looped, "
               "unpaced) or h264:FILE@FPS (Annex-B, looped, paced).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one (default: 0)")
    parser.add_argument("--mount", action="append", required=True, metavar="/PATH=SPEC",
                        help="a stream to serve (repeatable)")
    parser.add_argument("--width", type=int, default=640, help="images mode frame width (default: 640)")
    parser.add_argument("--height", type=int, default=480, help="images mode frame height (default: 480)")
    parser.add_argument("--user", help="require RTSP basic auth with this user name")
    parser.add_argument("--password", help="the password for --user")
    parser.add_argument("--password-env", metavar="VAR",
                        help="read the password for --user from this environment variable")
    parser.add_argument("--allow-non-loopback", action="store_true",
                        help="allow --host to be an address reachable from other machines")
    parser.add_argument("--exit-on-stdin-eof", action="store_true",
                        help="stop when standard input reaches end of file (the parent went away)")
    args = parser.parse_args(argv)

    try:
        args.host = _check_host(args.host, args.allow_non_loopback)
        if not 0 <= args.port <= 65535:
            raise UsageError(f"bad port {args.port}")
        for value in (args.width, args.height):
            if value <= 0 or value % 2:
                raise UsageError("--width and --height must be positive and even (the encoder uses 4:2:0)")
        if args.password_env is not None:
            if args.password is not None:
                raise UsageError("give --password or --password-env, not both")
            if args.password_env not in os.environ:
                raise UsageError(f"environment variable {args.password_env} is not set")
            args.password = os.environ[args.password_env]
        if (args.user is None) != (args.password is None):
            raise UsageError("--user and a password go together")
        if args.user is not None and (not args.user or ":" in args.user):
            raise UsageError("--user must be non-empty and contain no ':'")
        args.mounts = [parse_mount(m) for m in args.mount]
        paths = [m.path for m in args.mounts]
        if len(set(paths)) != len(paths):
            raise UsageError(f"mount paths must be distinct, got {paths}")
    except UsageError as exc:
        parser.exit(EXIT_USAGE, f"{parser.prog}: error: {exc}\n")
    return args


def _import_gst() -> tuple[Any, Any, Any]:
    try:
        import gi

        gi.require_version("Gst", "1.0")
        gi.require_version("GstRtspServer", "1.0")
        from gi.repository import GLib, Gst, GstRtspServer
    except (ImportError, ValueError) as exc:
        print(f"{GST_RTSP_INSTALL_HINT} ({exc})", file=sys.stderr)
        sys.exit(1)
    Gst.init(None)
    return GLib, Gst, GstRtspServer


def serve(args: argparse.Namespace) -> int:
    GLib, Gst, GstRtspServer = _import_gst()

    missing = [e for e in ("multifilesrc", "jpegdec", "videoconvert", "videoscale", "identity",
                           "x264enc", "h264parse", "rtph264pay")
               if Gst.ElementFactory.find(e) is None]
    if missing:
        print(f"GStreamer elements missing: {', '.join(missing)}. {GST_RTSP_INSTALL_HINT}", file=sys.stderr)
        return 1

    server = GstRtspServer.RTSPServer()
    server.set_address(args.host)
    server.set_service(str(args.port))

    permissions = None
    if args.user is not None:
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, args.user)
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(args.user, args.password), token)
        # No default token: a client without valid credentials has no role, so every
        # factory refuses it.
        server.set_auth(auth)
        permissions = GstRtspServer.RTSPPermissions()
        for perm in (GstRtspServer.RTSP_PERM_MEDIA_FACTORY_ACCESS,
                     GstRtspServer.RTSP_PERM_MEDIA_FACTORY_CONSTRUCT):
            permissions.add_permission_for_role(args.user, perm, True)

    mounts = server.get_mount_points()
    for mount in args.mounts:
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(launch_line(mount, args.width, args.height))
        factory.set_shared(True)
        if permissions is not None:
            factory.set_permissions(permissions)
        if isinstance(mount, H264Mount):
            factory.connect("media-configure",
                            lambda _f, media, fps=mount.fps: retime_h264(Gst, media, fps))
        mounts.add_factory(mount.path, factory)

    # create_source() binds now and reports failure as an exception, unlike attach().
    try:
        source = server.create_source(None)
    except GLib.Error as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc.message}", file=sys.stderr)
        return EXIT_BIND
    source.attach(None)
    port = server.get_bound_port()

    loop = GLib.MainLoop()
    stop_reason: list[str] = []

    def request_stop(reason: str) -> bool:
        stop_reason.append(reason)
        loop.quit()
        return GLib.SOURCE_REMOVE

    for signum in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, signum, request_stop, signal.Signals(signum).name)
    if args.exit_on_stdin_eof:
        def on_stdin(fd: int, condition: Any) -> bool:
            # Any readable state is treated as a request to stop; the parent never writes,
            # so in practice this is EOF or a hang-up.
            data = os.read(fd, 4096) if condition & GLib.IOCondition.IN else b""
            if data:
                return GLib.SOURCE_CONTINUE
            return request_stop("stdin closed")

        GLib.unix_fd_add_full(GLib.PRIORITY_DEFAULT, sys.stdin.fileno(),
                              GLib.IOCondition.IN | GLib.IOCondition.HUP | GLib.IOCondition.ERR,
                              on_stdin)

    host = f"[{args.host}]" if ":" in args.host else args.host
    for mount in args.mounts:
        if isinstance(mount, ImagesMount):
            what = f"images {mount.pattern} {args.width}x{args.height} @ {mount.fps} fps (paced)"
        elif mount.fps is None:
            what = f"h264 {mount.file} (looped, unpaced)"
        else:
            what = f"h264 {mount.file} (looped) @ {mount.fps} fps (paced)"
        print(f"serving {mount.path}: {what}", file=sys.stderr)
    if args.user is not None:
        print(f"basic auth required (user {args.user!r})", file=sys.stderr)
    print(f"READY rtsp://{host}:{port}", flush=True)

    loop.run()

    print(f"stopping ({', '.join(stop_reason) or 'main loop ended'})", file=sys.stderr)
    source.destroy()
    # Dropping the sessions shuts the media pipelines down while the interpreter is
    # intact; exiting with their streaming threads still running can crash at exit.
    server.client_filter(lambda _server, _client: GstRtspServer.RTSPFilterResult.REMOVE)
    context = GLib.MainContext.default()
    while context.iteration(False):
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return serve(args)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
