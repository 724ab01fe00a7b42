"""Atomic file writes: write to a temporary file beside the target, then ``os.replace``.

A reader (or a later run) sees either the old file or the complete new one, never a
half-written file: a process killed while writing leaves only a hidden ``.tmp`` file
that is removed on the next failure path or ignored.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is synced and renamed to ``path``.

    Args:
        path: the final file; its directory is created if missing.

    Yields:
        The temporary file's path (already created, empty) to write to.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> with tempfile.TemporaryDirectory() as d:
        ...     with atomic_path(Path(d) / "a.txt") as tmp:
        ...         _ = tmp.write_text("hello")
        ...     print(sorted(p.name for p in Path(d).iterdir()), (Path(d) / "a.txt").read_text())
        ['a.txt'] hello
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
