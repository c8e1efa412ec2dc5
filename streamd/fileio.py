"""Files written whole or not at all: a reader (a daemon loading a model, a second export)
never sees half of one.

The data goes to a temporary file in the target's folder, which is then renamed over the
target (a rename within one filesystem is atomic). The standard library does this in a few
lines; the packages that wrapped it are no longer maintained.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """A file object whose contents replace ``path`` when the block ends without an error;
    on an error ``path`` is left as it was and the temporary file is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        # mkstemp makes the file owner-only; the daemon often runs as another user than
        # the one who exported the model, and must be able to read it.
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: str | os.PathLike[str], data: bytes | memoryview | str) -> None:
    """Write ``data`` (text or bytes) to ``path`` atomically."""
    with atomic_writer(path, "w" if isinstance(data, str) else "wb") as f:
        f.write(data)


def copy_atomic(source: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Copy the file ``source`` to ``path`` atomically, a block at a time (models can be large)."""
    with atomic_writer(path) as dst, open(source, "rb") as src:
        shutil.copyfileobj(src, dst, 1 << 20)
