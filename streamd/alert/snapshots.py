"""Annotated JPEG per alert: every detection drawn, the matching ones and the zone highlighted."""

from __future__ import annotations

import re
import time
from pathlib import Path

import cv2
import numpy as np

from ..annotate import draw
from ..config import CAMERA_ID
from .engine import Event

# Class colours are saturated hues (annotate._colour), so white never looks like a class.
HIGHLIGHT = (255, 255, 255)   # a halo around the boxes that made the rule fire
ZONE = (0, 255, 255)          # BGR yellow


def _safe(name: str) -> str:
    """A file-name-safe form of a rule name or camera id (they come from config and wire)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "_"


def snapshot_path(folder: Path, camera: str, ts: float, rule: str) -> Path:
    """``folder/<camera>/<UTC time>-<rule>.jpg``; a camera id that is not a valid id (a
    foreign publisher could send anything) is made safe so it cannot leave ``folder``."""
    cam = camera if CAMERA_ID.match(camera) and camera not in (".", "..") else _safe(camera)
    ms = int(round((ts % 1) * 1000)) % 1000
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ts)) + f".{ms:03d}Z"
    return folder / cam / f"{stamp}-{_safe(rule)}.jpg"


def save_alert_snapshot(event: Event, folder: Path) -> Path | None:
    """Write the alert's frame (the detections message's JPEG) with boxes drawn; returns the
    path, or None when the message carried no snapshot or it does not decode."""
    body = event.body
    if body is None or event.rule is None or not isinstance(body.get("_snapshot"), bytes):
        return None
    img = cv2.imdecode(np.frombuffer(body["_snapshot"], np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        return None
    rule, camera = event.rule, str(body["camera"])
    title = f"{rule.name} @ {camera} frame {body.get('frame')}: {len(event.matches)} matching"
    out = draw(img, body["detections"], title)
    thick = max(2, round(min(out.shape[:2]) / 150))
    if rule.zone:
        pts = np.round(np.array(rule.zone, dtype=np.float64)).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(out, [pts], True, ZONE, max(1, thick // 2), cv2.LINE_AA)
    for d in event.matches:
        x1, y1, x2, y2 = (int(round(v)) for v in d["box"])
        # Outside the class-coloured box, so both the class colour and the highlight show.
        cv2.rectangle(out, (x1 - thick, y1 - thick), (x2 + thick, y2 + thick), HIGHLIGHT, thick)
    path = snapshot_path(folder, camera, float(event.data["time"]), rule.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 2
    while path.exists():   # two alerts of one rule in the same millisecond: keep both
        path = path.with_name(f"{path.stem.rsplit('~', 1)[0]}~{n}.jpg")
        n += 1
    tmp = path.with_name(path.name + ".tmp.jpg")
    if not cv2.imwrite(str(tmp), out):
        return None
    tmp.replace(path)   # whoever follows the path from the alert never sees half a picture
    return path

