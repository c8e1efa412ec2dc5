"""``streamd doctor``: what this machine can run, reported and never crashing.

On this machine (no TensorRT, no GPU): the OpenCV build is read, the tiny self-test network
runs like a raw YOLOv8 output, a CPU machine is reported cleanly (and fails only when
TensorRT is required), a broken model fails, and a daemon-only install (the onnx package
absent, blocked in a real ``streamd doctor`` process) says what it skipped and why and
exits as it would with onnx.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from streamd.backends.tensorrt.probe import tensorrt_version
from streamd.service.doctor import selftest_needs

REPO = Path(__file__).resolve().parents[1]
# A daemon-only install: `import onnx` fails in this process, as it does where the package
# is absent (None in sys.modules makes Python's import raise ImportError).
NO_ONNX = ("import sys; sys.modules['onnx'] = None; from streamd.cli import main; "
           "sys.exit(main(sys.argv[1:]))")


def run_doctor(*argv: str) -> int:
    from streamd.cli import doctor

    parser = argparse.ArgumentParser(prog="streamd")
    doctor.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["doctor", *argv])
    return int(args.func(args))


def test_opencv_build_information_is_read() -> None:
    import cv2

    from streamd.service.doctor import opencv_video_io

    text = ("  Video I/O:\n    DC1394:                      NO\n    FFMPEG:                      YES\n"
            "      avcodec:                   YES (59.37.100)\n    GStreamer:                   NO\n"
            "    v4l/v4l2:                    YES (linux/videodev2.h)\n\n  Parallel framework:    pthreads\n")
    assert opencv_video_io(text) == {"FFMPEG": True, "GStreamer": False}
    # The installed OpenCV reads the test videos, so its build must say FFmpeg.
    assert opencv_video_io(cv2.getBuildInformation())["FFMPEG"] is True


def test_two_opencv_wheels_sharing_cv2_are_reported() -> None:
    from importlib import metadata

    from streamd.service.doctor import _installed_distributions, opencv_wheels, opencv_wheels_note

    assert opencv_wheels(["numpy", "opencv_python_headless"]) == ["opencv-python-headless"]
    assert opencv_wheels_note(["opencv-python-headless"]) is None
    both = opencv_wheels(["Opencv-Python", "opencv-python-headless", "trackers"])
    assert both == ["opencv-python", "opencv-python-headless"]
    note = opencv_wheels_note(both)
    assert note is not None and "share cv2" in note and "libgl1" in note
    headless_only = opencv_wheels_note(["opencv-python-headless", "opencv-contrib-python-headless"])
    assert headless_only is not None and "libgl1" not in headless_only
    # What this environment really has is read from its installed distributions.
    installed = opencv_wheels(_installed_distributions())
    assert "opencv-python-headless" in installed
    assert all(metadata.version(w) for w in installed)


def test_doctor_tiny_model_runs_like_a_raw_yolo_output(tmp_path: Path) -> None:
    import onnxruntime as ort

    from streamd.service.doctor import TINY_CLASSES, TINY_HW, tiny_onnx

    path = tmp_path / "tiny.onnx"
    tiny_onnx(path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((2, 3, *TINY_HW), dtype=np.float32)
    (y,) = sess.run(None, {"images": x})
    assert y.shape == (2, 4 + TINY_CLASSES, TINY_HW[0] * TINY_HW[1])
    assert 0 < y.min() and y.max() < 1 and y.std() > 0.05     # a sigmoid of varied values


def test_doctor_reports_a_cpu_machine_cleanly(capfd: pytest.CaptureFixture[str], fall_onnx_320: Path) -> None:
    if tensorrt_version() is not None:
        pytest.skip("TensorRT is installed here")
    rc = run_doctor("--model", str(fall_onnx_320))
    out = capfd.readouterr().out
    assert rc == 0, out
    assert "[ok  ] onnxruntime" in out and "CPUExecutionProvider" in out
    assert "FFmpeg yes" in out
    assert "[--  ] tensorrt         not installed" in out
    # Each decoder preset was tried on a generated clip: software works, hardware absent here.
    if shutil.which("ffmpeg"):
        assert "[ok  ] decoder ffmpeg/none" in out and "[ok  ] decoder auto" in out
    if not Path("/dev/nvidiactl").exists():
        assert "[--  ] decoder ffmpeg/nvidia not available: no NVIDIA driver" in out
    assert "[ok  ] model" in out and "2 classes, 320x320" in out
    assert "engine self-test skipped: needs TensorRT" in out
    assert "everything checked works" in out and "Traceback" not in out
    # The same machine fails when TensorRT is required.
    assert run_doctor("--require-tensorrt") == 1
    assert "not working: tensorrt" in capfd.readouterr().out


def test_doctor_fails_on_a_broken_model(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    assert run_doctor("--model", str(bad)) == 1
    out = capfd.readouterr().out
    assert "[FAIL] model" in out and "not working: model" in out


def doctor_process(*argv: str, block_onnx: bool) -> subprocess.CompletedProcess[str]:
    """``streamd doctor`` in a process of its own, with or without the onnx package."""
    code = NO_ONNX if block_onnx else "import sys; from streamd.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "doctor", *argv], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def selftest_line(out: str) -> str:
    return next(line for line in out.splitlines() if "engine self-test" in line)


@pytest.mark.slow
def test_doctor_without_onnx_skips_only_the_tiny_network_and_says_why() -> None:
    with_onnx = doctor_process(block_onnx=False)
    without = doctor_process(block_onnx=True)
    assert "Traceback" not in without.stderr + without.stdout, without.stderr
    # The same exit status as with onnx installed: a skipped self-test is not a failure.
    assert without.returncode == with_onnx.returncode, without.stdout + without.stderr
    line = selftest_line(without.stdout)
    assert line.startswith("  [--  ] engine self-test skipped: needs"), line
    assert "the onnx package" in line and "daemon-only install" in line and "--model" in line
    assert "onnx" not in selftest_line(with_onnx.stdout)
    assert "[FAIL] engine self-test" not in without.stdout


@pytest.mark.slow
def test_doctor_with_a_model_needs_no_onnx(fall_onnx_320: Path) -> None:
    r = doctor_process("--model", str(fall_onnx_320), block_onnx=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[ok  ] model" in r.stdout and "2 classes, 320x320" in r.stdout
    # With --model the self-test builds from the model's file: onnx is not among its needs.
    assert "onnx package" not in selftest_line(r.stdout)


def test_selftest_needs_onnx_only_for_its_own_tiny_network() -> None:
    here = {"tensorrt": True, "cuda": True, "gpu": True}
    blocked = "import of onnx halted; None in sys.modules"
    # TensorRT, a CUDA binding and a GPU present, onnx absent: skipped for onnx alone, saying so.
    (need,) = selftest_needs(**here, model=None, onnx_problem=blocked)
    assert need.startswith("the onnx package") and blocked in need and "--model" in need
    # An exported model is built directly: onnx is not needed.
    assert selftest_needs(**here, model=Path("m.onnx"), onnx_problem=blocked) == []
    assert selftest_needs(**here, model=None, onnx_problem=None) == []
    assert selftest_needs(tensorrt=False, cuda=True, gpu=False, model=None, onnx_problem=None) == \
        ["TensorRT", "a GPU"]
