"""``streamd doctor``: what this machine can run, checked rather than assumed.

Reports Python and the platform, ONNX Runtime and its providers, OpenCV and whether it can
decode cameras (FFmpeg, GStreamer), which child-process decoder presets work (each tried on a
generated clip: FFmpeg software/NVDEC/VA-API, GStreamer software/Jetson/VA-API), TensorRT, the CUDA binding (cuda-python or pycuda) and driver, and the GPU.
Where TensorRT and a GPU are both present it proves them: builds a small engine (from
``--model``, or from a tiny convolution network made in memory with the onnx package, no
export needed), runs it through streamd's TensorRT backend and compares the output with
ONNX Runtime's on a real picture. A daemon-only install has no onnx package: there the
self-test without ``--model`` is skipped, and the report says so and why.

A component that is simply not installed (TensorRT on a CPU box) is reported, not failed,
unless ``--require-tensorrt`` says it must be there. Exit status: 0 when everything that
could be checked works, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..manifest import FLOAT_INPUT, InputContract

OK, MISSING, FAIL = "ok", "missing", "FAIL"
TINY_HW = (64, 64)
TINY_CLASSES = 2
TINY_TOLERANCE = 1e-2      # TF32 convolutions on Ampere+ differ from FP32 by ~1e-3 here


@dataclass
class Check:
    name: str
    status: str                # OK | MISSING | FAIL
    detail: str


def _line(c: Check) -> str:
    mark = {OK: "ok  ", MISSING: "--  ", FAIL: "FAIL"}[c.status]
    return f"  [{mark}] {c.name:<16} {c.detail}"


def opencv_video_io(build_info: str) -> dict[str, bool]:
    """FFmpeg / GStreamer support from ``cv2.getBuildInformation()``'s Video I/O section."""
    found: dict[str, bool] = {"FFMPEG": False, "GStreamer": False}
    in_video = False
    for raw in build_info.splitlines():
        line = raw.strip()
        if line.startswith("Video I/O:"):
            in_video = True
            continue
        if in_video and line.endswith(":") and not raw.startswith("    "):
            break
        if in_video:
            for key in found:
                if line.startswith(f"{key}:"):
                    found[key] = line.split(":", 1)[1].strip().upper().startswith("YES")
    return found


# OpenCV's PyPI wheels all install the same ``cv2`` package: with two of them in one
# environment the files of whichever was installed last are the ones imported. streamd asks
# for the headless one; Roboflow's ``trackers`` (the ``tracking`` extra) asks for the GUI
# one, whose cv2 needs libGL and X11 libraries a server may not have.
_OPENCV_WHEELS = ("opencv-python", "opencv-python-headless", "opencv-contrib-python",
                  "opencv-contrib-python-headless")


def _installed_distributions() -> list[str]:
    from importlib import metadata
    return [d.metadata["Name"] or "" for d in metadata.distributions()]


def opencv_wheels(names: list[str]) -> list[str]:
    """The OpenCV wheels among installed distribution ``names`` (PyPI names compare
    case-insensitively, with ``_`` and ``-`` the same)."""
    normal = {n.lower().replace("_", "-") for n in names}
    return [w for w in _OPENCV_WHEELS if w in normal]


def opencv_wheels_note(wheels: list[str]) -> str | None:
    """A warning when more than one OpenCV wheel shares ``cv2``; None when there is one."""
    if len(wheels) < 2:
        return None
    gui = [w for w in wheels if not w.endswith("headless")]
    fix = ("; if cv2 fails on libGL, `apt-get install libgl1` or "
           "`pip install --force-reinstall --no-deps opencv-python-headless`") if gui else ""
    return (f"{' and '.join(wheels)} are {'both' if len(wheels) == 2 else 'all'} installed and share cv2: "
            f"the one installed last is in use{fix}")


def tiny_onnx(path: Path) -> None:
    """A 3->(4+2)-channel conv + sigmoid with a dynamic batch, shaped like a raw YOLOv8
    output (batch, 4 + classes, anchors), so the backend takes it like a real model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    c_out = 4 + TINY_CLASSES
    h, w = TINY_HW
    weight = numpy_helper.from_array(rng.normal(0, 0.5, (c_out, 3, 3, 3)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.normal(0, 0.1, c_out).astype(np.float32), "b")
    shape = numpy_helper.from_array(np.array([-1, c_out, h * w], np.int64), "shape")
    nodes = [
        helper.make_node("Conv", ["images", "w", "b"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["conv"], ["act"], name="act"),
        helper.make_node("Reshape", ["act", "shape"], ["output0"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes, "streamd_doctor",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, h, w])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", c_out, h * w])],
        [weight, bias, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8      # readable by every TensorRT parser streamd supports
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def sample_batch(hw: tuple[int, int], contract: InputContract = FLOAT_INPUT) -> tuple[np.ndarray, str]:
    """One letterboxed real picture (Ultralytics' bus.jpg) or, without it, a gradient, as a
    model of input ``contract`` takes it."""
    import cv2

    from ..pipeline.preprocess import letterbox_batch

    spec = importlib.util.find_spec("ultralytics")
    if spec is not None and spec.origin is not None:
        img = cv2.imread(str(Path(spec.origin).parent / "assets" / "bus.jpg"))
        if img is not None:
            return letterbox_batch([img], *hw, contract)[0], "bus.jpg"
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    return letterbox_batch([img.astype(np.uint8)], h, w, contract)[0], "a synthetic gradient"


def _ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def engine_selftest(model: Path | None, workdir: Path) -> Check:
    """Build an engine, load it with the TensorRT backend, compare with ONNX Runtime."""
    from ..backends.tensorrt.build import build_engine, engine_manifest
    from ..backends.tensorrt.probe import probe_gpu
    from ..backends.tensorrt.profiles import choose_profile
    from ..backends.tensorrt.runtime import TensorRTBackend
    from ..fileio import write_atomic
    from ..manifest import LAYOUT_RAW, ModelManifest, sha256_file

    gpu, why = probe_gpu(0)
    if gpu is None:
        return Check("engine self-test", FAIL, f"no GPU ({why})")
    if model is None:
        onnx_path = workdir / "tiny.onnx"
        tiny_onnx(onnx_path)
        base = ModelManifest(model_file="tiny.onnx", model_sha256=sha256_file(onnx_path), model_format="onnx",
                             class_names={i: f"class{i}" for i in range(TINY_CLASSES)}, imgsz=TINY_HW,
                             batch_min=1, batch_max=2, output_layout=LAYOUT_RAW)
        tolerance, what = TINY_TOLERANCE, "tiny conv network"
    else:
        onnx_path = workdir / model.name
        onnx_path.write_bytes(model.read_bytes())
        base = ModelManifest.read(model)
        # A network of many layers accumulates more rounding (TF32, FP16 or INT8 kernels);
        # relative to the output's magnitude (box coordinates reach the input size).
        tolerance = {"fp32": 2e-3, "fp16": 1e-2, "int8": 5e-2}.get(base.precision, 1e-2)
        what = model.name
    profile = choose_profile(base.batch_min, base.batch_max)
    outcome = build_engine(onnx_path, precision=base.precision, profile=profile, input_name=base.input_name,
                           layout=base.input_layout,
                           imgsz=base.imgsz, workspace_mb=256, timing_cache=None,
                           progress=lambda msg: None)
    engine_path = workdir / "selftest.engine"
    write_atomic(engine_path, outcome.plan)
    engine_manifest(base, engine_path, outcome, gpu=gpu.name, compute_capability=gpu.compute_capability,
                    onnx_file=onnx_path.name, onnx_sha256=sha256_file(onnx_path)).write(engine_path)
    x, picture = sample_batch(base.imgsz, base.input_contract())
    want = _ort_run(onnx_path, x)
    with TensorRTBackend(engine_path, warmup=True) as backend:
        got = backend.infer(x)
    if got.shape != want.shape:
        return Check("engine self-test", FAIL, f"{what}: TensorRT output {got.shape}, ONNX Runtime {want.shape}")
    diff = float(np.max(np.abs(got.astype(np.float64) - want)))
    scale = max(1.0, float(np.max(np.abs(want))))
    status = OK if diff / scale <= tolerance else FAIL
    return Check("engine self-test", status,
                 f"{what} built ({base.precision}, TensorRT {outcome.facts['tensorrt']}), run on {picture}: "
                 f"max |TensorRT - ONNX Runtime| = {diff:.2e} (outputs up to {scale:.3g}; tolerance "
                 f"{tolerance:g} of that)")


def onnx_package_problem() -> str | None:
    """Why the ``onnx`` package cannot be imported here, or None. A daemon-only install
    leaves it out (only the export tool needs it); the engine self-test needs it to make its
    tiny network when no ``--model`` is given."""
    try:
        importlib.import_module("onnx")
    except Exception as exc:   # not installed, or broken (e.g. a protobuf it cannot use)
        return str(exc) or type(exc).__name__
    return None


def selftest_needs(*, tensorrt: bool, cuda: bool, gpu: bool, model: Path | None,
                   onnx_problem: str | None) -> list[str]:
    """What the engine self-test lacks on this machine (empty: it can run)."""
    needs = [n for n, have in (("TensorRT", tensorrt), ("a CUDA binding", cuda), ("a GPU", gpu)) if not have]
    if model is None and onnx_problem is not None:
        needs.append(f"the onnx package to make its tiny test network, which cannot be imported "
                     f"here ({onnx_problem}; a daemon-only install leaves it out): give --model "
                     f"MODEL.onnx to test with an exported model, or pip install onnx")
    return needs


def run_checks(model: Path | None, require_tensorrt: bool) -> list[Check]:
    checks = [Check("python", OK, f"{platform.python_version()} on {platform.platform()} "
                                  f"({platform.machine()})")]
    try:
        import onnxruntime as ort
        providers = ort.get_available_providers()
        checks.append(Check("onnxruntime", OK, f"{ort.__version__}, providers: {', '.join(providers)}"))
    except Exception as exc:
        checks.append(Check("onnxruntime", FAIL, f"cannot be imported ({exc})"))
    try:
        import cv2
        io = opencv_video_io(cv2.getBuildInformation())
        detail = (f"{cv2.__version__}, FFmpeg {'yes' if io['FFMPEG'] else 'no'}, "
                  f"GStreamer {'yes' if io['GStreamer'] else 'no'}")
        checks.append(Check("opencv", OK if io["FFMPEG"] else FAIL,
                            detail + ("" if io["FFMPEG"] else " (RTSP cameras need FFmpeg)")))
    except Exception as exc:
        checks.append(Check("opencv", FAIL, f"cannot be imported ({exc})"))
    wheels = opencv_wheels(_installed_distributions())
    note = opencv_wheels_note(wheels)
    if note:
        cv = checks[-1]
        cv.detail += f"; {note}"

    from ..backends.tensorrt.logic import TrtVersion, check_supported
    from ..backends.tensorrt.probe import CUDA_HINT, cuda_driver, probe_gpu, tensorrt_version

    trt_version = tensorrt_version()
    if trt_version is None:
        checks.append(Check("tensorrt", FAIL if require_tensorrt else MISSING,
                            "not installed (the .engine backend is unavailable; .onnx models run "
                            "with ONNX Runtime)"))
    else:
        try:
            check_supported(TrtVersion.parse(trt_version))
            checks.append(Check("tensorrt", OK, trt_version))
        except ValueError as exc:
            checks.append(Check("tensorrt", FAIL, str(exc)))
    try:
        driver, devices, binding = cuda_driver()
        checks.append(Check("cuda", OK, f"{binding}: CUDA driver {driver}, {devices} device(s)"))
        have_cuda = True
    except ImportError:
        checks.append(Check("cuda", FAIL if require_tensorrt else MISSING,
                            f"no CUDA binding (the TensorRT backend needs one: {CUDA_HINT})"))
        have_cuda = False
    except Exception as exc:
        checks.append(Check("cuda", FAIL if require_tensorrt else MISSING, f"CUDA driver unusable ({exc})"))
        have_cuda = False
    gpu, why = probe_gpu(0)
    if gpu is None:
        checks.append(Check("gpu", FAIL if require_tensorrt else MISSING, f"none ({why})"))
    else:
        checks.append(Check("gpu", OK, f"{gpu.name}, compute capability {gpu.compute_capability}, "
                                       f"{gpu.memory_mb} MiB, driver {gpu.driver} (via {gpu.via})"))
    checks += decoder_checks()
    from ..config_engine import ENGINE_SUFFIXES
    if model is not None and model.suffix.lower() in ENGINE_SUFFIXES:
        checks.append(engine_model_check(model, tensorrt=trt_version is not None))
        model = None         # the self-test builds from an ONNX: its tiny network then
    elif model is not None:
        checks.append(onnx_model_check(model))
    needs = selftest_needs(tensorrt=trt_version is not None, cuda=have_cuda, gpu=gpu is not None,
                           model=model, onnx_problem=onnx_package_problem() if model is None else None)
    if not needs:
        try:
            with tempfile.TemporaryDirectory(prefix="streamd-doctor-") as tmp:
                checks.append(engine_selftest(model, Path(tmp)))
        except Exception as exc:   # report, do not crash: this is the diagnosis tool
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            checks.append(Check("engine self-test", FAIL, f"{type(exc).__name__}: {first[:300]}"))
    else:
        # Only a missing TensorRT, CUDA binding or GPU fails --require-tensorrt: without onnx the
        # self-test is skipped, and --model runs it.
        required = require_tensorrt and (trt_version is None or not have_cuda or gpu is None)
        checks.append(Check("engine self-test", FAIL if required else MISSING,
                            f"skipped: needs {', '.join(needs)}"))
    return checks


def decoder_checks() -> list[Check]:
    """Each child-decoder preset tried on a generated 1-second H.264 and H.265 clip; and what
    ``decoder: auto`` picks from them. A hardware preset that does not work here is reported as
    not available, not failed; the software ones must work where their program is installed."""
    from ..config import SourceDefaults
    from ..pipeline.sources.select import best, run_trials

    trials = run_trials(SourceDefaults())
    checks = []
    for t in trials:
        name = f"decoder {t.kind}/{t.preset}"
        if t.works:
            checks.append(Check(name, OK, "decodes H.264 and H.265, scaled in the decoder"))
        elif t.preset != "none" or "not installed" in t.problem:
            checks.append(Check(name, MISSING, f"not available: {t.problem}"))
        else:
            checks.append(Check(name, FAIL, t.problem))
    kind, preset = best({(t.kind, t.preset): t for t in trials})
    checks.append(Check("decoder auto", OK, kind if kind == "opencv" else f"{kind}/{preset}"))
    return checks


def onnx_model_check(model: Path) -> Check:
    """The given model loads in ONNX Runtime with its manifest and runs on a picture."""
    from ..backends import open_backend
    from ..errors import StreamdError

    try:
        with open_backend(model, "onnxruntime", device="cpu", warmup=False) as b:
            x, picture = sample_batch(b.info.input_hw, b.info.input_contract)
            y = b.infer(np.repeat(x, max(b.info.batch_min, 1), axis=0))
        return Check("model", OK, f"{b.info.describe()} runs on ONNX Runtime CPU ({picture}: output "
                                  f"{tuple(y.shape)})")
    except (StreamdError, OSError) as exc:
        return Check("model", FAIL, str(exc))


def engine_model_check(model: Path, *, tensorrt: bool) -> Check:
    """A TensorRT engine given with ``--model``: its inputs and outputs as TensorRT reports them,
    and whether it has a manifest or needs ``model.trust_engine`` (with that many names)."""
    from ..errors import StreamdError
    from ..manifest import sidecar_path

    manifest = sidecar_path(model)
    has = (f"has its manifest ({manifest.name})" if manifest.exists() else
           "no manifest: load it with model.trust_engine: true and its class names in model.names")
    if not model.is_file():
        return Check("model", FAIL, f"{model}: no such engine file")
    if not tensorrt:
        return Check("model", MISSING, f"{model.name}: {has}; reading its inputs and outputs needs TensorRT, "
                                       f"which is not installed here")
    try:
        from ..backends.tensorrt.trusted import read_plan_io
        io = read_plan_io(model)
    except (StreamdError, OSError) as exc:
        return Check("model", FAIL, str(exc))
    count = f" ({io.classes} names)" if io.classes is not None and not manifest.exists() else ""
    return Check("model", OK, f"{model.name}: {io.describe()}; {has}{count}")


def run_doctor(args: argparse.Namespace) -> int:
    model = Path(args.model) if args.model else None
    checks = run_checks(model, args.require_tensorrt)
    print("streamd doctor")
    for c in checks:
        print(_line(c))
    failed = [c.name for c in checks if c.status == FAIL]
    missing = [c.name for c in checks if c.status == MISSING]
    if failed:
        print(f"not working: {', '.join(failed)}")
    else:
        works = "ONNX Runtime backend works" + ("" if missing else "; TensorRT backend works")
        print(f"everything checked works ({works})"
              + (f"; not installed: {', '.join(missing)}" if missing else ""))
    sys.stdout.flush()
    return 1 if failed else 0
