"""File digests: the one SHA-256 of a file used by downloads, release conversion and the cache."""

from __future__ import annotations

import hashlib
import os

__all__ = ["sha256_file"]


def sha256_file(path: str | os.PathLike, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk_bytes`` chunks (constant memory).

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from qdetr.zoo.hashing import sha256_file
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = (Path(tmp) / "empty.bin").write_bytes(b"")
        ...     sha256_file(Path(tmp) / "empty.bin")[:16]
        'e3b0c44298fc1c14'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
