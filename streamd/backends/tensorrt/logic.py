"""Everything about TensorRT engines that can be decided without TensorRT, but their shapes
(those are in ``profiles``).

The TensorRT backend, the engine build and ``streamd doctor`` are thin layers over the
functions here, so the decisions they make are tested on any machine:

* versions: parsing, and the rule for when a serialized plan may be loaded at all
  (a plan is only valid for the TensorRT major.minor that built it);
* the engine manifest check made *before* deserializing (a plan is native code):
  sha256, TensorRT version, GPU compute capability, and whether a mismatch may be
  answered by rebuilding from the recorded ONNX;
* how a precision is expressed for a TensorRT version (strongly typed network vs builder
  flags, which TensorRT 11 removed);
* which nodes of a YOLOv8 graph form the head's decode part, kept in float by the FP16
  conversion and the INT8 quantization.

This module never imports tensorrt, pycuda or onnx.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ...errors import ManifestError
from ...manifest import ModelManifest

# The name-based tensor API (num_io_tensors, set_input_shape, set_tensor_address,
# execute_async_v3) appeared in 8.5; older versions are not supported.
MIN_TENSORRT = (8, 5)

# Keys of ModelManifest.build for engines. The export tool writes them, the backend reads them.
BUILD_TENSORRT = "tensorrt"
BUILD_GPU = "gpu"
BUILD_CC = "compute_capability"
BUILD_PROFILE = "profile"                # {"min": n, "opt": n, "max": n}
BUILD_HW_PROFILE = "hw_profile"          # any-H x W engines: {"min": [h, w], "opt": [h, w], "max": [h, w]}
BUILD_ONNX_FILE = "onnx_file"            # the ONNX the engine was built from (same folder)
BUILD_ONNX_SHA = "onnx_sha256"
BUILD_WORKSPACE_MB = "workspace_mb"
BUILD_STRONGLY_TYPED = "strongly_typed"
BUILD_FLAGS = "builder_flags"
BUILD_FP32_ONNX_SHA = "fp32_onnx_sha256"  # FP16/INT8 ONNX: the FP32 ONNX they were made from

FORMAT_TENSORRT = "tensorrt"


# ---------------------------------------------------------------------------------------
# versions
# ---------------------------------------------------------------------------------------
_VERSION_RE = re.compile(r"^\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:\.(\d+))?")


@dataclass(frozen=True, order=True)
class TrtVersion:
    major: int
    minor: int
    patch: int = 0
    build: int = 0

    @classmethod
    def parse(cls, text: str | Sequence[int]) -> "TrtVersion":
        """``"10.3.0.26"``, ``"8.6.1"``, ``"10.3.0.post1"`` or ``(10, 3, 0)``."""
        if not isinstance(text, str):
            parts = [int(p) for p in text][:4]
            if len(parts) < 2:
                raise ValueError(f"TensorRT version {tuple(text)!r} needs at least major.minor")
            return cls(*parts)
        m = _VERSION_RE.match(text)
        if m is None or m.group(2) is None:
            raise ValueError(f"{text!r} is not a TensorRT version (expected MAJOR.MINOR[.PATCH])")
        return cls(*(int(g) if g is not None else 0 for g in m.groups()))

    @property
    def line(self) -> tuple[int, int]:
        """(major, minor): what a serialized plan is tied to."""
        return (self.major, self.minor)

    def __str__(self) -> str:
        core = f"{self.major}.{self.minor}.{self.patch}"
        return f"{core}.{self.build}" if self.build else core


def check_supported(version: TrtVersion) -> None:
    if version.line < MIN_TENSORRT:
        raise ValueError(f"TensorRT {version} is too old: streamd needs "
                         f"{MIN_TENSORRT[0]}.{MIN_TENSORRT[1]} or newer (name-based tensor I/O)")


def plan_incompatibility(built: str, running: str) -> str | None:
    """Why a plan built by TensorRT ``built`` cannot be loaded by ``running`` (None: it can).

    TensorRT only guarantees that a plan loads in the exact version that built it; within
    one major.minor patch releases keep the format, across minor versions they do not
    (version-compatible plans are a build option streamd does not use).
    """
    b, r = TrtVersion.parse(built), TrtVersion.parse(running)
    if b.line != r.line:
        return (f"it was built by TensorRT {b} and this machine runs TensorRT {r} "
                f"(a plan only loads in the TensorRT {b.major}.{b.minor}.x that built it)")
    return None


# ---------------------------------------------------------------------------------------
# GPU compute capability
# ---------------------------------------------------------------------------------------
def format_cc(major: int, minor: int) -> str:
    return f"{int(major)}.{int(minor)}"


def parse_cc(text: str | Sequence[int]) -> tuple[int, int]:
    """``"8.6"`` or ``"sm_86"`` or ``(8, 6)`` -> (8, 6)."""
    if not isinstance(text, str):
        major, minor = (int(v) for v in text)
        return major, minor
    t = text.strip().lower()
    m = re.fullmatch(r"sm_?(\d)(\d+)", t) or re.fullmatch(r"(\d+)\.(\d+)", t)
    if m is None:
        raise ValueError(f"{text!r} is not a compute capability (expected e.g. 8.6)")
    return int(m.group(1)), int(m.group(2))


# ---------------------------------------------------------------------------------------
# engine manifest checks (made before the plan is deserialized)
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RuntimeFacts:
    """What the machine that wants to load a plan runs."""

    tensorrt: str
    compute_capability: str
    gpu_name: str = ""


class EngineRefused(ManifestError):
    """The plan must not be loaded here; ``reason`` says why in one sentence."""

    def __init__(self, message: str, *, kind: str, rebuildable: bool) -> None:
        super().__init__(message)
        self.kind = kind                # "format" | "sha256" | "facts" | "tensorrt" | "compute_capability"
        self.rebuildable = rebuildable


@dataclass(frozen=True)
class EngineVerdict:
    action: str                         # "load" | "rebuild"
    reason: str = ""                    # why a rebuild is needed
    onnx_file: str | None = None        # what to rebuild from


def check_engine_file(manifest: ModelManifest, actual_sha256: str, *, path: str | Path) -> None:
    """The part of the check that needs no TensorRT: is this the file the manifest describes?"""
    if manifest.model_format != FORMAT_TENSORRT:
        raise EngineRefused(f"{path}: its manifest describes a {manifest.model_format!r} model, "
                            f"not a TensorRT engine", kind="format", rebuildable=False)
    if actual_sha256 != manifest.model_sha256:
        raise EngineRefused(
            f"{path}: sha256 {actual_sha256[:12]}… does not match its manifest "
            f"({manifest.model_sha256[:12]}…): the engine file was changed after it was built, "
            f"or the manifest belongs to another engine. Refusing to load it (an engine is "
            f"native code); rebuild it with streamd-export --engine.",
            kind="sha256", rebuildable=False)


def check_engine(manifest: ModelManifest, actual_sha256: str, runtime: RuntimeFacts, *,
                 path: str | Path, allow_rebuild: bool = False) -> EngineVerdict:
    """Decide whether the plan at ``path`` may be deserialized on this machine.

    A changed file is refused whatever ``allow_rebuild`` says: the manifest's recorded
    ONNX no longer proves anything about bytes that were altered after the build. A plan
    from another TensorRT version or GPU generation is intact but unusable here; it is
    refused, or (``allow_rebuild``) answered with "rebuild from the recorded ONNX".
    """
    check_engine_file(manifest, actual_sha256, path=path)
    build = manifest.build or {}
    built_trt = build.get(BUILD_TENSORRT)
    built_cc = build.get(BUILD_CC)
    if not built_trt or not built_cc:
        missing = [k for k, v in ((BUILD_TENSORRT, built_trt), (BUILD_CC, built_cc)) if not v]
        raise EngineRefused(f"{path}: its manifest does not record {' and '.join(missing)} "
                            f"(build.{missing[0]}); re-export the engine with streamd-export --engine",
                            kind="facts", rebuildable=False)
    problems: list[tuple[str, str]] = []
    try:
        why = plan_incompatibility(str(built_trt), runtime.tensorrt)
    except ValueError as exc:
        raise EngineRefused(f"{path}: {exc}", kind="facts", rebuildable=False) from None
    if why:
        problems.append(("tensorrt", why))
    try:
        cc_built, cc_here = parse_cc(str(built_cc)), parse_cc(runtime.compute_capability)
    except ValueError as exc:
        raise EngineRefused(f"{path}: {exc}", kind="facts", rebuildable=False) from None
    if cc_built != cc_here:
        gpu_built = build.get(BUILD_GPU) or "a GPU"
        gpu_here = runtime.gpu_name or "this GPU"
        problems.append(("compute_capability",
                         f"it was built for {gpu_built} (compute capability {format_cc(*cc_built)}) "
                         f"and {gpu_here} has compute capability {format_cc(*cc_here)} "
                         f"(plans are specific to a GPU generation)"))
    if not problems:
        return EngineVerdict("load")
    reason = "; ".join(p[1] for p in problems)
    onnx_file = build.get(BUILD_ONNX_FILE)
    if allow_rebuild and onnx_file:
        return EngineVerdict("rebuild", reason=reason, onnx_file=str(onnx_file))
    if allow_rebuild:
        hint = "it records no ONNX to rebuild from; build it again with streamd-export --engine"
    elif onnx_file:
        hint = (f"rebuild it on this machine from {onnx_file} (streamd-export --engine, or set "
                f"model.rebuild_engine: true to let the daemon do it)")
    else:
        hint = "build it again on this machine with streamd-export --engine"
    raise EngineRefused(f"{path} cannot be loaded here: {reason}. {hint[0].upper()}{hint[1:]}.",
                        kind=problems[0][0], rebuildable=True)


def check_source_onnx(manifest: ModelManifest, onnx_path: Path, actual_sha256: str) -> None:
    """The ONNX a rebuild would start from must be the one the engine was built from."""
    want = (manifest.build or {}).get(BUILD_ONNX_SHA)
    if not want:
        raise EngineRefused(f"{onnx_path}: the engine manifest records no sha256 of its ONNX, so "
                            f"a rebuild cannot prove it uses the same model", kind="facts",
                            rebuildable=False)
    if actual_sha256 != want:
        raise EngineRefused(f"{onnx_path}: sha256 {actual_sha256[:12]}… is not the ONNX this engine "
                            f"was built from ({str(want)[:12]}…); refusing to rebuild from it",
                            kind="sha256", rebuildable=False)


# ---------------------------------------------------------------------------------------
# precision per TensorRT version
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildMode:
    explicit_batch_flag: bool          # NetworkDefinitionCreationFlag.EXPLICIT_BATCH (< 10 only)
    strongly_typed: bool               # NetworkDefinitionCreationFlag.STRONGLY_TYPED
    builder_flags: tuple[str, ...]     # BuilderFlag member names to set
    pin_decode_fp32: bool              # weak typing: keep the head's decode layers in FP32


def build_mode(version: TrtVersion, precision: str) -> BuildMode:
    """How to build ``precision`` from an ONNX that already carries it (FP16 casts, Q/DQ).

    * 8.5-9.x: weak typing only. FP16/INT8 must be enabled by builder flags (Q/DQ networks
      need INT8); with FP16 the decode layers are pinned to FP32, since weak typing would
      otherwise be free to run them in half precision.
    * 10.x: a strongly typed network builds exactly the types in the ONNX, no flags.
    * 11+: strong typing is the only mode (the precision flags are gone).
    """
    check_supported(version)
    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"unknown precision {precision!r}")
    if version.major < 10:
        flags = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8",)}[precision]
        return BuildMode(explicit_batch_flag=True, strongly_typed=False, builder_flags=flags,
                         pin_decode_fp32=precision == "fp16")
    if version.major == 10:
        return BuildMode(explicit_batch_flag=False, strongly_typed=precision != "fp32",
                         builder_flags=(), pin_decode_fp32=False)
    return BuildMode(explicit_batch_flag=False, strongly_typed=True, builder_flags=(),
                     pin_decode_fp32=False)


# ---------------------------------------------------------------------------------------
# the YOLOv8 head's decode part
# ---------------------------------------------------------------------------------------
DEFAULT_HEAD_PREFIX = "/model.22/"
_BRANCH_RE = re.compile(r"^cv\d+\.\d+/")   # cv2.0/..., cv3.1/...: per-level conv branches


def head_prefix(node_names: Iterable[str]) -> str:
    """The name prefix of the Detect head's nodes (``/model.22/`` for YOLOv8 n/s/m/l/x).

    Found from the DFL nodes, which only the head has; falls back to YOLOv8's index.
    """
    for name in node_names:
        i = name.find("/dfl/")
        if i > 0:
            return name[:i + 1]
    return DEFAULT_HEAD_PREFIX


def is_decode_node(name: str, op_type: str, prefix: str) -> bool:
    """Part of the decode (DFL softmax and its conv, anchors, strides, box and score concat,
    the class sigmoid), as opposed to the head's per-level conv branches."""
    if not name.startswith(prefix):
        return False
    return _BRANCH_RE.match(name[len(prefix):]) is None


def keep_float_in_int8(name: str, op_type: str, prefix: str) -> bool:
    """Nodes the INT8 quantization leaves in float: everything of the head that is not one
    of its branch convolutions. The DFL's fixed 0..15 conv is part of the decode and stays
    float too: quantizing its softmax input shifts every box edge."""
    if not name.startswith(prefix):
        return False
    if op_type != "Conv":
        return True
    return is_decode_node(name, op_type, prefix)
