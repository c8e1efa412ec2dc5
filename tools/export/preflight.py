"""Stage ``preflight``: refuse, in milliseconds, what would otherwise fail after the export.

Loading and exporting take seconds to minutes; an unwritable output folder or an opset the
exporter cannot produce should not be discovered only at the end.
"""

from __future__ import annotations

import os
from pathlib import Path

from .onnx_stage import check_opset
from .stages import ExportContext, ExportInputError, register


def check_out_dir(out_dir: Path) -> None:
    """``out_dir`` must be a writable folder, or creatable inside one."""
    probe = out_dir
    while not probe.exists():
        parent = probe.parent
        if parent == probe:
            break
        probe = parent
    if probe.exists() and not probe.is_dir():
        raise ExportInputError(f"--out-dir {out_dir}: {probe} is not a folder")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise ExportInputError(f"--out-dir {out_dir}: {probe} is not writable")


@register("preflight", "check the options and the output folder before any heavy work")
def preflight_stage(ctx: ExportContext) -> None:
    req = ctx.request
    check_opset(req.opset, req.nms)
    check_out_dir(req.out_dir)
