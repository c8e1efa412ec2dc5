"""Import Ultralytics the way the export tool wants it: offline, no auto-install, quiet.

Ultralytics reads these switches from the environment once, at import; they are set here
(unless the user set them) so an export never reaches the network or pip-installs into the
user's environment behind their back. Its logger is turned down while it works, so the
tool's own summary or one-line error is what the user reads; ``--verbose`` shows it all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

_ENV_DEFAULTS = {
    "YOLO_OFFLINE": "1",         # no DNS probe at import, no downloads of missing weights
    "YOLO_AUTOINSTALL": "false",  # a missing requirement is an error, not a pip install
}


def yolo_class() -> Any:
    """Return ``ultralytics.YOLO`` (imported lazily: ``streamd-export --help`` stays fast)."""
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from ultralytics import YOLO
    return YOLO


@contextlib.contextmanager
def quiet(verbose: bool, level: int = logging.WARNING) -> Iterator[None]:
    """Lower Ultralytics' logger to ``level`` and mute Python warnings, unless ``verbose``."""
    if verbose:
        yield
        return
    logger = logging.getLogger("ultralytics")
    old = logger.level
    logger.setLevel(level)
    try:
        with warnings.catch_warnings():
            # torch's tracer warns about Python control flow in the head; it is expected
            # for these models and says nothing actionable to the user.
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(old)


def clean_message(exc: BaseException, replace: dict[str, str] | None = None) -> str:
    """First meaningful line of an exception, without Ultralytics' decorations."""
    text = str(exc).strip()
    for old, new in (replace or {}).items():
        text = text.replace(old, new)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else type(exc).__name__
    for prefix in ("ERROR ❌️", "ERROR ❌", "ERROR"):
        if first.startswith(prefix):
            first = first[len(prefix):].strip()
            break
    # Ultralytics follows its diagnosis with advice about its own CLI; keep the diagnosis.
    first = first.split(". ", 1)[0].rstrip(".")
    return first[:400]
