"""Resuming a run must not silently change its meaning.

A checkpoint records the :class:`~qdetr.engine.TrainConfig` it was trained with. When a run
resumes, the new configuration is compared with the recorded one field by field:

* fields that only say how long or how verbosely to run, or where (:data:`RESUME_SAFE_FIELDS`:
  ``epochs``, ``max_steps``, ``device``, logging and evaluation cadence, worker counts, the
  validation set) may change; the changes are returned so the trainer logs them;
* any other change (learning rate, batch size, model, bit width, distillation, training data,
  seed, ...) is refused with a :class:`~qdetr.errors.ResumeMismatchError` naming every changed
  field with its old and new value, *before* the run's ``config.json`` is rewritten.

The number of training images is compared too, so a folder whose content changed is caught.

Examples:
    >>> from qdetr.engine.resume_check import check_resume_config
    >>> saved = {"epochs": 1, "optim": {"lr": 1e-4}, "data": {"batch_size": 2}}
    >>> check_resume_config(saved, {"epochs": 3, "optim": {"lr": 1e-4}, "data": {"batch_size": 2}}, source="run")
    [('epochs', 1, 3)]
    >>> try:
    ...     check_resume_config(saved, {"epochs": 1, "optim": {"lr": 1e-3}, "data": {"batch_size": 4}}, source="run")
    ... except ValueError as err:
    ...     print(type(err).__name__, "data.batch_size: 2 -> 4" in str(err), "optim.lr" in str(err))
    ResumeMismatchError True True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qdetr.errors import ResumeMismatchError

__all__ = ["RESUME_SAFE_FIELDS", "config_differences", "check_resume_config"]

#: Leaf field names that may change when a run resumes (they do not change what is learned).
RESUME_SAFE_FIELDS = frozenset({
    "output_dir", "epochs", "max_steps", "device", "resume", "progress", "log_every", "eval_every",
    "checkpoint_every_steps", "final_eval", "num_workers", "eval_batch_size", "val_images", "val_ann",
    "max_val_images", "synthetic_val_images", "kernels",
})
_MISSING = object()


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    if isinstance(data, (list, tuple)):
        data = list(data)
    return {prefix[:-1]: data}


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """Every dotted field whose value differs, as ``(field, saved value, current value)``.

    A field present on one side only is reported with ``"<absent>"`` on the other.

    Examples:
        >>> config_differences({"a": {"b": 1, "c": [1, 2]}}, {"a": {"b": 2, "c": (1, 2)}})
        [('a.b', 1, 2)]
    """
    old, new = _flatten(saved), _flatten(current)
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if a != b:
            out.append((key, "<absent>" if a is _MISSING else a, "<absent>" if b is _MISSING else b))
    return out


def check_resume_config(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    source: str,
    saved_train_images: int | None = None,
    current_train_images: int | None = None,
) -> list[tuple[str, Any, Any]]:
    """Refuse a resume that changes the run's meaning; return the harmless changes (to be logged).

    Args:
        saved: the configuration dict recorded in the checkpoint.
        current: the configuration dict of the run being resumed.
        source: the checkpoint, named in the message.
        saved_train_images, current_train_images: training set sizes, when known.

    Returns:
        The changed fields in :data:`RESUME_SAFE_FIELDS`, as ``(field, old, new)``.

    Raises:
        ResumeMismatchError: any other field changed, or the training set size changed; the
            message lists each change and the two ways out.
    """
    changes = config_differences(saved, current)
    refused = [c for c in changes if c[0].rsplit(".", 1)[-1] not in RESUME_SAFE_FIELDS]
    listing = [f"{key}: {old!r} -> {new!r}" for key, old, new in refused]
    if saved_train_images is not None and current_train_images is not None and saved_train_images != current_train_images:
        listing.append(f"training images: {saved_train_images} -> {current_train_images}")
    if listing:
        raise ResumeMismatchError(
            f"cannot resume {source}: the run was trained with other settings, and resuming would silently mix "
            f"them. Changed: {'; '.join(listing[:12])}{' ...' if len(listing) > 12 else ''}. Use a new output "
            "folder, restore the old settings, or start this folder over (--no-resume / resume: false)"
        )
    return [c for c in changes if c not in refused]
