"""Atomic, exactly resumable training checkpoints.

A checkpoint holds everything needed to continue a run bit for bit: model, optimizer and
scheduler state, the RNG states of Python, NumPy and torch (CPU and CUDA), the epoch, the
step counters and the position in the epoch's data order, plus the run's config.

Files are written to a temporary file in the same folder and moved into place with
``os.replace``, so a run killed while saving leaves the previous checkpoint intact. They load
with ``torch.load(..., weights_only=True)``: every entry is a tensor or plain Python data.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qdetr.atomic_write import atomic_path

__all__ = ["save_checkpoint_atomic", "load_checkpoint", "capture_rng_state", "restore_rng_state"]


def capture_rng_state() -> dict[str, Any]:
    """RNG states of Python, NumPy and torch as tensors and plain data (weights_only-safe).

    Returns:
        ``{"python", "numpy", "torch"}`` entries (plus ``"cuda"`` when CUDA is available);
        ``numpy["keys"]`` is a (624,) int64 tensor and ``torch`` a uint8 state tensor.

    Examples:
        >>> import torch
        >>> from qdetr.engine.checkpoint import capture_rng_state, restore_rng_state
        >>> state = capture_rng_state()
        >>> first = torch.rand(2)
        >>> restore_rng_state(state)
        >>> torch.equal(torch.rand(2), first)
        True
        >>> {"python", "numpy", "torch"} <= set(state)
        True
    """
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`.

    Args:
        state: a dict returned by :func:`capture_rng_state` (possibly after a
            ``weights_only`` save and load).

    Examples:
        >>> import random
        >>> from qdetr.engine.checkpoint import capture_rng_state, restore_rng_state
        >>> state = capture_rng_state()
        >>> draws = [random.random() for _ in range(3)]
        >>> restore_rng_state(state)
        >>> [random.random() for _ in range(3)] == draws
        True
    """
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """Writes ``state`` with ``torch.save`` to a temporary file, then ``os.replace``-s it to ``path``.

    Args:
        state: tensors and plain Python data only (so it loads with ``weights_only=True``).
        path: destination file; its folder is created.

    Returns:
        ``path``.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import torch
        >>> from qdetr.engine import load_checkpoint, save_checkpoint_atomic
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = save_checkpoint_atomic({"model": {"w": torch.ones(2)}, "epoch": 3}, Path(tmp) / "checkpoint.pt")
        ...     files = sorted(p.name for p in Path(tmp).iterdir())  # no temporary file is left
        >>> path.name, files
        ('checkpoint.pt', ['checkpoint.pt'])
    """
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(state, handle)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Loads a checkpoint written by :func:`save_checkpoint_atomic` (``weights_only=True``).

    Args:
        path: the checkpoint file.
        map_location: device the tensors are loaded to.

    Returns:
        The saved dict (it has at least a ``"model"`` entry).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a qdetr training checkpoint.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import torch
        >>> from qdetr.engine import load_checkpoint, save_checkpoint_atomic
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = save_checkpoint_atomic({"model": {"w": torch.ones(2)}, "epoch": 3}, Path(tmp) / "ckpt.pt")
        ...     state = load_checkpoint(path)
        ...     _ = torch.save({"weights": torch.ones(1)}, Path(tmp) / "other.pt")
        ...     load_checkpoint(Path(tmp) / "other.pt")
        Traceback (most recent call last):
        ...
        ValueError: ... is not a qdetr training checkpoint (no 'model' entry)
        >>> weights = state["model"]
        >>> state["epoch"], weights["w"].shape
        (3, torch.Size([2]))
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # unpickling errors have many types
        raise ValueError(f"{path} is not a readable qdetr checkpoint: {error}") from error
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} is not a qdetr training checkpoint (no 'model' entry)")
    return state
