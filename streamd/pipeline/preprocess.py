"""Letterbox frames into one preallocated network batch.

Matches Ultralytics' ``LetterBox(auto=False)``: scale to fit, keep aspect, pad with grey
114 centred, BGR -> RGB, HWC -> CHW, /255. The batch buffers are allocated once per
scheduler and reused, so a 1080p frame costs one resize and one copy, not a fresh array.

A model exported with ``--input uint8`` does the last three steps in its own first layers:
its batch is the uint8 (n, H, W, 3) BGR staging buffer itself, handed over as a view, with no
float tensor allocated or written (a quarter of the bytes, and one pass over them fewer).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

# Defined with the model's input contract; still importable from here for letterbox users.
from ..manifest import FLOAT_INPUT, PAD_VALUE, InputContract


@dataclass(frozen=True, slots=True)
class Letterbox:
    """How one frame was placed into the network input; inverts boxes back to pixels."""

    gain: float
    pad_x: int
    pad_y: int
    width: int      # original frame size
    height: int
    # The camera's own size when the frame was scaled down by its decoder (0: not scaled):
    # boxes then go on from frame pixels to these.
    source_w: int = 0
    source_h: int = 0

    @property
    def resized(self) -> tuple[int, int]:
        """(width, height) the frame was resized to inside the network input."""
        return _resized_size(self.width, self.height, self.gain)

    def boxes_to_frame(self, boxes: np.ndarray) -> np.ndarray:
        """Map (N, 4) xyxy boxes from network input pixels to frame pixels, clipped."""
        out = boxes.astype(np.float32, copy=True)
        out[:, [0, 2]] -= self.pad_x
        out[:, [1, 3]] -= self.pad_y
        # The frame was resized to whole pixels, so the true scale differs slightly per axis
        # from ``gain``; divide by the scale actually applied, as Ultralytics' scale_boxes does.
        new_w, new_h = self.resized
        out[:, [0, 2]] /= new_w / self.width
        out[:, [1, 3]] /= new_h / self.height
        width, height = self.width, self.height
        if self.source_w and (self.source_w, self.source_h) != (width, height):
            out[:, [0, 2]] *= self.source_w / width
            out[:, [1, 3]] *= self.source_h / height
            width, height = self.source_w, self.source_h
        # Assign, not ``np.clip(..., out=out[:, [0, 2]])``: fancy indexing makes a copy, and
        # clipping into that copy would leave the boxes unclipped.
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
        return out


def _resized_size(width: int, height: int, gain: float) -> tuple[int, int]:
    # At least one pixel: a very thin frame must not round to an empty resize.
    return max(int(round(width * gain)), 1), max(int(round(height * gain)), 1)


def net_shape_for(width: int, height: int, imgsz: tuple[int, int], stride: int = 32) -> tuple[int, int]:
    """(net_h, net_w) a frame is inferred at when the model takes any H x W: the frame scaled
    to fit ``imgsz`` and padded only up to the next multiple of ``stride``, as Ultralytics'
    default ``predict`` does (``LetterBox(auto=True)``). A 16:9 camera at 640 becomes 640x384
    instead of 640x640: 40% fewer pixels, and the same boxes Ultralytics itself reports."""
    max_h, max_w = imgsz
    gain = min(max_h / height, max_w / width)
    new_w, new_h = _resized_size(width, height, gain)
    return new_h + (max_h - new_h) % stride, new_w + (max_w - new_w) % stride


def letterbox_geometry(width: int, height: int, net_h: int, net_w: int,
                       gain: float | None = None) -> tuple[Letterbox, int, int]:
    """Return the placement and the resized (w, h), with Ultralytics' rounding. ``gain``
    defaults to the largest that fits; a stride-padded input passes the gain it was sized
    for (see ``net_shape_for``) so the picture is not scaled into the padding."""
    if gain is None:
        gain = min(net_h / height, net_w / width)
    new_w, new_h = _resized_size(width, height, gain)
    dw, dh = (net_w - new_w) / 2, (net_h - new_h) / 2
    # Ultralytics rounds (d - 0.1) for the top/left pad; keep it so boxes match exactly.
    left, top = int(round(dw - 0.1)), int(round(dh - 0.1))
    return Letterbox(gain, left, top, width, height), new_w, new_h


class BatchBuffer:
    """A reusable uint8 (max_batch, H, W, 3) BGR staging area plus, for a model that takes
    floats, its (max_batch, 3, H, W) input tensor."""

    def __init__(self, max_batch: int, net_h: int, net_w: int, dtype: np.dtype = np.float32,
                 fit: tuple[int, int] | None = None, contract: InputContract = FLOAT_INPUT) -> None:
        self.net_h, self.net_w = net_h, net_w
        # The box frames are scaled to fit: the input itself, or for a stride-padded input
        # of a model that takes any H x W, the model's full size (see ``net_shape_for``).
        self.fit_h, self.fit_w = fit or (net_h, net_w)
        self.contract = contract
        self._u8 = np.full((max_batch, net_h, net_w, 3), PAD_VALUE, np.uint8)
        # A uint8-input model takes the staging area itself: no float tensor at all.
        self.tensor: np.ndarray | None = (None if contract.raw else
                                          np.empty((max_batch, 3, net_h, net_w), dtype))

    @property
    def max_batch(self) -> int:
        return self._u8.shape[0]

    def fill(self, images: list[np.ndarray], source_sizes: list[tuple[int, int] | None] | None = None
             ) -> tuple[np.ndarray, list[Letterbox]]:
        """Letterbox ``images`` (BGR uint8) into the buffer; return the batch view and boxes.
        ``source_sizes``: per image, the camera's own (w, h) where its decoder scaled it down."""
        n = len(images)
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"batch of {n} images does not fit a buffer of {self.max_batch}")
        boxes: list[Letterbox] = []
        for i, img in enumerate(images):
            h, w = img.shape[:2]
            lb, new_w, new_h = letterbox_geometry(w, h, self.net_h, self.net_w,
                                                  min(self.fit_h / h, self.fit_w / w))
            src = source_sizes[i] if source_sizes else None
            if src is not None:
                lb = replace(lb, source_w=src[0], source_h=src[1])
            slot = self._u8[i]
            if (new_w, new_h) != (w, h):
                img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
            # Re-grey only the pad bands: the previous frame in this slot may have had
            # another size.
            slot[: lb.pad_y].fill(PAD_VALUE)
            slot[lb.pad_y + new_h:].fill(PAD_VALUE)
            slot[lb.pad_y: lb.pad_y + new_h, : lb.pad_x].fill(PAD_VALUE)
            slot[lb.pad_y: lb.pad_y + new_h, lb.pad_x + new_w:].fill(PAD_VALUE)
            slot[lb.pad_y: lb.pad_y + new_h, lb.pad_x: lb.pad_x + new_w] = img
            boxes.append(lb)
        if self.tensor is None:
            # The model's graph reorders and scales (``--input uint8``): hand it the bytes.
            return self._u8[:n], boxes
        # One vectorised pass for the whole batch: BGR->RGB, HWC->CHW, scale to [0, 1].
        src = self._u8[:n, :, :, ::-1].transpose(0, 3, 1, 2)
        out = self.tensor[:n]
        np.multiply(src, np.float32(1.0 / 255.0), out=out, casting="unsafe")
        return out, boxes


def letterbox_batch(images: list[np.ndarray], net_h: int, net_w: int,
                    contract: InputContract = FLOAT_INPUT) -> tuple[np.ndarray, list[Letterbox]]:
    """One-off convenience (tools, tests): allocate a buffer and fill it."""
    buf = BatchBuffer(len(images), net_h, net_w, contract=contract)
    tensor, boxes = buf.fill(images)
    return tensor.copy(), boxes
