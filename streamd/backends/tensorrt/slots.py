"""The host side of running one engine: the pinned host and device buffers of each in-flight
slot, the batch written into a slot's input buffer at the shape the engine runs, and the shape
each output is read back at.

The runtime (``runtime``) owns the slots and the CUDA stream; what it writes and reads is
decided here. Only the CUDA binding's allocation calls (``pagelocked_empty``, ``mem_alloc``,
``Event``, ``free``) are made on the binding given, so the rest runs, and is tested, on plain
numpy arrays on a machine without a GPU. This module never imports tensorrt or a CUDA binding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...manifest import PAD_VALUE, InputContract
from .profiles import BufferSpec, TensorSpec, check_runtime_shape, resolve_shape


@dataclass
class Slot:
    host_in: np.ndarray
    host_out: dict[str, np.ndarray]
    dev_in: Any
    dev_out: dict[str, Any]
    done: Any                        # cuda.Event recorded after the copy-out
    busy: bool = False
    ticket: int = 0


@dataclass(frozen=True)
class InferHandle:
    slot: int
    ticket: int
    n: int                           # frames asked for (rows returned)
    run: int                         # batch executed (>= n when padded)
    out_shape: tuple[int, ...] = ()  # the primary output's shape for this run


def leading(buffer: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The first elements of a (pinned) buffer viewed as one contiguous array of ``shape``;
    no copy, so the view is pinned memory too."""
    size = int(np.prod(shape))
    return buffer.reshape(-1)[:size].reshape(shape)


def allocate_slot(cuda: Any, buffers: list[BufferSpec]) -> Slot:
    """One slot's buffers: pinned host memory and device memory for every I/O tensor, sized as
    ``buffers`` says (the largest batch and input), and the event its copy-out records."""
    host_out: dict[str, np.ndarray] = {}
    dev_out: dict[str, Any] = {}
    host_in = dev_in = None
    for b in buffers:
        host = cuda.pagelocked_empty(b.shape, b.dtype)
        dev = cuda.mem_alloc(max(b.nbytes, 1))
        if b.is_input:
            host_in, dev_in = host, dev
        else:
            host_out[b.name], dev_out[b.name] = host, dev
    return Slot(host_in, host_out, dev_in, dev_out, cuda.Event())  # type: ignore[arg-type]


def free_slot(slot: Slot) -> None:
    """Free a slot's device memory and its event (with the GPU's context current)."""
    for mem in (slot.dev_in, *slot.dev_out.values()):
        mem.free()
    if hasattr(slot.done, "destroy"):      # cuda-python's events are freed by hand
        slot.done.destroy()


def stage_batch(host: np.ndarray, batch: np.ndarray, contract: InputContract,
                shape: tuple[int, ...]) -> np.ndarray:
    """Write ``batch`` (its frames at their own H x W) into the pinned input buffer ``host`` as
    the one contiguous array of ``shape`` (run, 3, H, W), or (run, H, W, 3) for a uint8 input,
    that TensorRT reads; returns that view.

    The buffer holds the largest input, and a smaller one uses its first bytes. Frames smaller
    than ``shape``'s H x W (below the engine's smallest H x W) get grey at the bottom and
    right, like the letterbox's own padding; rows beyond the frames (a batch padded up to the
    profile's minimum) are zero."""
    host_in = leading(host, shape)
    n = int(batch.shape[0])
    h, w = contract.hw(batch.shape)
    if contract.hw(shape) != (h, w):
        host_in[:n].fill(PAD_VALUE if contract.raw else PAD_VALUE / 255.0)
    region = host_in[:n, :h, :w] if contract.raw else host_in[:n, :, :h, :w]
    np.copyto(region, batch, casting="same_kind")
    if shape[0] > n:
        host_in[n:shape[0]].fill(0)
    return host_in


def output_shape(spec: TensorSpec, got: tuple[int, ...], run: int, *, any_hw: bool) -> tuple[int, ...]:
    """The shape to read output ``spec`` at, from the shape TensorRT reports for a batch of
    ``run`` (``got``): checked against the engine's declared shape, whose anchor axis follows
    the input's H x W in an engine that takes any H x W. ValueError when they disagree."""
    if any_hw:
        return check_runtime_shape(spec.shape, got, run, name=spec.name)
    want = resolve_shape(spec.shape, run, name=spec.name)
    if got != want:
        raise ValueError(f"output {spec.name!r} has shape {got} for a batch of {run}, expected {want}")
    return got
