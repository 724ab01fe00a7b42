"""The single on-disk cache of :mod:`qdetr.zoo` and the offline switch.

Everything the zoo downloads or converts lives under one directory:

* ``$QDETR_CACHE`` when set, otherwise ``~/.cache/qdetr``;
* ``<cache>/downloads/<subdir>/<file>`` holds verified downloads, each with a
  ``<file>.meta.json`` sidecar (URL, size, SHA-256);
* ``<cache>/converted/<name>/`` holds release checkpoints converted to the packed
  ``qdetr`` format, so later loads skip pickle entirely.

Offline mode (no network access at all) is on when ``QDETR_OFFLINE`` or
``HF_HUB_OFFLINE`` is set to a true value (``1``, ``true``, ``yes``, ``on``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qdetr.atomic_write import atomic_path
from qdetr.errors import OfflineModeError

__all__ = [
    "OfflineModeError",
    "default_cache_dir",
    "is_offline",
    "write_json_atomic",
    "read_json",
]

_TRUE_VALUES = {"1", "true", "yes", "on", "y", "t"}


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the qdetr cache directory.

    Args:
        cache_dir: explicit directory; wins over the environment.

    Returns:
        ``cache_dir`` if given, else ``$QDETR_CACHE``, else ``~/.cache/qdetr``
        (expanded, not created).

    Examples:
        >>> import os
        >>> from unittest import mock
        >>> from qdetr.zoo import default_cache_dir
        >>> default_cache_dir("/data/qdetr-cache").as_posix()
        '/data/qdetr-cache'
        >>> with mock.patch.dict(os.environ, {"QDETR_CACHE": "/scratch/qdetr"}):
        ...     default_cache_dir().as_posix()
        '/scratch/qdetr'
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("QDETR_CACHE")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/qdetr").expanduser()


def is_offline() -> bool:
    """Whether ``QDETR_OFFLINE`` or ``HF_HUB_OFFLINE`` asks for no network access.

    Returns:
        True when either variable holds a true value (``1``, ``true``, ``yes``, ``on``).

    Examples:
        >>> import os
        >>> from unittest import mock
        >>> from qdetr.zoo import is_offline
        >>> with mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1"}):
        ...     is_offline()
        True
        >>> with mock.patch.dict(os.environ, {"QDETR_OFFLINE": "0", "HF_HUB_OFFLINE": "0"}):
        ...     is_offline()
        False
    """
    for var in ("QDETR_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE_VALUES:
            return True
    return False


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and ``os.replace``.

    A reader never sees a half-written file: it sees the old content or the new one.
    """
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: Path) -> dict[str, Any] | None:
    """Read a JSON object from ``path``; ``None`` if it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
