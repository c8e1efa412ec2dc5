"""Stages ``inputs`` and ``agreement``: check the FP16/INT8 options early, then hold a
converted model to the FP32 one it came from.

``agreement`` runs the FP32 ONNX and the converted model on the same letterboxed images
(``--verify-images DIR``, else the calibration images, else Ultralytics' sample pictures
and their mirror images) and compares the detections:

* per image, FP32 boxes are matched to candidate boxes of the same class with IoU >= 0.5,
  greedily, most confident FP32 box first: matched / missed / extra, and the mean IoU of
  the matches (all at the detection threshold, 0.25, what the daemon publishes);
* an AP50 of the candidate that treats the FP32 detections as ground truth, averaged over
  the classes FP32 found (COCO's 101-point interpolation; candidate boxes down to a 0.001
  score take part, as in any mAP, so a box whose score merely moved is not lost).

Below ``--min-agreement`` the export fails (exit 1) and nothing is installed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamd.errors import ExportError
from streamd.manifest import LAYOUT_END2END, LAYOUT_RAW
from streamd.pipeline.postprocess import PostprocessParams, postprocess
from streamd.pipeline.preprocess import Letterbox

from .int8_stage import as_float, check_image_folder, progress, samples_from_folder, to_network_input
from .samples import sample_paths
from .stages import DEFAULT_CONF, DEFAULT_IOU, DEFAULT_MAX_DET, ExportContext, ExportInputError, register

MATCH_IOU = 0.5
AP_MIN_SCORE = 0.001          # candidate boxes that take part in the AP ranking
MAX_VERIFY_IMAGES = 200
# Defaults of --min-agreement, from measurements on the Normal/Fall YOLOv8s at 320 (see
# benchmarks/RESULTS.md "CPU precision"): FP16 scores 1.0, INT8 0.99 (both flavours, 12
# images); a model quantized with min/max instead of percentile calibration scored 0.95,
# one with the decode quantized 0.0. FP16 is held to nearly exact agreement; INT8 gets room
# for scenes harder than the samples, not for a broken model.
DEFAULT_MIN_AGREEMENT = {"fp16": 0.95, "int8": 0.85}


# ---------------------------------------------------------------------------------------
# matching and AP
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dets:
    boxes: np.ndarray      # (N, 4) xyxy
    scores: np.ndarray     # (N,)
    classes: np.ndarray    # (N,) int

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def above(self, conf: float) -> "Dets":
        keep = self.scores > conf
        return Dets(self.boxes[keep], self.scores[keep], self.classes[keep])


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = (x2 - x1).clip(0) * (y2 - y1).clip(0)
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


@dataclass(frozen=True)
class ImageMatch:
    pairs: list[tuple[int, int, float]]      # (reference index, candidate index, IoU)
    missed: list[int]                         # reference boxes without a partner
    extra: list[int]                          # candidate boxes without a partner


def match_boxes(ref: Dets, cand: Dets, iou_thr: float = MATCH_IOU) -> ImageMatch:
    """One-to-one, same class, IoU >= ``iou_thr``; most confident reference box first,
    each taking the free candidate it overlaps most."""
    iou = iou_matrix(ref.boxes, cand.boxes)
    taken = np.zeros(len(cand), bool)
    pairs: list[tuple[int, int, float]] = []
    missed: list[int] = []
    for i in np.argsort(-ref.scores, kind="stable"):
        ok = ~taken & (cand.classes == ref.classes[i])
        if ok.any():
            row = np.where(ok, iou[i], -1.0)
            j = int(np.argmax(row))
            if row[j] >= iou_thr:
                taken[j] = True
                pairs.append((int(i), j, float(row[j])))
                continue
        missed.append(int(i))
    return ImageMatch(pairs, missed, [int(j) for j in np.flatnonzero(~taken)])


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """COCO-style: precision made monotone, sampled at 101 recall points."""
    if recall.size == 0:
        return 0.0
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    points = np.linspace(0.0, 1.0, 101)
    idx = np.searchsorted(recall, points, side="left")
    values = np.where(idx < len(envelope), envelope[np.minimum(idx, len(envelope) - 1)], 0.0)
    return float(values.mean())


def ap50_per_class(refs: list[Dets], cands: list[Dets], iou_thr: float = MATCH_IOU) -> dict[int, float]:
    """AP of ``cands`` against ``refs`` as ground truth, for each class ``refs`` contains."""
    classes = sorted({int(c) for r in refs for c in r.classes})
    out: dict[int, float] = {}
    for cls in classes:
        n_gt = sum(int((r.classes == cls).sum()) for r in refs)
        scored: list[tuple[float, int, int]] = []       # (score, image, candidate index)
        for k, c in enumerate(cands):
            for j in np.flatnonzero(c.classes == cls):
                scored.append((float(c.scores[j]), k, int(j)))
        scored.sort(key=lambda t: -t[0])
        used = [np.zeros(len(r), bool) for r in refs]
        ious = [iou_matrix(c.boxes, r.boxes) for r, c in zip(refs, cands)]
        tp = np.zeros(len(scored))
        for n, (_, k, j) in enumerate(scored):
            gt_ok = (refs[k].classes == cls) & ~used[k]
            if not gt_ok.any():
                continue
            row = np.where(gt_ok, ious[k][j], -1.0)
            g = int(np.argmax(row))
            if row[g] >= iou_thr:
                used[k][g] = True
                tp[n] = 1
        ctp = np.cumsum(tp)
        recall = ctp / max(n_gt, 1)
        precision = ctp / np.arange(1, len(scored) + 1)
        out[cls] = average_precision(recall, precision)
    return out


@dataclass
class Agreement:
    images: int
    reference_boxes: int
    candidate_boxes: int
    matched: int
    missed: int
    extra: int
    mean_iou: float
    ap50: float | None                  # None: FP32 found nothing to compare with
    ap50_per_class: dict[str, float] = field(default_factory=dict)
    conf: float = DEFAULT_CONF

    def summary(self) -> str:
        ap = "n/a (no FP32 detections)" if self.ap50 is None else f"{self.ap50:.3f}"
        return (f"agreement with FP32 on {self.images} image(s): AP50 {ap}, matched "
                f"{self.matched}/{self.reference_boxes} boxes, {self.missed} missed, {self.extra} extra, "
                f"mean IoU {self.mean_iou:.3f}")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean_iou"] = round(self.mean_iou, 4)
        if self.ap50 is not None:
            d["ap50"] = round(self.ap50, 4)
        d["ap50_per_class"] = {k: round(v, 4) for k, v in self.ap50_per_class.items()}
        return d


def agreement(refs: list[Dets], cands: list[Dets], names: dict[int, str],
              conf: float = DEFAULT_CONF) -> Agreement:
    """Compare per-image detections; ``refs`` and ``cands`` may hold boxes below ``conf``
    (only the candidates' low-score boxes are used, by the AP)."""
    refs_at = [r.above(conf) for r in refs]
    cands_at = [c.above(conf) for c in cands]
    matched = missed = extra = 0
    ious: list[float] = []
    for r, c in zip(refs_at, cands_at):
        m = match_boxes(r, c)
        matched += len(m.pairs)
        missed += len(m.missed)
        extra += len(m.extra)
        ious.extend(p[2] for p in m.pairs)
    per_class = ap50_per_class(refs_at, [c.above(AP_MIN_SCORE) for c in cands])
    ap = float(np.mean(list(per_class.values()))) if per_class else None
    return Agreement(
        images=len(refs), reference_boxes=sum(len(r) for r in refs_at),
        candidate_boxes=sum(len(c) for c in cands_at), matched=matched, missed=missed, extra=extra,
        mean_iou=float(np.mean(ious)) if ious else 0.0, ap50=ap,
        ap50_per_class={names.get(k, str(k)): v for k, v in per_class.items()}, conf=conf)


# ---------------------------------------------------------------------------------------
# running the models
# ---------------------------------------------------------------------------------------
Runner = Callable[[np.ndarray], np.ndarray]


def _onnxruntime_runner(model: Path) -> Runner:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def _openvino_runner(model: Path) -> Runner:
    import openvino as ov

    core = ov.Core()
    # FP32 for the float parts, as streamd's OpenVINO backend runs them on a CPU.
    compiled = core.compile_model(core.read_model(str(model)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return lambda x: compiled(x)[0]


RUNNERS: dict[str, Callable[[Path], Runner]] = {"onnxruntime": _onnxruntime_runner, "openvino": _openvino_runner}


def detect(model: Path, samples: np.ndarray, *, layout: str, names: dict[int, str],
           batch_max: int, static_batch: bool, min_score: float, iou: float = DEFAULT_IOU,
           backend: str = "onnxruntime") -> list[Dets]:
    """Detections of ``model`` (ONNX Runtime or OpenVINO, CPU) on letterboxed uint8 samples,
    in network input pixels."""
    run = RUNNERS[backend](model)
    h, w = samples.shape[2:]
    identity = Letterbox(gain=1.0, pad_x=0, pad_y=0, width=w, height=h)
    params = PostprocessParams(conf=min_score, iou=iou, max_det=DEFAULT_MAX_DET)
    step = batch_max if static_batch else min(batch_max, 8)
    out: list[Dets] = []
    for start in range(0, len(samples), step):
        chunk = as_float(samples[start:start + step])
        n = len(chunk)
        if static_batch and n < batch_max:
            chunk = np.concatenate([chunk, np.zeros((batch_max - n, *chunk.shape[1:]), np.float32)])
        y = run(chunk)
        for dets in postprocess(y, layout, [identity] * n, names, params):
            out.append(Dets(np.array([d.box for d in dets], np.float64).reshape(-1, 4),
                            np.array([d.confidence for d in dets], np.float64),
                            np.array([d.class_id for d in dets], np.int64)))
    return out


def default_verify_samples(imgsz: tuple[int, int]) -> tuple[np.ndarray, str]:
    """Ultralytics' bus.jpg and zidane.jpg and their mirror images."""
    import cv2

    images = [cv2.imread(str(p)) for p in sample_paths()]
    images = [i for i in images if i is not None]
    if not images:
        raise ExportError("no verification images: give --verify-images DIR "
                          "(Ultralytics' sample pictures are not installed)")
    frames = images + [cv2.flip(i, 1) for i in images]
    return np.stack([to_network_input(f, imgsz) for f in frames]), "Ultralytics sample images"


# ---------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------
@register("inputs", "check calibration/verification folders, camera config and engine options")
def inputs_stage(ctx: ExportContext) -> None:
    req = ctx.request
    if req.calib is not None:
        check_image_folder(req.calib, "--calib")
    if req.verify_images is not None:
        check_image_folder(req.verify_images, "--verify-images")
    if req.calib_from is not None:
        from streamd.config import load_config
        from streamd.errors import ConfigError
        from streamd.redact import scrub
        try:
            cfg = load_config(req.calib_from, check_files=False)
        except ConfigError as exc:
            raise ExportInputError(f"--calib-from: {scrub(str(exc))}") from None
        if not any(c.enabled for c in cfg.cameras):
            raise ExportInputError(f"--calib-from {req.calib_from}: the config has no enabled cameras")


def min_agreement_for(ctx: ExportContext) -> float:
    req = ctx.request
    if req.min_agreement is not None:
        return req.min_agreement
    return DEFAULT_MIN_AGREEMENT.get(ctx.precision, 0.8)


@register("agreement", "compare the converted model's detections with the FP32 model's")
def agreement_stage(ctx: ExportContext) -> None:
    req = ctx.request
    if ctx.model_path is None or ctx.reference_onnx is None:
        raise RuntimeError("the agreement stage needs a converted model and its FP32 reference")
    if req.verify_images is not None:
        samples = samples_from_folder(req.verify_images, MAX_VERIFY_IMAGES, req.imgsz, "--verify-images")
        where = f"--verify-images {req.verify_images.name}"
    elif ctx.calib_samples is not None:
        samples, where = ctx.calib_samples, "the calibration images"
    else:
        samples, where = default_verify_samples(req.imgsz)
    layout = LAYOUT_END2END if req.nms else LAYOUT_RAW
    progress(f"verifying {ctx.precision} against FP32 on {len(samples)} image(s) ({where})")
    kw: dict[str, Any] = {"layout": layout, "names": ctx.class_names, "batch_max": req.batch_max,
                          "static_batch": not req.dynamic_batch, "iou": req.iou}
    try:
        refs = detect(ctx.reference_onnx, samples, min_score=DEFAULT_CONF, **kw)
        cands = detect(ctx.model_path, samples, min_score=AP_MIN_SCORE, **kw)
    except Exception as exc:
        raise ExportError(f"{req.weights}: running the {ctx.precision} model for verification failed "
                          f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]})") from None
    result = agreement(refs, cands, ctx.class_names, DEFAULT_CONF)
    threshold = min_agreement_for(ctx)
    ctx.build_info["agreement"] = {**result.as_dict(), "images_from": where, "min_agreement": threshold}
    progress(result.summary())
    ctx.notes.append(result.summary())
    if result.ap50 is None:
        ctx.notes.append("FP32 found nothing in the verification images: agreement not measured; "
                         "give --verify-images with pictures of what the cameras see")
        if result.candidate_boxes and threshold > 0:
            raise ExportError(f"{req.model_name}: verification failed: FP32 finds no object in the "
                              f"{len(samples)} image(s) but the {ctx.precision} model finds "
                              f"{result.candidate_boxes}; not installed")
        return
    if result.ap50 < threshold:
        hint = ("more, or more representative, calibration images (--calib-count, --calib)"
                if ctx.precision == "int8" else "--precision fp32")
        raise ExportError(f"{req.model_name}: verification failed: {ctx.precision} agreement with FP32 "
                          f"(AP50) is {result.ap50:.3f}, below --min-agreement {threshold:g} "
                          f"({result.matched}/{result.reference_boxes} boxes matched, {result.missed} "
                          f"missed, {result.extra} extra); the model was not installed. Try {hint}.")
    verify_backends(ctx, samples, refs, kw, threshold)


def verify_backends(ctx: ExportContext, samples: np.ndarray, refs: list[Dets], kw: dict[str, Any],
                    threshold: float) -> None:
    """Hold the file to the same agreement on every other CPU backend its flavour is made for
    (OpenVINO), and list in the manifest's ``backends`` only those that reach it.

    OpenVINO does not run Q/DQ graphs as ONNX Runtime does (it executes them in integer
    arithmetic with its own fusions): before the graph changes of int8_graph.py the symmetric
    file of the Normal/Fall model lost every box through it although ONNX Runtime's agreement
    was 0.99; with them it agrees as closely as ONNX Runtime. The check runs the file as the
    daemon's OpenVINO backend does (dynamic shapes, float parts in FP32), so a fusion that goes
    wrong in a later OpenVINO release is caught here. ONNX Runtime is the gate above; TensorRT
    cannot be checked without its GPU (``streamd doctor --model`` compares an engine with ONNX
    Runtime there)."""
    by_backend: dict[str, float | None] = {"onnxruntime": ctx.build_info["agreement"]["ap50"]}
    kept: list[str] = []
    for name in ctx.backends:
        if name not in RUNNERS or name == "onnxruntime":
            kept.append(name)
            continue
        try:
            cands = detect(ctx.model_path, samples, min_score=AP_MIN_SCORE, backend=name, **kw)  # type: ignore[arg-type]
        except ImportError:
            ctx.notes.append(f"not verified on {name} (not installed here): not listed in the manifest's backends")
            continue
        except Exception as exc:
            ctx.notes.append(f"{name} cannot run it ({type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0][:200]}): not listed in the manifest's backends")
            continue
        result = agreement(refs, cands, ctx.class_names, DEFAULT_CONF)
        by_backend[name] = None if result.ap50 is None else round(result.ap50, 4)
        progress(f"through {name}: {result.summary()}")
        if result.ap50 is None or result.ap50 >= threshold:
            kept.append(name)
        else:
            ctx.notes.append(f"through {name}: AP50 {result.ap50:.3f}, below {threshold:g}: "
                             f"not listed in the manifest's backends")
    ctx.backends = kept
    ctx.build_info["agreement"]["ap50_by_backend"] = by_backend
