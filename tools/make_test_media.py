#!/usr/bin/env python3
"""Make test media for the RTSP test server: moving JPEG sequences and H.264 clips.

From real photographs (by default Ultralytics' ``bus.jpg`` and ``zidane.jpg``, so the
detector has people to find) this writes, for each image ``NAME``:

* ``NAME/frame000.jpg`` ... a looping sequence with a slow pan and zoom, so consecutive
  frames differ the way a camera's do, while the whole photograph (and every person in
  it) stays in view;
* optionally ``NAME.mp4`` (H.264, GOP 15, no B-frames) and ``NAME.h264`` (the same
  stream as Annex-B, the form ``multifilesrc`` can loop).

With ``--tracks`` it also writes the ground-truth tracking sequences of
``make_tracking_media.py`` (people walking known paths at 5 and 15 fps, boxes in ``gt.txt``).

With ``--corrupt`` it also writes ``NAME-corrupt.mp4``: the clip with random bytes in places
of its coded pictures (the container's index left whole), like a file damaged on a flaky
disk or by a bad transfer (``corrupt_clip()``).

Runs with the project's virtual environment (numpy, OpenCV) and the ``ffmpeg`` binary.
Outputs already present with the same parameters are kept, so calling it again is cheap.

Tests and the demo load this file by path (see ``tests/fixtures_rtsp.py``) and call
``make_media()``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

DEFAULT_IMAGE_NAMES: tuple[str, ...] = ("bus.jpg", "zidane.jpg")
FRAME_PATTERN = "frame%03d.jpg"
# The grey Ultralytics pads letterboxes with: padding then looks like what the
# detector sees in training instead of a hard black edge.
PAD_VALUE = 114
PARAMS_FILE = "params.json"
# Bump when the way frames are drawn changes, so cached sequences are remade.
RECIPE_VERSION = 2


@dataclass(frozen=True)
class MediaSet:
    """The media made from one source image."""

    name: str
    source: Path
    frames_dir: Path
    frame_count: int
    size: tuple[int, int]  # (width, height)
    fps: int
    mp4: Path | None
    h264: Path | None

    @property
    def pattern(self) -> str:
        """printf-style path of the frames, as ``multifilesrc`` takes it."""
        return str(self.frames_dir / FRAME_PATTERN)

    def frame_paths(self) -> list[Path]:
        return [self.frames_dir / (FRAME_PATTERN % i) for i in range(self.frame_count)]

    def images_spec(self, fps: float | None = None) -> str:
        """Mount spec of the RTSP test server for a paced, live-encoded camera."""
        rate = self.fps if fps is None else fps
        return f"images:{self.pattern}@{rate:g}"

    def h264_spec(self) -> str:
        """Mount spec of the RTSP test server for the (unpaced, bursting) H.264 loop."""
        if self.h264 is None:
            raise ValueError(f"no H.264 clip was made for {self.name!r}")
        return f"h264:{self.h264}"


def default_images() -> list[Path]:
    """Ultralytics' sample photographs, located through the installed package."""
    # find_spec locates the package without importing it (importing costs seconds).
    spec = importlib.util.find_spec("ultralytics")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "default test images come from the 'ultralytics' package, which is not "
            "installed; pass images explicitly (--image PATH)"
        )
    assets = Path(spec.origin).resolve().parent / "assets"
    paths = [assets / n for n in DEFAULT_IMAGE_NAMES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"Ultralytics sample images not found: {missing}")
    return paths


def _view_transform(
    img_w: int, img_h: int, out_w: int, out_h: int, phase: float
) -> np.ndarray:
    """Affine map from image to output pixels for one point of the motion cycle.

    The view window always contains the whole image (so nobody is cropped away);
    it breathes between the tightest such window and a 12% larger one and drifts
    inside the slack that gives. Sinusoids of one full period make the last frame
    flow into the first, so a looped sequence has no jump.
    """
    out_aspect = out_w / out_h
    fit_w = max(img_w, img_h * out_aspect)
    zoom = 1.0 + 0.06 * (1.0 - math.cos(2.0 * math.pi * phase))  # 1.00 .. 1.12
    win_w = fit_w * zoom
    win_h = win_w / out_aspect
    slack_x = (win_w - img_w) / 2.0
    slack_y = (win_h - img_h) / 2.0
    # Drift along a Lissajous path; 0.9 keeps a margin from the image edges, and the
    # 4% cap keeps a portrait photo (lots of slack sideways) from sweeping across.
    amp_x = min(0.9 * slack_x, 0.04 * win_w)
    amp_y = min(0.9 * slack_y, 0.04 * win_h)
    cx = img_w / 2.0 + amp_x * math.sin(2.0 * math.pi * phase)
    cy = img_h / 2.0 + amp_y * math.sin(4.0 * math.pi * phase)
    scale = out_w / win_w
    left = cx - win_w / 2.0
    top = cy - win_h / 2.0
    return np.array([[scale, 0.0, -left * scale], [0.0, scale, -top * scale]], dtype=np.float64)


def render_frames(image: np.ndarray, size: tuple[int, int], frames: int) -> list[np.ndarray]:
    """The moving sequence for one image, as BGR arrays of ``size`` (width, height)."""
    out_w, out_h = size
    img_h, img_w = image.shape[:2]
    result = []
    for i in range(frames):
        m = _view_transform(img_w, img_h, out_w, out_h, i / frames)
        result.append(
            cv2.warpAffine(
                image,
                m,
                (out_w, out_h),
                flags=cv2.INTER_AREA if m[0, 0] < 1.0 else cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=(PAD_VALUE, PAD_VALUE, PAD_VALUE),
            )
        )
    return result


def _params(source: Path, size: tuple[int, int], frames: int) -> dict[str, object]:
    return {
        "recipe": RECIPE_VERSION,
        "source": str(source.resolve()),
        "source_bytes": source.stat().st_size,
        "size": list(size),
        "frames": frames,
    }


def _frames_current(frames_dir: Path, params: dict[str, object]) -> bool:
    try:
        stored = json.loads((frames_dir / PARAMS_FILE).read_text())
    except (OSError, ValueError):
        return False
    return stored == params


def _publish_dir(tmp_dir: Path, final: Path) -> None:
    """Move a finished directory into place so readers never see a partial one."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp_dir, final)
    except OSError:
        # Another process published the same media first; theirs is as good.
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if not final.is_dir():
            raise


def _write_frames(
    source: Path, frames_dir: Path, size: tuple[int, int], frames: int, params: dict[str, object]
) -> None:
    image = cv2.imread(str(source), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot read image {source}")
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{frames_dir.name}.", dir=frames_dir.parent))
    tmp_dir.chmod(0o755)  # mkdtemp makes it private; the media is meant to be shared
    try:
        for i, frame in enumerate(render_frames(image, size, frames)):
            path = tmp_dir / (FRAME_PATTERN % i)
            if not cv2.imwrite(str(path), frame, [cv2.IMWRITE_JPEG_QUALITY, 90]):
                raise OSError(f"cannot write {path}")
        (tmp_dir / PARAMS_FILE).write_text(json.dumps(params, indent=1) + "\n")
        _publish_dir(tmp_dir, frames_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def _run_ffmpeg(args: list[str]) -> None:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise FileNotFoundError("ffmpeg not found on PATH (apt-get install ffmpeg)")
    proc = subprocess.run(
        [ffmpeg, "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed ({proc.returncode}): {proc.stderr.strip()}")


def _write_h264(frames_dir: Path, mp4: Path, h264: Path, fps: int) -> None:
    # Temporary names keep the real ones absent until complete; the suffix stays last
    # so ffmpeg still picks the container from it.
    tmp_mp4 = mp4.with_name(f".{mp4.stem}.{os.getpid()}.tmp.mp4")
    tmp_h264 = h264.with_name(f".{h264.stem}.{os.getpid()}.tmp.h264")
    try:
        _run_ffmpeg([
            "-framerate", str(fps),
            "-i", str(frames_dir / FRAME_PATTERN),
            # GOP 15 and no B-frames: like an IP camera, so a reader joining
            # mid-stream gets a picture quickly and decode order is display order.
            "-c:v", "libx264", "-g", "15", "-bf", "0",
            "-pix_fmt", "yuv420p", "-preset", "veryfast",
            "-movflags", "+faststart",
            str(tmp_mp4),
        ])
        _run_ffmpeg([
            "-i", str(tmp_mp4),
            "-c:v", "copy", "-bsf:v", "h264_mp4toannexb", "-f", "h264",
            str(tmp_h264),
        ])
        os.replace(tmp_mp4, mp4)
        os.replace(tmp_h264, h264)
    finally:
        tmp_mp4.unlink(missing_ok=True)
        tmp_h264.unlink(missing_ok=True)


def _mdat_span(data: bytes) -> tuple[int, int]:
    """Where the coded pictures are: the payload of the top-level ``mdat`` box."""
    pos = 0
    while pos + 8 <= len(data):
        size, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        header = 8
        if size == 1:                       # 64-bit size follows
            size, header = int.from_bytes(data[pos + 8:pos + 16], "big"), 16
        elif size == 0:                     # to the end of the file
            size = len(data) - pos
        if kind == b"mdat":
            return pos + header, pos + size
        if size < header:
            break
        pos += size
    raise ValueError("no mdat box: not an MP4 file")


def corrupt_clip(src: str | os.PathLike[str], dst: str | os.PathLike[str], fraction: float = 0.05,
                 places: int = 10, seed: int = 1) -> Path:
    """Copy the MP4 ``src`` to ``dst`` with ``fraction`` of its picture bytes randomised in
    ``places`` evenly spread runs. The index (``moov``) stays whole, so the file opens and
    knows its length; the damaged pictures fail to decode or are concealed."""
    data = bytearray(Path(src).read_bytes())
    lo, hi = _mdat_span(bytes(data))
    run = max(1, int(fraction * (hi - lo)) // places)
    rng = random.Random(seed)
    for k in range(places):
        start = lo + int((hi - lo - run) * (k + 0.5) / places)
        data[start:start + run] = rng.randbytes(run)
    out = Path(dst)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, out)
    return out


def make_media(
    out_dir: str | os.PathLike[str],
    images: list[str | os.PathLike[str]] | None = None,
    size: tuple[int, int] = (640, 480),
    frames: int = 45,
    h264: bool = True,
    fps: int = 10,
    log: bool = False,
) -> dict[str, MediaSet]:
    """Make (or reuse) the media for each image; keys are the image file stems.

    ``fps`` only sets the nominal rate written into the clips; the images mode of the
    RTSP server is paced at whatever rate its mount spec asks.
    """
    width, height = size
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        # yuv420p (x264 and the RTSP server's encoder) needs even dimensions.
        raise ValueError(f"size must be positive and even, got {size}")
    if frames < 2:
        raise ValueError("need at least 2 frames for motion")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = [Path(p) for p in images] if images else default_images()
    names = [p.stem for p in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"images must have distinct file names, got {names}")

    result: dict[str, MediaSet] = {}
    for source in sources:
        name = source.stem
        frames_dir = out / name
        params = _params(source, (width, height), frames)
        remade = False
        if _frames_current(frames_dir, params):
            if log:
                print(f"kept   {frames_dir}/{FRAME_PATTERN} ({frames} frames)")
        else:
            _write_frames(source, frames_dir, (width, height), frames, params)
            remade = True
            if log:
                print(f"made   {frames_dir}/{FRAME_PATTERN} ({frames} frames, {width}x{height})")

        mp4_path: Path | None = None
        h264_path: Path | None = None
        if h264:
            mp4_path = out / f"{name}.mp4"
            h264_path = out / f"{name}.h264"
            # Clips are derived from the frames: remake them when the frames changed.
            if remade or not (mp4_path.is_file() and h264_path.is_file()):
                _write_h264(frames_dir, mp4_path, h264_path, fps)
                if log:
                    print(f"made   {mp4_path} and {h264_path}")
            elif log:
                print(f"kept   {mp4_path} and {h264_path}")
        result[name] = MediaSet(
            name=name,
            source=source,
            frames_dir=frames_dir,
            frame_count=frames,
            size=(width, height),
            fps=fps,
            mp4=mp4_path,
            h264=h264_path,
        )
    return result


def load_sibling(stem: str) -> Any:
    """Another script of tools/ as a module (``tools/`` is not a package)."""
    name = f"streamd_tools_{stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / f"{stem}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load tools/{stem}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default=".cache/test-media",
                        help="output directory (default: %(default)s)")
    parser.add_argument("--image", action="append", dest="images", metavar="PATH",
                        help="source image (repeatable); default: Ultralytics' bus.jpg and zidane.jpg")
    parser.add_argument("--size", type=_parse_size, default=(640, 480), metavar="WxH",
                        help="frame size (default: 640x480)")
    parser.add_argument("--frames", type=int, default=45, help="frames per sequence (default: 45)")
    parser.add_argument("--fps", type=int, default=10, help="nominal rate of the clips (default: 10)")
    parser.add_argument("--no-h264", dest="h264", action="store_false",
                        help="only make the JPEG sequences")
    parser.add_argument("--corrupt", action="store_true",
                        help="also NAME-corrupt.mp4: 5%% of each clip's picture bytes randomised in 10 places")
    parser.add_argument("--tracks", action="store_true",
                        help="also the ground-truth tracking sequences at 5 and 15 fps (make_tracking_media.py)")
    args = parser.parse_args(argv)
    try:
        made = make_media(args.out_dir, args.images, args.size, args.frames, args.h264, args.fps, log=True)
        for media in made.values():
            if args.corrupt and media.mp4 is not None:
                print(f"made   {corrupt_clip(media.mp4, media.mp4.with_name(f'{media.name}-corrupt.mp4'))}")
        if args.tracks:
            load_sibling("make_tracking_media").make_sequences(args.out_dir, h264=args.h264, log=True)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
