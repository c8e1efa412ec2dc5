"""TensorRT decisions as plain functions, and the refusals that need no GPU.

Nothing here imports TensorRT: versions, the plan compatibility rule, the engine manifest
checks (a changed file, another TensorRT version, another GPU generation), profiles and
batch choice, buffer sizing, build modes per TensorRT version, the decode-node rule on a
real exported graph, and the TensorRT backend refusing a tampered engine on this machine.
(``streamd doctor`` is tested in test_doctor.py.)
"""

from __future__ import annotations

import enum
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from streamd.backends import backend_for, open_backend
from streamd.backends.tensorrt.build import BuildOutcome, engine_manifest, rebuild_engine
from streamd.backends.tensorrt.logic import (
    BUILD_HW_PROFILE,
    EngineRefused,
    RuntimeFacts,
    TrtVersion,
    build_mode,
    check_engine,
    check_source_onnx,
    check_supported,
    head_prefix,
    is_decode_node,
    keep_float_in_int8,
    parse_cc,
    plan_incompatibility,
)
from streamd.backends.tensorrt.probe import tensorrt_version
from streamd.backends.tensorrt.profiles import (
    BatchProfile,
    HwProfile,
    TensorSpec,
    check_io,
    check_runtime_shape,
    choose_hw_profile,
    choose_profile,
    choose_run_batch,
    hw_profile_for_network,
    hw_profile_from_shapes,
    nbytes,
    numpy_dtype,
    plan_buffers,
    profile_from_shapes,
    profile_shapes,
    resolve_shape,
    trt_dtype_name,
)
from streamd.errors import BackendError, ManifestError, ModelError
from streamd.fileio import atomic_writer, copy_atomic, write_atomic
from streamd.manifest import LAYOUT_RAW, ModelManifest, sha256_file

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------
# versions and compute capability
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "want"), [
    ("10.3.0", (10, 3, 0, 0)),
    ("8.6.1.6", (8, 6, 1, 6)),
    ("10.3.0.post1", (10, 3, 0, 0)),
    ("11.0", (11, 0, 0, 0)),
    (" v8.5.2 ", (8, 5, 2, 0)),
    ((10, 1), (10, 1, 0, 0)),
])
def test_versions_parse(text: str | tuple[int, ...], want: tuple[int, ...]) -> None:
    v = TrtVersion.parse(text)
    assert (v.major, v.minor, v.patch, v.build) == want


@pytest.mark.parametrize("text", ["", "ten", "10", "x.1"])
def test_bad_versions_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="TensorRT version|not a TensorRT version"):
        TrtVersion.parse(text)


def test_versions_order_and_print() -> None:
    assert TrtVersion.parse("8.6.1") < TrtVersion.parse("10.0.0") < TrtVersion.parse("10.0.1")
    assert str(TrtVersion.parse("10.3")) == "10.3.0"
    assert str(TrtVersion.parse("8.6.1.6")) == "8.6.1.6"


def test_versions_before_8_5_are_not_supported() -> None:
    check_supported(TrtVersion.parse("8.5.1"))
    with pytest.raises(ValueError, match="8.4.3 is too old.*8.5 or newer"):
        check_supported(TrtVersion.parse("8.4.3"))


@pytest.mark.parametrize(("built", "running", "ok"), [
    ("10.3.0", "10.3.0", True),
    ("10.3.0.26", "10.3.1", True),       # patch releases keep the plan format
    ("10.3.0", "10.4.0", False),
    ("8.6.1", "10.3.0", False),
    ("10.7.0", "10.6.0", False),         # older runtime: refused too
])
def test_plan_compatibility_needs_the_same_major_minor(built: str, running: str, ok: bool) -> None:
    why = plan_incompatibility(built, running)
    if ok:
        assert why is None
    else:
        assert why is not None and built.split(".")[0] in why and running in why


@pytest.mark.parametrize(("text", "want"), [("8.6", (8, 6)), ("sm_87", (8, 7)), ("sm90", (9, 0)),
                                             ((7, 5), (7, 5)), ("12.0", (12, 0))])
def test_compute_capability_parses(text: str | tuple[int, int], want: tuple[int, int]) -> None:
    assert parse_cc(text) == want


def test_bad_compute_capability_is_refused() -> None:
    with pytest.raises(ValueError, match="not a compute capability"):
        parse_cc("ampere")


# ---------------------------------------------------------------------------------------
# profiles, batch choice, buffers
# ---------------------------------------------------------------------------------------
def test_profile_opt_defaults_to_the_largest_batch_and_is_clamped() -> None:
    assert choose_profile(1, 8) == BatchProfile(1, 8, 8)
    assert choose_profile(1, 8, opt=4) == BatchProfile(1, 4, 8)
    assert choose_profile(2, 8, opt=1) == BatchProfile(2, 2, 8)
    assert choose_profile(2, 8, opt=99) == BatchProfile(2, 8, 8)
    assert choose_profile(4, 4) == BatchProfile(4, 4, 4)
    with pytest.raises(ValueError, match="1 <= min <= max"):
        choose_profile(0, 4)
    with pytest.raises(ValueError, match="1 <= min <= max"):
        choose_profile(5, 4)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        BatchProfile(1, 9, 8)


def test_profile_shapes_and_round_trip() -> None:
    p = BatchProfile(1, 4, 8)
    assert p.shapes((3, 320, 256)) == ((1, 3, 320, 256), (4, 3, 320, 256), (8, 3, 320, 256))
    assert BatchProfile.from_dict(json.loads(json.dumps(p.as_dict()))) == p
    assert profile_from_shapes((2, 3, 64, 64), (4, 3, 64, 64), (8, 3, 64, 64)) == BatchProfile(2, 4, 8)
    assert p.contains(1) and p.contains(8) and not p.contains(9) and not p.contains(0)


@pytest.mark.parametrize(("queued", "profile", "want"), [
    (3, BatchProfile(1, 8, 8), (3, 0, 3)),       # inside the range: as it is
    (8, BatchProfile(1, 8, 8), (8, 0, 8)),
    (11, BatchProfile(1, 8, 8), (8, 0, 8)),      # more than max: one full batch, rest waits
    (2, BatchProfile(4, 4, 4), (4, 2, 2)),       # static batch 4: pad two blanks
    (1, BatchProfile(2, 4, 8), (2, 1, 1)),
])
def test_run_batch_for_queued_frames(queued: int, profile: BatchProfile, want: tuple[int, int, int]) -> None:
    rb = choose_run_batch(queued, profile)
    assert (rb.run, rb.pad, rb.take) == want
    assert profile.contains(rb.run) and rb.run == rb.take + rb.pad


def test_run_batch_needs_a_frame() -> None:
    with pytest.raises(ValueError, match="batch of 0"):
        choose_run_batch(0, BatchProfile(1, 1, 1))


class DataType(enum.Enum):
    """Stands in for ``tensorrt.DataType``: an enum whose member names are TensorRT's."""

    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    BF16 = 7


def test_trt_dtypes_map_to_numpy() -> None:
    assert trt_dtype_name(DataType.HALF) == "HALF"
    assert trt_dtype_name("DataType.FLOAT") == "FLOAT"
    assert numpy_dtype(DataType.FLOAT) == np.float32
    assert numpy_dtype("DataType.HALF") == np.float16
    assert numpy_dtype(DataType.INT8) == np.int8
    assert numpy_dtype("INT64") == np.int64
    assert numpy_dtype(DataType.BOOL) == np.bool_
    with pytest.raises(ValueError, match="BF16 has no numpy equivalent"):
        numpy_dtype(DataType.BF16)
    with pytest.raises(ValueError, match="unknown TensorRT data type 'COMPLEX'"):
        numpy_dtype("COMPLEX")


def test_shapes_resolve_only_the_batch_axis() -> None:
    assert resolve_shape((-1, 6, 2100), 4) == (4, 6, 2100)
    assert resolve_shape((2, 6, 2100), 4) == (2, 6, 2100)    # static batch stays
    with pytest.raises(ValueError, match=r"output0: shape \(-1, -1, 2100\) has dynamic axes \[1\]"):
        resolve_shape((-1, -1, 2100), 4, name="output0")
    with pytest.raises(ValueError, match="no dimensions"):
        resolve_shape((), 1)


def test_buffers_are_sized_for_the_largest_batch() -> None:
    specs = [TensorSpec("images", True, (-1, 3, 320, 320), "FLOAT"),
             TensorSpec("output0", False, (-1, 6, 2100), "HALF")]
    bufs = plan_buffers(specs, 8)
    assert [(b.name, b.is_input, b.shape, b.dtype) for b in bufs] == [
        ("images", True, (8, 3, 320, 320), np.dtype(np.float32)),
        ("output0", False, (8, 6, 2100), np.dtype(np.float16))]
    assert bufs[0].nbytes == 8 * 3 * 320 * 320 * 4
    assert bufs[1].nbytes == 8 * 6 * 2100 * 2
    assert nbytes((2, 3), "INT8") == 6
    # Same as numpy's own count for an array of that shape and dtype.
    assert bufs[0].nbytes == np.empty(bufs[0].shape, bufs[0].dtype).nbytes


def test_io_check_says_expected_vs_got() -> None:
    specs = [TensorSpec("images", True, (-1, 3, 320, 320), "FLOAT"),
             TensorSpec("output0", False, (-1, 6, 2100), "FLOAT")]
    check_io(specs, path="m.engine", input_name="images", output_names=["output0"], imgsz=(320, 320))
    with pytest.raises(ValueError, match=r"engine inputs are \['images'\], the manifest says \['input'\]"):
        check_io(specs, path="m.engine", input_name="input", output_names=["output0"], imgsz=(320, 320))
    with pytest.raises(ValueError, match=r"has shape \(-1, 3, 320, 320\), expected \(batch, 3, 640, 640\)"):
        check_io(specs, path="m.engine", input_name="images", output_names=["output0"], imgsz=(640, 640))
    with pytest.raises(ValueError, match=r"outputs are \['output0'\], the manifest says \['out'\]"):
        check_io(specs, path="m.engine", input_name="images", output_names=["out"], imgsz=(320, 320))


# ---------------------------------------------------------------------------------------
# engines of models that take any H x W
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("imgsz", "stride", "want_min"), [
    ((640, 640), 32, (320, 320)),
    ((384, 640), 32, (192, 320)),
    ((320, 320), 32, (160, 160)),
    ((480, 640), 32, (256, 320)),     # 240 rounds up to the stride
    ((64, 64), 32, (32, 32)),
    ((32, 32), 32, (32, 32)),         # never below one stride
    ((1280, 1280), 64, (640, 640)),
])
def test_hw_profile_spans_half_the_size_to_the_full_size(imgsz: tuple[int, int], stride: int,
                                                        want_min: tuple[int, int]) -> None:
    p = choose_hw_profile(imgsz, stride)
    assert (p.min, p.opt, p.max, p.stride) == (want_min, imgsz, imgsz, stride)


def test_hw_profile_covers_the_common_camera_aspects_at_640() -> None:
    from streamd.pipeline.preprocess import net_shape_for

    p = choose_hw_profile((640, 640), 32)
    # 4:3, 3:2, 16:10, 16:9, 2:1 and their portrait forms run at their own input size.
    for fw, fh in ((640, 480), (1920, 1280), (1920, 1200), (1920, 1080), (1280, 640), (1080, 1920),
                   (480, 640), (1000, 1000)):
        h, w = net_shape_for(fw, fh, (640, 640), 32)
        assert p.contains(h, w), (fw, fh, h, w)
        assert p.run_hw(h, w) == (h, w)
    # A 32:9 panorama is padded up to the minimum height (bottom rows), not refused.
    h, w = net_shape_for(3840, 1080, (640, 640), 32)
    assert (h, w) == (192, 640) and not p.contains(h, w)
    assert p.run_hw(h, w) == (320, 640)


def test_hw_profile_refuses_sizes_it_cannot_run() -> None:
    p = choose_hw_profile((640, 640), 32)
    with pytest.raises(ValueError, match="input 672x640 is larger than the engine's largest, 640x640"):
        p.run_hw(672, 640)
    with pytest.raises(ValueError, match="input 384x630: height and width must be positive multiples "
                                         "of the stride 32"):
        p.run_hw(384, 630)
    assert not p.contains(384, 630) and not p.contains(640, 672)
    with pytest.raises(ValueError, match="imgsz 640x600: both sides must be positive multiples of the "
                                         "stride 32"):
        choose_hw_profile((640, 600), 32)
    with pytest.raises(ValueError, match="width profile min 320 / opt 640 / max 320: need"):
        HwProfile((320, 320), (640, 640), (640, 320))
    with pytest.raises(ValueError, match="height profile min 100 / opt 640 / max 640: 100 is not a "
                                         "multiple of the stride 32"):
        HwProfile((100, 320), (640, 640), (640, 640))


def test_hw_profile_shapes_and_round_trip() -> None:
    batch = BatchProfile(1, 8, 8)
    hw = choose_hw_profile((384, 640), 32)
    assert profile_shapes(batch, hw, (384, 640)) == ((1, 3, 192, 320), (8, 3, 384, 640), (8, 3, 384, 640))
    # A fixed-size engine: the batch profile at imgsz, as before.
    assert profile_shapes(batch, None, (320, 256)) == batch.shapes((3, 320, 256))
    # What the manifest records and what TensorRT reports both give the profile back.
    assert HwProfile.from_dict(json.loads(json.dumps(hw.as_dict()))) == hw
    assert hw_profile_from_shapes(*profile_shapes(batch, hw, (384, 640)), stride=32) == hw
    assert profile_from_shapes(*profile_shapes(batch, hw, (384, 640))) == batch


def test_hw_profile_follows_the_network_input() -> None:
    assert hw_profile_for_network((-1, 3, 320, 320), (320, 320)) is None
    assert hw_profile_for_network((-1, 3, -1, -1), (640, 640)) == choose_hw_profile((640, 640))
    mine = HwProfile((384, 384), (512, 512), (640, 640))
    assert hw_profile_for_network((4, 3, -1, -1), (640, 640), requested=mine) == mine
    with pytest.raises(ValueError, match=r"m.onnx: shape \(-1, 3, -1, 640\) has one of height and width "
                                         r"dynamic, the other fixed"):
        hw_profile_for_network((-1, 3, -1, 640), (640, 640), name="m.onnx")
    with pytest.raises(ValueError, match=r"has a fixed height and width; an H x W profile"):
        hw_profile_for_network((-1, 3, 640, 640), (640, 640), requested=mine)
    with pytest.raises(ValueError, match=r"shape \(-1, 3, 320, 320\) is not of the manifest's size 640x640"):
        hw_profile_for_network((-1, 3, 320, 320), (640, 640))
    with pytest.raises(ValueError, match="profile max 640x640 is not the manifest's imgsz 320x320"):
        hw_profile_for_network((-1, 3, -1, -1), (320, 320), requested=mine)
    with pytest.raises(ValueError, match=r"is not \(batch, 3, height, width\)"):
        hw_profile_for_network((-1, 3, 640), (640, 640))


def test_io_check_of_an_any_size_engine() -> None:
    specs = [TensorSpec("images", True, (-1, 3, -1, -1), "FLOAT"),
             TensorSpec("output0", False, (-1, 6, -1), "FLOAT")]
    check_io(specs, path="m.engine", input_name="images", output_names=["output0"], imgsz=(640, 640),
             dynamic_hw=True)
    # The manifest and the engine must agree on which kind it is, either way round.
    with pytest.raises(ValueError, match=r"has shape \(-1, 3, -1, -1\), expected \(batch, 3, 640, 640\)"):
        check_io(specs, path="m.engine", input_name="images", output_names=["output0"], imgsz=(640, 640))
    fixed = [TensorSpec("images", True, (-1, 3, 640, 640), "FLOAT"), specs[1]]
    with pytest.raises(ValueError, match=r"has shape \(-1, 3, 640, 640\), expected \(batch, 3, -1, -1\): "
                                         r"the manifest says the model takes any H x W up to 640x640"):
        check_io(fixed, path="m.engine", input_name="images", output_names=["output0"], imgsz=(640, 640),
                 dynamic_hw=True)


def test_runtime_shapes_of_an_any_size_engine() -> None:
    # Raw head at 384x640: 48*80 + 24*40 + 12*20 anchors.
    assert check_runtime_shape((-1, 6, -1), (3, 6, 5040), 3, name="output0") == (3, 6, 5040)
    assert check_runtime_shape((2, 6, -1), (2, 6, 5040), 2) == (2, 6, 5040)
    with pytest.raises(ValueError, match=r"output0: TensorRT reports shape \(4, 6, 5040\) for a batch of 3, "
                                         r"expected \(3, 6, '\?'\) \(axis 0\)"):
        check_runtime_shape((-1, 6, -1), (4, 6, 5040), 3, name="output0")
    with pytest.raises(ValueError, match=r"axis 1"):
        check_runtime_shape((-1, 6, -1), (3, 7, 5040), 3)
    with pytest.raises(ValueError, match=r"axis 2"):
        check_runtime_shape((-1, 6, -1), (3, 6, 0), 3)
    with pytest.raises(ValueError, match=r"reports shape \(3, 6\), the engine declares \(-1, 6, -1\)"):
        check_runtime_shape((-1, 6, -1), (3, 6), 3)


def test_buffers_of_an_any_size_engine_hold_its_largest_input() -> None:
    specs = [TensorSpec("images", True, (-1, 3, -1, -1), "FLOAT"),
             TensorSpec("output0", False, (-1, 6, -1), "FLOAT")]
    # Without the shapes TensorRT reports at the largest input there is nothing to size by.
    with pytest.raises(ValueError, match=r"images: shape \(-1, 3, -1, -1\) has dynamic axes \[2, 3\]"):
        plan_buffers(specs, 8)
    at_max = {"images": (8, 3, 640, 640), "output0": (8, 6, 8400)}
    bufs = plan_buffers(specs, 8, at_max)
    assert [(b.name, b.shape) for b in bufs] == [("images", (8, 3, 640, 640)), ("output0", (8, 6, 8400))]
    assert bufs[1].nbytes == 8 * 6 * 8400 * 4
    # Every smaller input's output fits in the same buffer.
    small = check_runtime_shape((-1, 6, -1), (8, 6, 3 * 8400 // 5), 8)
    assert nbytes(small, "FLOAT") <= bufs[1].nbytes


# ---------------------------------------------------------------------------------------
# precision per TensorRT version
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("version", "precision", "explicit", "strong", "flags", "pin"), [
    ("8.5.3", "fp32", True, False, (), False),
    ("8.6.1", "fp16", True, False, ("FP16",), True),
    ("8.6.1", "int8", True, False, ("INT8",), False),
    ("10.3.0", "fp32", False, False, (), False),
    ("10.3.0", "fp16", False, True, (), False),
    ("10.13.0", "int8", False, True, (), False),
    ("11.0.0", "fp32", False, True, (), False),     # 11: strong typing only, no precision flags
    ("11.2.0", "int8", False, True, (), False),
])
def test_build_mode_per_version(version: str, precision: str, explicit: bool, strong: bool,
                                flags: tuple[str, ...], pin: bool) -> None:
    m = build_mode(TrtVersion.parse(version), precision)
    assert (m.explicit_batch_flag, m.strongly_typed, m.builder_flags, m.pin_decode_fp32) == \
        (explicit, strong, flags, pin)


def test_build_mode_refuses_old_versions_and_unknown_precisions() -> None:
    with pytest.raises(ValueError, match="too old"):
        build_mode(TrtVersion.parse("8.2.5"), "fp16")
    with pytest.raises(ValueError, match="unknown precision 'bf16'"):
        build_mode(TrtVersion.parse("10.3"), "bf16")


# ---------------------------------------------------------------------------------------
# the head's decode part, on a real exported graph
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_decode_rule_on_the_exported_fall_model(fall_onnx_320: Path) -> None:
    import onnx

    graph = onnx.load(str(fall_onnx_320), load_external_data=False).graph
    nodes = [(n.name, n.op_type) for n in graph.node]
    prefix = head_prefix(n for n, _ in nodes)
    assert prefix == "/model.22/"
    decode = {n for n, t in nodes if is_decode_node(n, t, prefix)}
    int8_float = {n for n, t in nodes if keep_float_in_int8(n, t, prefix)}
    # The DFL, its conv, the class sigmoid and the output concat are decode...
    for name in ("/model.22/dfl/Softmax", "/model.22/dfl/conv/Conv", "/model.22/Sigmoid", "/model.22/Concat_26"):
        assert name in decode and name in int8_float
    # ...the per-level conv branches are not; INT8 quantizes their convs but not their SiLU.
    assert "/model.22/cv2.0/cv2.0.0/conv/Conv" not in decode | int8_float
    assert "/model.22/cv3.2/cv3.2.2/Conv" not in decode | int8_float
    assert "/model.22/cv3.0/cv3.0.0/act/Sigmoid" in int8_float - decode
    # Nothing outside the head is touched, and every head conv except the DFL's is quantized.
    assert all(n.startswith(prefix) for n in decode | int8_float)
    head_convs = {n for n, t in nodes if n.startswith(prefix) and t == "Conv"}
    assert head_convs - int8_float == head_convs - {"/model.22/dfl/conv/Conv"}
    assert len(head_convs) == 19     # 3 levels x 2 branches x 3 convs + the DFL conv


def test_decode_prefix_falls_back_to_yolov8_layer_22() -> None:
    assert head_prefix(["/model.0/conv/Conv", "/model.9/m/MaxPool"]) == "/model.22/"
    assert head_prefix(["/model.15/dfl/Softmax"]) == "/model.15/"
    assert not is_decode_node("/model.2/Concat", "Concat", "/model.22/")


# ---------------------------------------------------------------------------------------
# engine manifest checks with real files
# ---------------------------------------------------------------------------------------
HERE = RuntimeFacts(tensorrt="10.3.0", compute_capability="8.6", gpu_name="NVIDIA RTX A2000")


def write_engine(folder: Path, *, trt: str = "10.3.0.26", cc: str = "8.6", gpu: str = "NVIDIA RTX A2000",
                 onnx_file: str | None = "m.onnx") -> Path:
    """A plan-sized file of bytes plus the manifest the export tool would write for it."""
    engine = folder / "m.engine"
    engine.write_bytes(np.random.default_rng(0).integers(0, 256, 64 * 1024, dtype=np.uint8).tobytes())
    build = {"tensorrt": trt, "compute_capability": cc, "gpu": gpu,
             "profile": {"min": 1, "opt": 8, "max": 8}}
    if onnx_file:
        onnx = folder / onnx_file
        onnx.write_bytes(b"onnx model bytes")
        build.update(onnx_file=onnx_file, onnx_sha256=sha256_file(onnx))
    ModelManifest(model_file=engine.name, model_sha256=sha256_file(engine), model_format="tensorrt",
                  class_names={0: "Normal", 1: "Fall"}, imgsz=(320, 320), batch_min=1, batch_max=8,
                  output_layout=LAYOUT_RAW, precision="fp16", build=build).write(engine)
    return engine


def verdict_for(engine: Path, runtime: RuntimeFacts = HERE, allow_rebuild: bool = False):  # type: ignore[no-untyped-def]
    return check_engine(ModelManifest.read(engine), sha256_file(engine), runtime, path=engine,
                        allow_rebuild=allow_rebuild)


def test_intact_engine_from_this_tensorrt_and_gpu_loads(tmp_path: Path) -> None:
    engine = write_engine(tmp_path)
    assert verdict_for(engine).action == "load"
    # A patch release of the same TensorRT line still loads it.
    assert verdict_for(engine, replace(HERE, tensorrt="10.3.1")).action == "load"


def test_tampered_engine_is_refused_even_when_rebuilds_are_allowed(tmp_path: Path) -> None:
    engine = write_engine(tmp_path)
    data = bytearray(engine.read_bytes())
    data[1000] ^= 0xFF
    engine.write_bytes(bytes(data))
    for allow in (False, True):
        with pytest.raises(EngineRefused) as exc:
            verdict_for(engine, allow_rebuild=allow)
        assert exc.value.kind == "sha256" and not exc.value.rebuildable
        msg = str(exc.value)
        assert "does not match its manifest" in msg and "changed after it was built" in msg
        assert str(engine) in msg


def test_engine_from_another_tensorrt_version_is_refused_or_rebuilt(tmp_path: Path) -> None:
    engine = write_engine(tmp_path, trt="8.6.1.6")
    with pytest.raises(EngineRefused) as exc:
        verdict_for(engine)
    msg = str(exc.value)
    assert exc.value.kind == "tensorrt" and exc.value.rebuildable
    assert "built by TensorRT 8.6.1.6" in msg and "runs TensorRT 10.3.0" in msg
    assert "Rebuild it on this machine from m.onnx" in msg and str(engine) in msg and "model.rebuild_engine: true" in msg
    v = verdict_for(engine, allow_rebuild=True)
    assert (v.action, v.onnx_file) == ("rebuild", "m.onnx") and "8.6.1.6" in v.reason


def test_engine_for_another_gpu_generation_is_refused(tmp_path: Path) -> None:
    engine = write_engine(tmp_path, cc="8.7", gpu="Orin")
    with pytest.raises(EngineRefused) as exc:
        verdict_for(engine)
    msg = str(exc.value)
    assert exc.value.kind == "compute_capability"
    assert "built for Orin (compute capability 8.7)" in msg
    assert "NVIDIA RTX A2000 has compute capability 8.6" in msg


def test_both_mismatches_are_reported_together(tmp_path: Path) -> None:
    engine = write_engine(tmp_path, trt="10.0.1", cc="7.5")
    with pytest.raises(EngineRefused) as exc:
        verdict_for(engine)
    assert "TensorRT 10.0.1" in str(exc.value) and "compute capability 7.5" in str(exc.value)


def test_rebuild_needs_a_recorded_onnx(tmp_path: Path) -> None:
    engine = write_engine(tmp_path, trt="8.6.1", onnx_file=None)
    with pytest.raises(EngineRefused, match="records no ONNX to rebuild from"):
        verdict_for(engine, allow_rebuild=True)


def test_manifest_without_build_facts_or_of_an_onnx_is_refused(tmp_path: Path) -> None:
    engine = write_engine(tmp_path)
    m = ModelManifest.read(engine)
    with pytest.raises(EngineRefused, match=r"does not record tensorrt and compute_capability") as exc:
        check_engine(replace(m, build={}), m.model_sha256, HERE, path=engine)
    assert exc.value.kind == "facts"
    with pytest.raises(EngineRefused, match="describes a 'onnx' model, not a TensorRT engine"):
        check_engine(replace(m, model_format="onnx"), m.model_sha256, HERE, path=engine)


def test_rebuild_source_must_be_the_recorded_onnx(tmp_path: Path) -> None:
    engine = write_engine(tmp_path)
    m = ModelManifest.read(engine)
    onnx = tmp_path / "m.onnx"
    check_source_onnx(m, onnx, sha256_file(onnx))
    onnx.write_bytes(b"another model")
    with pytest.raises(EngineRefused, match="is not the ONNX this engine was built from"):
        check_source_onnx(m, onnx, sha256_file(onnx))


def test_any_size_engine_manifest_records_its_hw_profile(tmp_path: Path) -> None:
    engine = write_engine(tmp_path)
    m = ModelManifest.read(engine)
    hw = choose_hw_profile(m.imgsz, m.stride)
    replace(m, dynamic_hw=True, build={**m.build, BUILD_HW_PROFILE: hw.as_dict()}).write(engine)
    back = ModelManifest.read(engine)
    assert back.dynamic_hw and HwProfile.from_dict(back.build[BUILD_HW_PROFILE]) == hw
    # The engine checks do not depend on the input size.
    assert verdict_for(engine).action == "load"


def test_engine_manifest_records_what_the_backend_checks(tmp_path: Path) -> None:
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx model bytes")
    source = ModelManifest(model_file=onnx.name, model_sha256=sha256_file(onnx), model_format="onnx",
                           class_names={0: "Normal", 1: "Fall"}, imgsz=(320, 320), batch_min=1, batch_max=8,
                           output_layout=LAYOUT_RAW, precision="fp16", build={"exported_by": "test"})
    plan = b"serialized plan bytes"
    outcome = BuildOutcome(plan, {"tensorrt": "10.3.0.26", "profile": {"min": 1, "opt": 8, "max": 8}})
    engine = tmp_path / "m.engine"
    m = engine_manifest(source, engine, outcome, gpu="NVIDIA RTX A2000", compute_capability="8.6",
                        onnx_file=onnx.name, onnx_sha256=source.model_sha256, cuda_driver="12.4")
    engine.write_bytes(plan)
    m.write(engine)
    back = ModelManifest.read(engine)
    assert (back.model_file, back.model_format, back.precision) == ("m.engine", "tensorrt", "fp16")
    assert back.model_sha256 == sha256_file(engine)
    assert back.class_names == source.class_names and back.imgsz == (320, 320)
    assert back.build["exported_by"] == "test" and back.build["cuda_driver"] == "12.4"
    # A plan file runs on TensorRT alone, whatever the ONNX it came from was meant for.
    assert back.backends == ["tensorrt"] and back.meant_for() == ("tensorrt",)
    # What it records is what the checks before loading need: it loads here, and a rebuild
    # would start from the same ONNX.
    assert verdict_for(engine).action == "load"
    check_source_onnx(back, onnx, sha256_file(onnx))


def test_rebuild_refuses_a_missing_or_changed_onnx_before_building(tmp_path: Path) -> None:
    engine = write_engine(tmp_path, trt="8.6.1")
    m = ModelManifest.read(engine)
    verdict = verdict_for(engine, allow_rebuild=True)
    assert verdict.action == "rebuild"
    (tmp_path / "m.onnx").write_bytes(b"another model")
    with pytest.raises(EngineRefused, match="is not the ONNX this engine was built from"):
        rebuild_engine(engine, m, verdict, HERE)
    (tmp_path / "m.onnx").unlink()
    with pytest.raises(ModelError, match=r"m.engine needs a rebuild .*8\.6\.1.* but its ONNX .*m.onnx is missing"):
        rebuild_engine(engine, m, verdict, HERE)
    # Nothing was written over the engine or its manifest.
    assert sha256_file(engine) == m.model_sha256 and ModelManifest.read(engine) == m


def test_atomic_writes_replace_whole_files_or_leave_them(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "m.engine"
    write_atomic(target, b"first")
    write_atomic(target, b"second")
    assert target.read_bytes() == b"second" and oct(target.stat().st_mode & 0o777) == "0o644"
    with pytest.raises(RuntimeError):
        with atomic_writer(target) as f:
            f.write(b"half of a thi")
            raise RuntimeError("the build stopped")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.engine"]     # no temporary left
    copy_atomic(target, tmp_path / "copy.engine")
    assert (tmp_path / "copy.engine").read_bytes() == b"second"


# ---------------------------------------------------------------------------------------
# the backend on this machine (no TensorRT here; the refusals come first)
# ---------------------------------------------------------------------------------------
def test_engine_files_select_the_tensorrt_backend() -> None:
    from streamd.backends.tensorrt.runtime import TensorRTBackend

    assert backend_for(Path("x.engine")) is TensorRTBackend
    assert backend_for(Path("x.PLAN")) is TensorRTBackend
    assert backend_for(Path("x.onnx"), "tensorrt") is TensorRTBackend


def test_backend_refuses_a_tampered_engine_before_loading_anything(tmp_path: Path) -> None:
    engine = write_engine(tmp_path)
    with open(engine, "r+b") as f:
        f.seek(10)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ManifestError, match="does not match its manifest"):
        open_backend(engine)


def test_backend_refuses_an_engine_without_manifest(tmp_path: Path) -> None:
    engine = tmp_path / "bare.engine"
    engine.write_bytes(b"plan")
    with pytest.raises(ManifestError, match="no manifest .*bare.engine.json"):
        open_backend(engine)


def test_backend_refuses_cpu_device(tmp_path: Path) -> None:
    engine = write_engine(tmp_path)
    with pytest.raises(BackendError, match="run on an NVIDIA GPU, not on device 'cpu'"):
        open_backend(engine, device="cpu")


def test_backend_says_what_is_missing_for_an_intact_engine(tmp_path: Path) -> None:
    if tensorrt_version() is not None:
        pytest.skip("TensorRT is installed here; this checks the message where it is not")
    engine = write_engine(tmp_path)
    with pytest.raises(BackendError, match="TensorRT is not installed .*pip install tensorrt"):
        open_backend(engine)


def test_importing_streamd_does_not_import_tensorrt_or_a_cuda_binding() -> None:
    code = ("import sys, streamd, streamd.backends, streamd.backends.tensorrt, streamd.backends.tensorrt.logic, "
            "streamd.backends.tensorrt.profiles, streamd.backends.tensorrt.probe, "
            "streamd.backends.tensorrt.build, streamd.service.doctor, streamd.cli\n"
            "from streamd.backends import backend_for\nfrom pathlib import Path\n"
            "backend_for(Path('m.engine'))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'pycuda', 'cuda')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
