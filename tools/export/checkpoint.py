"""Stage ``load``: read the user's .pt and make sure it is a model this tool can export.

Failures here are the user's input, so each becomes one ExportInputError line that names
the file and the problem. The cheap checks (exists, is a file, looks like a torch archive)
run before torch is even imported: ``torch.load`` of an arbitrary file fails with a
different exception type for every kind of damage, and Ultralytics would also try to
download a missing file by name.
"""

from __future__ import annotations

import logging
import shutil
import zipfile
from pathlib import Path

from streamd.manifest import sha256_file

from ._ultralytics import clean_message, quiet, yolo_class
from .stages import ExportContext, ExportInputError, register

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80   # first byte of a pickle (protocol >= 2): torch's legacy, pre-1.6 format

_TASK_WORDS = {
    "classify": "classification",
    "segment": "segmentation",
    "pose": "pose-estimation",
    "obb": "oriented-box (OBB)",
    "semantic": "semantic-segmentation",
    "depth": "depth-estimation",
}


def check_weights_file(path: Path) -> None:
    """Refuse, by looking at the bytes only, a file that cannot be a torch checkpoint."""
    if not path.exists():
        raise ExportInputError(f"{path}: no such file")
    if path.is_dir():
        raise ExportInputError(f"{path}: is a directory, expected a .pt checkpoint")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ExportInputError(f"{path}: cannot read ({exc.strerror})") from None
    if size == 0:
        raise ExportInputError(f"{path}: is empty, expected a PyTorch .pt checkpoint")
    if head == _ZIP_MAGIC:
        # torch.save writes a zip archive whose central directory is at the very end: a
        # download or copy cut short loses it first.
        if not zipfile.is_zipfile(path):
            raise ExportInputError(f"{path}: is a truncated or damaged PyTorch checkpoint "
                                   f"(its zip archive is incomplete)")
        try:
            with zipfile.ZipFile(path) as zf:
                has_pickle = any(n.endswith("data.pkl") for n in zf.namelist())
        except (zipfile.BadZipFile, OSError) as exc:
            raise ExportInputError(f"{path}: is a damaged PyTorch checkpoint ({exc})") from None
        if not has_pickle:
            raise ExportInputError(f"{path}: is a zip archive but not a PyTorch checkpoint")
        return
    if head[0] == _PICKLE_PROTO:
        return
    if path.suffix.lower() == ".onnx":
        what = "is an ONNX model, not a PyTorch checkpoint"
    elif _looks_like_text(path):
        what = "is a text file, not a PyTorch checkpoint"
    else:
        what = "is not a PyTorch checkpoint"
    raise ExportInputError(f"{path}: {what} (expected a YOLOv8 .pt saved by Ultralytics)")


def _looks_like_text(path: Path) -> bool:
    with open(path, "rb") as f:
        sample = f.read(4096)
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in sample


def describe_model_problem(yolo: object, path: Path) -> str | None:
    """Why the loaded ``yolo`` cannot be exported as a YOLOv8 detector, or None if it can."""
    task = getattr(yolo, "task", None)
    if task != "detect":
        word = _TASK_WORDS.get(str(task), f"'{task}'")
        return (f"{path}: is a YOLO {word} model (task '{task}'), not a detection model; "
                f"streamd-export exports YOLOv8 detection models")
    net = getattr(yolo, "model", None)
    layers = getattr(net, "model", None)
    try:
        head = layers[-1]  # type: ignore[index]
    except (TypeError, IndexError, KeyError):
        return f"{path}: has no layer list; not an Ultralytics YOLO detection model"
    from ultralytics.nn.modules.head import Detect
    if type(head) is not Detect:
        return (f"{path}: has a {type(head).__name__} head; streamd-export exports models with "
                f"the plain YOLOv8 Detect head")
    if getattr(head, "one2one_cv2", None) is not None:
        return (f"{path}: has an NMS-free (end-to-end) detection head (YOLOv10/YOLO26 style); "
                f"streamd-export exports YOLOv8-style heads")
    return None


@register("load", "read the .pt checkpoint and check it is a YOLOv8 detection model")
def load_stage(ctx: ExportContext) -> None:
    req = ctx.request
    path = req.weights
    check_weights_file(path)

    # Ultralytics exports beside the checkpoint it loaded: give it a private copy so nothing
    # is ever written next to the user's file (which may also sit in a read-only folder).
    ctx.work_weights = ctx.workdir / "weights" / "model.pt"
    ctx.work_weights.parent.mkdir()
    shutil.copyfile(path, ctx.work_weights)
    sha = sha256_file(ctx.work_weights)

    YOLO = yolo_class()
    with quiet(req.verbose, logging.CRITICAL):
        try:
            yolo = YOLO(str(ctx.work_weights))
        except Exception as exc:  # torch/pickle/Ultralytics raise many types for bad files
            reason = clean_message(exc, {str(ctx.work_weights): path.name})
            raise ExportInputError(f"{path}: cannot be loaded as an Ultralytics YOLO checkpoint "
                                   f"({reason})") from None
    problem = describe_model_problem(yolo, path)
    if problem:
        raise ExportInputError(problem)

    names = {int(k): str(v) for k, v in dict(yolo.names).items()}
    if not names:
        raise ExportInputError(f"{path}: the checkpoint has no class names")
    strides = tuple(int(s) for s in yolo.model.stride.tolist())
    stride = max(strides)
    h, w = req.imgsz
    if h % stride or w % stride:
        def up(v: int) -> int:
            return -(-v // stride) * stride
        raise ExportInputError(f"--imgsz {h} {w}: each side must be a multiple of the model's "
                               f"stride {stride} (e.g. --imgsz {up(h)} {up(w)})")

    ctx.yolo = yolo
    ctx.class_names = names
    ctx.strides = strides
    ctx.source = {"weights": path.name, "sha256": sha, "size_bytes": path.stat().st_size,
                  "task": "detect", "head": "Detect"}
