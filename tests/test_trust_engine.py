"""``model.trust_engine``: an engine built elsewhere without a manifest, loaded because the config
says so, its I/O read from the engine and its class names from the config.

TensorRT cannot be installed on the development machines, so what is read from an engine is
tested on ``FakeEngine`` below: a FAKE standing in for ``tensorrt.ICudaEngine`` (reason: no
TensorRT here), implementing only the documented calls ``trusted.infer_engine_io`` makes. The
config checks, the refusal of a bare engine and the trusted path through the model loader, up
to the point where TensorRT itself is needed, run for real (``streamd check`` as a process).
"""

from __future__ import annotations

import enum
import logging
from pathlib import Path
from typing import Any

import pytest

from streamd.backends import open_backend
from streamd.backends.tensorrt.logic import RuntimeFacts
from streamd.backends.tensorrt.probe import tensorrt_version
from streamd.backends.tensorrt.profiles import TensorSpec, check_io, hw_profile_from_shapes, plan_buffers
from streamd.backends.tensorrt.trusted import (
    EngineIO,
    infer_engine_io,
    read_engine_tensors,
    trust_warning,
    trusted_manifest,
)
from streamd.config import SchedulerConfig, parse_config
from streamd.errors import BackendError, ConfigError, ManifestError
from streamd.manifest import FLOAT_INPUT, LAYOUT_END2END, LAYOUT_RAW, RAW_UINT8, InputContract
from streamd.service.doctor import MISSING, engine_model_check
from streamd.service.model import load_backend
from tests.test_check import _cli
HERE = RuntimeFacts("10.3.0.30", "8.7", "Orin (nvgpu)")
no_tensorrt = pytest.mark.skipif(tensorrt_version() is not None,
                                 reason="TensorRT is installed here; these check the path where it is not")


# ---------------------------------------------------------------------------------------
# FAKE: a stand-in for tensorrt.ICudaEngine (no TensorRT on this machine). Its enums carry
# TensorRT's member names (TensorIOMode.INPUT, DataType.FLOAT, TensorFormat.LINEAR), which is
# all the code under test reads of them.
# ---------------------------------------------------------------------------------------
class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    UINT8 = 5


class TensorFormat(enum.Enum):
    LINEAR = 0
    CHW32 = 3


Shape = tuple[int, ...]


class FakeEngine:
    """tensors: name -> (mode, shape, dtype[, format]); profiles: input name -> [(min, opt, max)]."""

    def __init__(self, tensors: dict[str, tuple[Any, ...]],
                 profiles: dict[str, list[tuple[Shape, Shape, Shape]]] | None = None) -> None:
        self._tensors = tensors
        self._profiles = profiles or {}

    @property
    def num_io_tensors(self) -> int:
        return len(self._tensors)

    @property
    def num_optimization_profiles(self) -> int:
        return max((len(p) for p in self._profiles.values()), default=1)

    def get_tensor_name(self, index: int) -> str:
        return list(self._tensors)[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self._tensors[name][0]

    def get_tensor_shape(self, name: str) -> Shape:
        return self._tensors[name][1]

    def get_tensor_dtype(self, name: str) -> DataType:
        return self._tensors[name][2]

    def get_tensor_format(self, name: str) -> TensorFormat:
        t = self._tensors[name]
        return t[3] if len(t) > 3 else TensorFormat.LINEAR

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Shape]:
        return list(self._profiles[name][profile_index])


IN, OUT, F32, F16, U8 = TensorIOMode.INPUT, TensorIOMode.OUTPUT, DataType.FLOAT, DataType.HALF, DataType.UINT8
ENGINE = Path("yard.engine")


def engine(input_shape: Shape, output_shape: Shape, *, profile: tuple[Shape, Shape, Shape] | None = None,
           in_dtype: DataType = F32, out_dtype: DataType = F32, **extra: tuple[Any, ...]) -> FakeEngine:
    tensors: dict[str, tuple[Any, ...]] = {"images": (IN, input_shape, in_dtype),
                                           "output0": (OUT, output_shape, out_dtype)}
    tensors.update(extra)
    return FakeEngine(tensors, {"images": [profile]} if profile else None)


# ---------------------------------------------------------------------------------------
# what is read from each kind of engine
# ---------------------------------------------------------------------------------------
def test_static_batch_engine() -> None:
    io = infer_engine_io(engine((4, 3, 640, 640), (4, 84, 8400)), path=ENGINE)
    assert (io.batch.min, io.batch.max) == (4, 4)
    assert io.imgsz == (640, 640) and io.hw is None
    assert (io.layout, io.classes) == (LAYOUT_RAW, 80)
    assert "batch 4 (fixed)" in io.describe() and "80 classes" in io.describe()


def test_dynamic_batch_engine_takes_its_range_from_profile_0() -> None:
    io = infer_engine_io(engine((-1, 3, 320, 320), (-1, 6, 2100),
                                profile=((1, 3, 320, 320), (4, 3, 320, 320), (8, 3, 320, 320))), path=ENGINE)
    assert (io.batch.min, io.batch.opt, io.batch.max) == (1, 4, 8)
    assert io.imgsz == (320, 320) and io.hw is None
    # 6 rows of 2100 anchors: two classes, not end-to-end detections.
    assert (io.layout, io.classes) == (LAYOUT_RAW, 2)


def test_any_size_engine_takes_any_hw_of_its_profile() -> None:
    io = infer_engine_io(engine((-1, 3, -1, -1), (-1, 84, -1),
                                profile=((1, 3, 320, 320), (8, 3, 640, 640), (8, 3, 640, 640))), path=ENGINE)
    assert io.hw is not None and io.hw.min == (320, 320) and io.hw.max == (640, 640)
    assert io.imgsz == (640, 640) and (io.batch.min, io.batch.max) == (1, 8)
    m = trusted_manifest(io, [f"c{i}" for i in range(80)], path=ENGINE, sha256="ab" * 32, facts=HERE)
    assert m.dynamic_hw and m.imgsz == (640, 640) and m.stride == 32
    assert "any HxW from 320x320 to 640x640" in io.describe()


def test_end_to_end_engine_with_nms_inside() -> None:
    io = infer_engine_io(engine((1, 3, 640, 640), (1, 300, 6), in_dtype=F16, out_dtype=F16), path=ENGINE)
    assert (io.layout, io.classes) == (LAYOUT_END2END, None)
    m = trusted_manifest(io, ["person", "car"], path=ENGINE, sha256="cd" * 32, facts=HERE)
    assert m.output_layout == LAYOUT_END2END and m.input_dtype == "float16"
    assert "up to 300 boxes" in io.describe()
    # nothing in the engine says how many classes it has: the warning says what that means
    text = trust_warning(io, path=ENGINE, sha256="cd" * 32, names=["person", "car"])
    assert "a class id beyond these names is published by its number" in text


def test_uint8_engine_takes_the_letterbox_bytes_channels_last() -> None:
    """An engine trtexec built from a ``streamd-export --input uint8`` ONNX: (batch, H, W, 3) uint8."""
    io = infer_engine_io(engine((-1, 320, 320, 3), (-1, 6, 2100), in_dtype=U8,
                                profile=((1, 320, 320, 3), (4, 320, 320, 3), (8, 320, 320, 3))), path=ENGINE)
    assert io.contract == RAW_UINT8 and io.imgsz == (320, 320) and io.hw is None
    assert (io.batch.min, io.batch.max) == (1, 8) and (io.layout, io.classes) == (LAYOUT_RAW, 2)
    m = trusted_manifest(io, ["Normal", "Fall"], path=ENGINE, sha256="56" * 32, facts=HERE)
    assert (m.input_dtype, m.input_layout, m.input_channels) == ("uint8", "nhwc", "bgr")
    assert m.input_contract() == RAW_UINT8
    assert "input images (?, 320, 320, 3) UINT8: 320x320" in io.describe()


def test_uint8_any_size_engine_reads_h_and_w_from_the_nhwc_profile() -> None:
    io = infer_engine_io(engine((-1, -1, -1, 3), (-1, 84, -1), in_dtype=U8,
                                profile=((1, 320, 256, 3), (8, 640, 640, 3), (8, 640, 640, 3))), path=ENGINE)
    assert io.contract == RAW_UINT8 and io.hw is not None
    assert io.hw.min == (320, 256) and io.hw.max == (640, 640) and io.imgsz == (640, 640)
    m = trusted_manifest(io, [f"c{i}" for i in range(80)], path=ENGINE, sha256="78" * 32, facts=HERE)
    assert m.dynamic_hw and m.input_contract() == RAW_UINT8


def test_a_float_engine_keeps_the_float_contract() -> None:
    io = infer_engine_io(engine((1, 3, 640, 640), (1, 300, 6), in_dtype=F16, out_dtype=F16), path=ENGINE)
    assert io.contract == InputContract("float16") and not io.contract.raw
    io = infer_engine_io(engine((1, 3, 640, 640), (1, 84, 8400)), path=ENGINE)
    assert io.contract == FLOAT_INPUT


def test_two_input_engine_is_refused_naming_both() -> None:
    e = engine((1, 3, 640, 640), (1, 84, 8400), im_shape=(IN, (1, 2), F32))
    with pytest.raises(ManifestError, match=r"2 inputs \(images \(1, 3, 640, 640\) FLOAT; im_shape \(1, 2\) "
                                            r"FLOAT\); streamd feeds one image tensor"):
        infer_engine_io(e, path=ENGINE)


@pytest.mark.parametrize(("e", "message"), [
    (engine((1, 3, 640, 640), (1, 84, 8400), output1=(OUT, (1, 32, 160, 160), F32)), "2 outputs"),
    (engine((1, 3, 640, 640), (1, 84, 8400), in_dtype=DataType.UINT8), r"is UINT8 but not \(batch, H, W, 3\)"),
    (engine((1, 640, 640, 3), (1, 84, 8400), in_dtype=DataType.INT8), "is not FLOAT or HALF"),
    (FakeEngine({"images": (IN, (1, 640, 640, 3), U8, TensorFormat.CHW32), "output0": (OUT, (1, 84, 8400), F32)}),
     "format CHW32, not LINEAR"),
    (engine((-1, -1, -1, 3), (-1, 84, -1), profile=((1, 3, 320, 320), (1, 3, 640, 640), (1, 3, 640, 640)),
            in_dtype=DataType.UINT8), "is not a multiple of the stride 32"),
    (engine((1, 3, 640, 640), (1, 300, 6), out_dtype=DataType.INT32), "is not FLOAT or HALF"),
    (FakeEngine({"images": (IN, (1, 3, 640, 640), F16, TensorFormat.CHW32), "output0": (OUT, (1, 84, 8400), F32)}),
     "format CHW32, not LINEAR"),
    (engine((1, 1, 640, 640), (1, 84, 8400)), r"is not \(batch, 3, H, W\)"),
    (engine((-1, 3, 640, -1), (-1, 84, -1), profile=((1, 3, 640, 32), (1, 3, 640, 640), (1, 3, 640, 640))),
     "one of H and W dynamic"),
    (engine((-1, 3, -1, -1), (-1, 84, -1), profile=((1, 3, 300, 300), (1, 3, 640, 640), (1, 3, 640, 640))),
     "300 is not a multiple of the stride 32"),
    (engine((2, 3, 640, 640), (1, 84, 8400)), "does not follow the input's batch axis"),
    (engine((1, 3, 640, 640), (1, 4, 8400)), "4 rows per anchor"),
    (engine((1, 3, 640, 640), (1, 8400)), "not 3-dimensional"),
])
def test_engines_streamd_cannot_run_are_refused_saying_why(e: FakeEngine, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        infer_engine_io(e, path=ENGINE)


@pytest.mark.parametrize("e", [
    engine((4, 3, 640, 640), (4, 84, 8400)),
    engine((-1, 3, 320, 320), (-1, 6, 2100), profile=((1, 3, 320, 320), (4, 3, 320, 320), (8, 3, 320, 320))),
    engine((-1, 3, -1, -1), (-1, 6, -1), profile=((1, 3, 320, 320), (8, 3, 640, 640), (8, 3, 640, 640))),
    engine((1, 3, 640, 640), (1, 300, 6), in_dtype=F16, out_dtype=F16),
    engine((-1, 320, 320, 3), (-1, 6, 2100), profile=((1, 320, 320, 3), (4, 320, 320, 3), (8, 320, 320, 3)),
           in_dtype=U8),
    engine((-1, -1, -1, 3), (-1, 6, -1), profile=((1, 320, 320, 3), (8, 640, 640, 3), (8, 640, 640, 3)),
           in_dtype=U8),
], ids=["static", "dynamic-batch", "any-hw", "end2end", "uint8", "uint8-any-hw"])
def test_the_manifest_made_from_an_engine_passes_the_runtimes_own_checks(e: FakeEngine) -> None:
    """What the runtime then checks an engine against (the I/O, its profiles, the buffers)
    holds for the manifest made from that same engine."""
    io = infer_engine_io(e, path=ENGINE)
    names = [f"c{i}" for i in range(io.classes or 2)]
    m = trusted_manifest(io, names, path=ENGINE, sha256="34" * 32, facts=HERE)
    specs = [TensorSpec(t.name, t.is_input, t.shape, t.dtype) for t in read_engine_tensors(e)]
    check_io(specs, path=ENGINE, input_name=m.input_name, output_names=m.output_names, imgsz=m.imgsz,
             dynamic_hw=m.dynamic_hw, layout=m.input_layout)
    if m.dynamic_hw:
        shapes = e.get_tensor_profile_shape("images", 0)
        assert hw_profile_from_shapes(*shapes, stride=m.stride, layout=m.input_layout).max == m.imgsz
    assert io.batch.min <= m.batch_min <= m.batch_max <= io.batch.max
    at_max = None
    if m.dynamic_hw:   # the shapes TensorRT would report at the largest batch and input
        at_max = {"images": m.input_contract().shape(m.batch_max, *m.imgsz), "output0": (m.batch_max, 6, 8400)}
    buffers = plan_buffers(specs, m.batch_max, at_max)
    assert buffers[0].shape[0] == m.batch_max


def test_class_count_must_match_the_head_naming_both_numbers() -> None:
    io = infer_engine_io(engine((1, 3, 640, 640), (1, 84, 8400)), path=ENGINE)
    with pytest.raises(ManifestError, match=r"model.names lists 2 class names, but the engine's output "
                                            r"output0 \(1, 84, 8400\) FLOAT has 80 classes"):
        trusted_manifest(io, ["Normal", "Fall"], path=ENGINE, sha256="ef" * 32, facts=HERE)


def test_trusted_manifest_records_this_machine_and_the_warning_says_what_was_inferred() -> None:
    io: EngineIO = infer_engine_io(engine((1, 3, 320, 320), (1, 6, 2100)), path=ENGINE)
    m = trusted_manifest(io, ["Normal", "Fall"], path=ENGINE, sha256="12" * 32, facts=HERE)
    assert m.class_names == {0: "Normal", 1: "Fall"} and m.model_format == "tensorrt"
    assert m.build["tensorrt"] == "10.3.0.30" and m.build["compute_capability"] == "8.7" and m.build["trusted"]
    text = trust_warning(io, path=ENGINE, sha256="12" * 32, names=["Normal", "Fall"])
    assert "without a manifest" in text and "checked against nothing" in text
    assert "input images (1, 3, 320, 320) FLOAT" in text and "yolov8_raw, 2 classes" in text
    assert "Normal, Fall" in text and "beyond these names" not in text


# ---------------------------------------------------------------------------------------
# config: field and line
# ---------------------------------------------------------------------------------------
def _config(tmp_path: Path, model_lines: str) -> str:
    (tmp_path / "yard.engine").write_bytes(b"plan bytes")
    (tmp_path / "yard.onnx").write_bytes(b"onnx bytes")
    return "cameras: []\nmodel:\n" + model_lines


def _parse(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    return parse_config(text, source="c.yaml", base_dir=tmp_path)


@pytest.mark.parametrize(("model_lines", "where", "message"), [
    ("  path: yard.onnx\n  trust_engine: true\n  names: [a]\n", "c.yaml:4: model.trust_engine",
     "yard.onnx is not a TensorRT engine"),
    ("  path: yard.engine\n  backend: openvino\n  trust_engine: true\n  names: [a]\n",
     "c.yaml:5: model.trust_engine", "a trusted engine runs on tensorrt"),
    ("  path: yard.engine\n  trust_engine: true\n", "c.yaml:4: model.trust_engine",
     "add model.names"),
    ("  path: yard.engine\n  names: [a, b]\n", "c.yaml:4: model.names",
     "only for a trusted engine"),
    ("  path: yard.engine\n  trust_engine: true\n  names: [a, b, a]\n", "c.yaml:5: model.names",
     r"names\[2\] 'a' repeats names\[0\]"),
    ("  path: yard.engine\n  trust_engine: true\n  names: [a, ' ']\n", "c.yaml:5: model.names",
     r"names\[1\] is blank"),
    ("  path: yard.engine\n  trust_engine: true\n  names: []\n", "c.yaml:5: model.names", "no class names"),
    ("  path: yard.engine\n  trust_engine: true\n  names: [a]\n  names_file: c.names\n",
     "c.yaml:6: model.names_file", "not both"),
    ("  path: yard.engine\n  trust_engine: true\n  names_file: missing.names\n",
     "c.yaml:5: model.names_file", "cannot read .*missing.names"),
    ("  path: yard.engine\n  names_file: c.names\n", "c.yaml:4: model.names_file", "only for a trusted engine"),
])
def test_config_errors_name_the_field_and_line(tmp_path: Path, model_lines: str, where: str, message: str) -> None:
    (tmp_path / "c.names").write_text("a\nb\n")
    with pytest.raises(ConfigError, match=message) as info:
        _parse(tmp_path, _config(tmp_path, model_lines))
    assert str(info.value).startswith(where + ":"), str(info.value)
    assert "problems" not in str(info.value)        # one error, not a cascade


def test_names_come_from_the_config_or_a_names_file(tmp_path: Path) -> None:
    cfg = _parse(tmp_path, _config(tmp_path, "  path: yard.engine\n  trust_engine: true\n  names: [Normal, Fall]\n"))
    assert cfg.model.trust_engine and cfg.model.names == ["Normal", "Fall"]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "fall.names").write_text("Normal\n\nFall\n")
    cfg = _parse(tmp_path, _config(tmp_path, "  path: yard.engine\n  trust_engine: true\n"
                                             "  names_file: sub/fall.names\n"))
    assert cfg.model.names == ["Normal", "Fall"]
    assert cfg.model.names_file == tmp_path / "sub" / "fall.names"
    (tmp_path / "sub" / "fall.names").write_text("Normal\nNormal\n")
    with pytest.raises(ConfigError, match=r"c.yaml:5: model.names_file: .*fall.names: fall.names\[1\] 'Normal' "
                                          r"repeats fall.names\[0\]"):
        _parse(tmp_path, _config(tmp_path, "  path: yard.engine\n  trust_engine: true\n"
                                           "  names_file: sub/fall.names\n"))


# ---------------------------------------------------------------------------------------
# the model loader: refusal without the flag, the trust checks, then TensorRT
# ---------------------------------------------------------------------------------------
def test_bare_engine_is_refused_naming_the_ways_out(tmp_path: Path) -> None:
    bare = tmp_path / "yard.engine"
    bare.write_bytes(b"plan bytes")
    with pytest.raises(ManifestError, match="no manifest") as info:
        open_backend(bare)
    assert "model.trust_engine: true" in str(info.value) and "--adopt-engine" in str(info.value)


def test_trusted_engine_needs_its_names_before_tensorrt(tmp_path: Path) -> None:
    bare = tmp_path / "yard.engine"
    bare.write_bytes(b"plan bytes")
    with pytest.raises(ManifestError, match="no class names are given"):
        open_backend(bare, trust_engine=True, class_names=[])


@no_tensorrt
def test_trusted_engine_passes_the_trust_checks_then_needs_tensorrt(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    cfg = _parse(tmp_path, _config(tmp_path, "  path: yard.engine\n  backend: tensorrt\n  trust_engine: true\n"
                                             "  names: [Normal, Fall]\n"))
    with pytest.raises(BackendError, match="TensorRT is not installed"):
        load_backend(cfg.model, SchedulerConfig(workers=1, autotune_s=0))
    # With auto, the engine's suffix picks TensorRT just the same.
    cfg = _parse(tmp_path, _config(tmp_path, "  path: yard.engine\n  trust_engine: true\n  names: [a]\n"))
    with pytest.raises(BackendError, match="TensorRT is not installed"):
        load_backend(cfg.model, SchedulerConfig(workers=1, autotune_s=0))


@no_tensorrt
def test_an_engine_with_its_manifest_is_loaded_by_it_even_when_trusted(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    from tests.test_trt_logic import write_engine
    engine_path = write_engine(tmp_path)
    with open(engine_path, "r+b") as f:          # its manifest still guards it: a changed byte is refused
        f.write(b"\x00\x01")
    with caplog.at_level(logging.INFO, logger="streamd.backend.tensorrt"):
        with pytest.raises(ManifestError, match="does not match its manifest"):
            open_backend(engine_path, trust_engine=True, class_names=["a"])
    assert "has a manifest" in caplog.text


@no_tensorrt
def test_streamd_check_refuses_a_bare_engine_and_reports_a_trusted_one(tmp_path: Path) -> None:
    (tmp_path / "yard.engine").write_bytes(b"plan bytes")
    (tmp_path / "c.yaml").write_text("cameras: []\nmodel:\n  path: yard.engine\n")
    # check refuses it as run does, both naming the ways out
    check, run = (_cli(cmd, "-c", "c.yaml", cwd=tmp_path) for cmd in ("check", "run"))
    assert "c.yaml: model.path:" in check.stderr
    for refused in (check, run):
        assert refused.returncode != 0 and "model.trust_engine: true" in refused.stderr, refused.stderr
        assert "--adopt-engine" in refused.stderr
    (tmp_path / "c.yaml").write_text("cameras: []\nmodel:\n  path: yard.engine\n  trust_engine: true\n"
                                     "  names: [Normal, Fall]\n")
    ok = _cli("check", "-c", "c.yaml", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "trusted without a manifest (model.trust_engine), 2 class names" in ok.stdout
    load = _cli("check", "-c", "c.yaml", "--load-model", cwd=tmp_path)
    assert load.returncode != 0 and "TensorRT is not installed" in load.stderr


@no_tensorrt
def test_doctor_says_what_reading_an_engine_needs(tmp_path: Path) -> None:
    bare = tmp_path / "yard.engine"
    bare.write_bytes(b"plan bytes")
    check = engine_model_check(bare, tensorrt=False)
    assert check.status == MISSING
    assert "no manifest: load it with model.trust_engine: true" in check.detail
    assert "needs TensorRT" in check.detail
