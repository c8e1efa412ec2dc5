"""``streamd-export --adopt-engine X.engine --onnx X.onnx``: the manifest of an engine built
elsewhere (``trtexec --onnx=X.onnx --saveEngine=X.engine ...``), so streamd loads it like one of
its own: the ONNX's classes, sizes and layout (its manifest, or derived from the graph without
torch), and the plan's sha256, TensorRT version, GPU and optimisation profiles.

Everything but the last step is plain Python on the ONNX; the plan is then read by TensorRT
(its version must be the one that built it, and the GPU the one it was built for), which is why
adopting runs on the box that runs the engine. Where TensorRT is missing it stops there, naming
TensorRT, with exit status 3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from streamd.backends.tensorrt.build import BuildOutcome, engine_manifest
from streamd.backends.tensorrt.logic import BUILD_HW_PROFILE, BUILD_PROFILE, BUILD_TENSORRT
from streamd.backends.tensorrt.probe import INSTALL_HINT, probe_gpu, tensorrt_version
from streamd.manifest import ModelManifest, sha256_file

from .engine_stage import EngineUnavailable
from .onnx_input import onnx_manifest
from .stages import ExportInputError

ADOPTED = "adopted"          # build facts: the engine was built elsewhere (trtexec)


def profile_facts(shapes: tuple[Any, Any, Any], stride: int) -> dict[str, Any]:
    """Build facts from the input's optimisation profile (min, opt, max shapes, each
    (batch, 3, H, W)), as ``build_engine`` records them for its own engines."""
    lo, opt, hi = (tuple(int(x) for x in s) for s in shapes)
    if any(len(s) != 4 for s in (lo, opt, hi)):
        raise ExportInputError(f"the engine's input profile {lo} / {opt} / {hi} is not (batch, 3, H, W)")
    facts: dict[str, Any] = {BUILD_PROFILE: {"min": lo[0], "opt": opt[0], "max": hi[0]}}
    if lo[2:] != hi[2:]:
        facts[BUILD_HW_PROFILE] = {"min": list(lo[2:]), "opt": list(opt[2:]), "max": list(hi[2:]), "stride": stride}
    return facts


def read_plan_profile(plan: bytes, input_name: str) -> tuple[Any, Any, Any]:  # pragma: no cover - needs TensorRT
    """(min, opt, max) shapes of ``input_name`` in profile 0 of the plan. Untested here: written
    against TensorRT's documented API (8.5+: ``get_tensor_profile_shape``)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        raise ExportInputError("TensorRT could not read the engine (built by another TensorRT version, "
                               "or for another GPU?)")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    if input_name not in names:
        raise ExportInputError(f"the engine has no input '{input_name}' (its tensors: {', '.join(names)}); "
                               f"was it built from this ONNX?")
    return tuple(engine.get_tensor_profile_shape(input_name, 0))  # type: ignore[return-value]


def adopt_engine(engine: Path, onnx: Path) -> Path:
    """Write ``engine``'s manifest; return its path."""
    if not engine.is_file():
        raise ExportInputError(f"{engine}: no such engine file")
    if engine.parent.resolve() != onnx.parent.resolve():
        raise ExportInputError(f"{onnx}: keep the ONNX beside the engine ({engine.parent}): a rebuild "
                               f"(model.rebuild_engine) looks for it there")
    source, _ = onnx_manifest(onnx)               # torch-free; raises on a model streamd cannot run
    version = tensorrt_version()
    if version is None:
        raise EngineUnavailable(f"read {onnx.name} ({len(source.class_names)} classes, {source.output_layout} "
                                f"output); adopting {engine.name} needs TensorRT to read the plan, which is not "
                                f"installed here ({INSTALL_HINT})")
    gpu, why = probe_gpu(0)
    if gpu is None:
        raise EngineUnavailable(f"adopting {engine.name} needs the NVIDIA GPU it was built for; none is "
                                f"usable here ({why})")
    plan = engine.read_bytes()
    facts = {BUILD_TENSORRT: version, ADOPTED: True,
             **profile_facts(read_plan_profile(plan, source.input_name), source.stride)}
    manifest: ModelManifest = engine_manifest(
        source, engine, BuildOutcome(plan, facts), gpu=gpu.name, compute_capability=gpu.compute_capability,
        onnx_file=onnx.name, onnx_sha256=sha256_file(onnx), cuda_driver=gpu.driver)
    return manifest.write(engine)
