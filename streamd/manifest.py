"""The sidecar manifest that travels beside every model file.

The export tool writes it and the daemon reads it with this one module, so the format is
defined in exactly one place. Engines stay plain files (readable by trtexec); everything
that describes them lives here, beside them: ``yolov8s.onnx`` -> ``yolov8s.onnx.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ManifestError
from .fileio import write_atomic

MANIFEST_FORMAT = 1

# Output layouts the postprocessor understands.
LAYOUT_RAW = "yolov8_raw"       # (batch, 4 + num_classes, anchors): cx, cy, w, h, class scores
LAYOUT_END2END = "end2end"      # (batch, max_det, 6): x1, y1, x2, y2, score, class (NMS in graph)
LAYOUTS = (LAYOUT_RAW, LAYOUT_END2END)

# The grey every YOLOv8 letterbox pads with (Ultralytics' ``LetterBox``): part of what the model
# was trained on, so preprocessing and the backends that pad a short batch agree on it.
PAD_VALUE = 114

# What a model's image input takes. The classic export takes the letterboxed batch as float
# (N, 3, H, W) RGB scaled to [0, 1], made on the host; the uint8 export takes the letterbox's
# own bytes, (N, H, W, 3) BGR, and scales and reorders them inside its graph, so the host (or
# the upload to a GPU) moves 1 byte per pixel instead of 4.
LAYOUT_NCHW, LAYOUT_NHWC = "nchw", "nhwc"
CHANNELS_RGB, CHANNELS_BGR = "rgb", "bgr"


@dataclass(frozen=True)
class InputContract:
    """The element type, axis order and channel order of a model's image input."""

    dtype: str = "float32"           # "float32" | "float16" | "uint8"
    layout: str = LAYOUT_NCHW
    channels: str = CHANNELS_RGB

    @property
    def raw(self) -> bool:
        """The letterboxed uint8 BGR pixels as they are: normalised inside the model."""
        return self.dtype == "uint8"

    def shape(self, n: int, h: int, w: int) -> tuple[int, int, int, int]:
        return (n, h, w, 3) if self.layout == LAYOUT_NHWC else (n, 3, h, w)

    def shape_text(self, n: object, h: object, w: object) -> str:
        """The shape in words for messages, e.g. ``(n, 3, h, w)``."""
        dims = (n, h, w, 3) if self.layout == LAYOUT_NHWC else (n, 3, h, w)
        return f"({', '.join(str(d) for d in dims)})"

    def hw(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(H, W) of an input of ``shape`` (4 axes in this contract's layout)."""
        return (int(shape[1]), int(shape[2])) if self.layout == LAYOUT_NHWC else (int(shape[2]), int(shape[3]))

    def describe(self) -> str:
        return f"{self.dtype} {self.layout.upper()} {self.channels.upper()}"

    def check(self, where: str = "model") -> None:
        """Only the two contracts streamd feeds are accepted; anything else is named."""
        float_rgb = (self.dtype in ("float32", "float16") and self.layout == LAYOUT_NCHW
                     and self.channels == CHANNELS_RGB)
        if not float_rgb and self != RAW_UINT8:
            raise ManifestError(f"{where}: input {self.describe()} is not one streamd feeds (float32 or "
                                f"float16 NCHW RGB scaled to [0, 1], or uint8 NHWC BGR)")


FLOAT_INPUT = InputContract()
RAW_UINT8 = InputContract("uint8", LAYOUT_NHWC, CHANNELS_BGR)


def contract_from_graph(dtype: str, shape: tuple[int | None, ...]) -> InputContract:
    """The contract of a model without a manifest, read from its graph: a uint8 input whose
    last axis is 3 takes the letterbox's bytes (NHWC BGR); anything else is the float one."""
    if dtype == "uint8" and len(shape) == 4 and shape[3] == 3:
        return RAW_UINT8
    return InputContract(dtype)


# The backends each INT8 flavour is made for. The two Q/DQ forms are fast on different
# runtimes (on the development box's EPYC, at 320: the symmetric one runs on TensorRT and
# fast on OpenVINO but at under FP32's speed on ONNX Runtime's CPU; uint8 activations run
# fastest on ONNX Runtime and fast on OpenVINO, and TensorRT cannot build them). The export
# lists in ``backends`` those of its flavour's that it verified (or, for TensorRT, cannot
# check without a GPU); ``backend: auto`` then measures the listed ones that are installed.
INT8_FLAVOUR_BACKENDS: dict[str, tuple[str, ...]] = {
    "tensorrt": ("tensorrt", "openvino"),
    "cpu": ("onnxruntime", "openvino"),
}
# Manifests written before ``backends`` existed were verified through ONNX Runtime only.
INT8_FLAVOUR_BACKENDS_BEFORE = {"tensorrt": ("tensorrt",), "cpu": ("onnxruntime",)}


def sidecar_path(model_path: str | os.PathLike[str]) -> Path:
    """Where the manifest of ``model_path`` lives (same folder, ``.json`` appended)."""
    p = Path(model_path)
    return p.with_name(p.name + ".json")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class ModelManifest:
    """What a model is and how it was made. Field names are the JSON keys."""

    model_file: str                      # file name, relative to the manifest's folder
    model_sha256: str
    model_format: str                    # "onnx" | "tensorrt"
    class_names: dict[int, str]
    imgsz: tuple[int, int]               # (height, width) of the network input; the largest
                                         # one when dynamic_hw
    batch_min: int
    batch_max: int
    output_layout: str                   # one of LAYOUTS
    stride: int = 32
    # True: the model takes any (H, W) that are multiples of ``stride`` up to ``imgsz``, so
    # each camera can be inferred at its own aspect. Absent in manifests written before
    # such exports existed, which were all fixed-size.
    dynamic_hw: bool = False
    precision: str = "fp32"              # "fp32" | "fp16" | "int8"
    input_name: str = "images"
    input_dtype: str = "float32"
    # The input's axis order and channel order (see InputContract); absent in manifests
    # written before uint8 inputs existed, which all took float NCHW RGB.
    input_layout: str = LAYOUT_NCHW
    input_channels: str = CHANNELS_RGB
    output_names: list[str] = field(default_factory=lambda: ["output0"])
    opset: int | None = None
    nms: dict[str, Any] | None = None    # for end2end: {"iou": .., "conf": .., "max_det": ..}
    source: dict[str, Any] = field(default_factory=dict)   # {"weights": name, "sha256": ..}
    tools: dict[str, str] = field(default_factory=dict)    # tool name -> version
    build: dict[str, Any] = field(default_factory=dict)    # engine builds: GPU, TensorRT, ...
    # The backends the file is meant for (fast and verified on); empty: any. Absent in
    # manifests written before it existed: see ``meant_for``.
    backends: list[str] = field(default_factory=list)
    created: str = ""
    format: int = MANIFEST_FORMAT

    # ---- (de)serialisation -------------------------------------------------------------
    def to_json(self) -> str:
        d = asdict(self)
        d["class_names"] = {str(k): v for k, v in self.class_names.items()}
        d["imgsz"] = list(self.imgsz)
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> "ModelManifest":
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(d).__name__}")
        fmt = d.get("format", MANIFEST_FORMAT)
        if fmt != MANIFEST_FORMAT:
            raise ManifestError(f"{where}: manifest format {fmt!r} is not supported "
                                f"(this streamd reads format {MANIFEST_FORMAT})")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ManifestError(f"{where}: unknown field(s) {', '.join(unknown)}")
        required = ("model_file", "model_sha256", "model_format", "class_names", "imgsz",
                    "batch_min", "batch_max", "output_layout")
        missing = [k for k in required if k not in d]
        if missing:
            raise ManifestError(f"{where}: missing field(s) {', '.join(missing)}")
        try:
            d = dict(d)
            d["class_names"] = {int(k): str(v) for k, v in d["class_names"].items()}
            h, w = (int(x) for x in d["imgsz"])
            d["imgsz"] = (h, w)
            d["batch_min"] = int(d["batch_min"])
            d["batch_max"] = int(d["batch_max"])
            if "stride" in d:
                d["stride"] = int(d["stride"])
        except (AttributeError, TypeError, ValueError) as exc:
            raise ManifestError(f"{where}: malformed value ({exc})") from None
        m = cls(**d)
        m.validate(where)
        return m

    def validate(self, where: str = "manifest") -> None:
        if self.output_layout not in LAYOUTS:
            raise ManifestError(f"{where}: output_layout {self.output_layout!r} is not one of "
                                f"{', '.join(LAYOUTS)}")
        if not 1 <= self.batch_min <= self.batch_max:
            raise ManifestError(f"{where}: batch range {self.batch_min}-{self.batch_max} is invalid")
        if min(self.imgsz) <= 0:
            raise ManifestError(f"{where}: imgsz {self.imgsz} is invalid")
        if not isinstance(self.dynamic_hw, bool):
            raise ManifestError(f"{where}: dynamic_hw must be true or false, got {self.dynamic_hw!r}")
        if self.stride <= 0:
            raise ManifestError(f"{where}: stride {self.stride} is invalid")
        if self.dynamic_hw and (self.imgsz[0] % self.stride or self.imgsz[1] % self.stride):
            raise ManifestError(f"{where}: imgsz {self.imgsz[0]}x{self.imgsz[1]} of a dynamic_hw model "
                                f"must be multiples of its stride {self.stride}")
        if not self.class_names:
            raise ManifestError(f"{where}: class_names is empty")
        self.input_contract().check(f"{where}: input_dtype/input_layout/input_channels")
        if not isinstance(self.backends, list) or not all(isinstance(b, str) and b for b in self.backends):
            raise ManifestError(f"{where}: backends must be a list of backend names, got {self.backends!r}")

    def input_contract(self) -> InputContract:
        return InputContract(self.input_dtype, self.input_layout, self.input_channels)

    def meant_for(self) -> tuple[str, ...]:
        """The backends this file is meant for; () for any. An INT8 manifest written before
        the ``backends`` field existed gets its flavour's backends."""
        if self.backends:
            return tuple(self.backends)
        if self.precision == "int8":
            flavour = (self.build or {}).get("int8", {}).get("flavour")
            return INT8_FLAVOUR_BACKENDS_BEFORE.get(str(flavour), ())
        return ()

    def nms_conf(self) -> float | None:
        """The score threshold baked into a graph with NMS inside (``--nms --conf``), or None
        (a raw head, or a manifest that does not record one)."""
        conf = (self.nms or {}).get("conf") if self.output_layout == LAYOUT_END2END else None
        return float(conf) if isinstance(conf, (int, float)) and not isinstance(conf, bool) else None

    # ---- files -------------------------------------------------------------------------
    def write(self, model_path: str | os.PathLike[str]) -> Path:
        """Write atomically beside ``model_path`` (a reader never sees half a manifest)."""
        out = sidecar_path(model_path)
        write_atomic(out, self.to_json())
        return out

    @classmethod
    def read(cls, model_path: str | os.PathLike[str]) -> "ModelManifest":
        path = sidecar_path(model_path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ManifestError(f"{path}: manifest not found") from None
        except OSError as exc:
            raise ManifestError(f"{path}: cannot read manifest ({exc.strerror})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        return cls.from_dict(data, where=str(path))

    def check_file(self, model_path: str | os.PathLike[str]) -> None:
        """Refuse a model whose bytes are not the ones the manifest describes."""
        actual = sha256_file(model_path)
        if actual != self.model_sha256:
            raise ManifestError(
                f"{model_path}: sha256 {actual[:12]}… does not match its manifest "
                f"({self.model_sha256[:12]}…); the file was changed or the manifest belongs "
                f"to another model. Re-export it, or remove the stale manifest.")
