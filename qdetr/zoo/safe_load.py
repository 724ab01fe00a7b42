"""Safe loading of pickled ``.pth`` checkpoints.

Release checkpoints are pickles. Unpickling runs arbitrary code, so every file is read
with ``torch.load(weights_only=True)``: only tensors, containers and primitive values are
rebuilt. The one extra type that training checkpoints legitimately contain is the
``argparse.Namespace`` of the training options (``ckpt["args"]``); it is allowed
explicitly. A file that needs any other global is refused, naming that global.

``weights_only=False`` is never used.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from qdetr.errors import CheckpointError, UnsafeCheckpointError

__all__ = ["ALLOWED_CHECKPOINT_GLOBALS", "UnsafeCheckpointError", "load_checkpoint_file"]

#: Globals that checkpoint files may reference besides tensors and builtin containers.
ALLOWED_CHECKPOINT_GLOBALS: tuple[type, ...] = (argparse.Namespace,)


def load_checkpoint_file(path: str | os.PathLike) -> Any:
    """Load a ``.pth`` checkpoint without executing code from it.

    Args:
        path: a file written by ``torch.save``.

    Returns:
        The stored object (for training checkpoints a dict such as
        ``{"model", "optimizer", "lr_scheduler", "epoch", "args"}``), with every tensor on CPU.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: the file references a global that is not allowed (the
            message names it); nothing from the file was executed.
        CheckpointError: the file is empty, truncated or not a PyTorch checkpoint (the message
            says to delete it and fetch it again).

    Examples:
        >>> import argparse, tempfile, torch
        >>> from pathlib import Path
        >>> from qdetr.zoo import load_checkpoint_file
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = Path(tmp) / "ckpt.pth"
        ...     torch.save({"model": {"weight": torch.zeros(2, 3)}, "args": argparse.Namespace(n_bit=4)}, path)
        ...     checkpoint = load_checkpoint_file(path)
        >>> state_dict = checkpoint["model"]
        >>> sorted(checkpoint), state_dict["weight"].shape, checkpoint["args"].n_bit
        (['args', 'model'], torch.Size([2, 3]), 4)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted download or save; delete it and "
                              "download or save it again")
    try:
        with torch.serialization.safe_globals(list(ALLOWED_CHECKPOINT_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        name = _refused_global(str(err))
        if name is None and "global" not in str(err).lower():
            raise _damaged(path, size, err) from None
        what = f"the global {name!r}" if name else "an object that is not a tensor, container or argparse.Namespace"
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it needs {what}, which is outside the allow-list "
            f"(tensors, builtin containers, argparse.Namespace). Loading it would run code from the file. "
            f"If you trust its origin, re-save its state dict with plain tensors and load that file."
        ) from None
    except (EOFError, RuntimeError, ValueError, OSError, KeyError, IndexError, TypeError, AttributeError) as err:
        if isinstance(err, OSError) and not isinstance(err, EOFError) and not path.is_file():
            raise
        raise _damaged(path, size, err) from None


def _damaged(path: Path, size: int, err: BaseException) -> CheckpointError:
    """The error for a file that torch cannot parse (truncated, not a checkpoint, damaged)."""
    text = str(err).splitlines()[0] if str(err) else ""
    # torch's own texts may advise weights_only=False, which would run code from the file: never echo them.
    detail = type(err).__name__ if not text or "weights_only" in text else f"{type(err).__name__}: {text.split('. ')[0][:160]}"
    return CheckpointError(
        f"{path} ({size:,} bytes) is not a readable PyTorch checkpoint: it is truncated, damaged or not a "
        f"checkpoint ({detail}). Delete it and download or save it again."
    )


def _refused_global(message: str) -> str | None:
    """Extract the refused global's dotted name from torch's weights-only error message."""
    for pattern in (r"Unsupported global: GLOBAL ([\w.]+)", r"GLOBAL ([\w.]+)", r"global[^\w]+([\w.]+\.[\w]+)"):
        match = re.search(pattern, message)
        if match:
            return match.group(1)
    return None
