"""Deprecated: model files moved to :mod:`qdetr.zoo` (the zoo owns every file on disk).

* a run's final model is now a ``save_pretrained`` directory, ``<run>/model``; load any
  model with :func:`qdetr.zoo.resolve_model` (run folder, ``model_final.pt``,
  ``checkpoint.pt``, ``save_pretrained`` folder, release ``.pth``, zoo name, Hub id);
* :func:`read_state_dict` and :func:`load_state_dict_checked` live in
  :mod:`qdetr.zoo.run_files`;
* the qdetr 0.1 ``model_final.pt`` is read by
  :func:`qdetr.zoo.run_files.load_legacy_model_file`.

The names below stay importable for one release and warn with a ``DeprecationWarning``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdetr.zoo.run_files import LEGACY_MODEL_FORMAT, load_state_dict_checked, read_state_dict

__all__ = [
    "MODEL_FILE_FORMAT",
    "build_model",
    "apply_quantization",
    "read_state_dict",
    "load_state_dict_checked",
    "save_model_file",
    "load_model_file",
]

MODEL_FILE_FORMAT = LEGACY_MODEL_FORMAT


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"qdetr.engine.model_files.{old} is deprecated; use {new}", DeprecationWarning, stacklevel=3)


def build_model(name: str, num_classes: int, overrides: dict | None = None) -> nn.Module:
    """Deprecated: ``qdetr.models.create_model(name, num_classes=num_classes, **overrides)``.

    Examples:
        >>> from qdetr.models import create_model
        >>> create_model("detr_tiny", num_classes=5, hidden_dim=32).config.hidden_dim
        32
    """
    from qdetr.models import create_model

    _deprecated("build_model", "qdetr.models.create_model(name, num_classes=..., **overrides)")
    return create_model(name, num_classes=num_classes, **dict(overrides or {}))


def apply_quantization(model: nn.Module, quant: dict | Any | None, alignment: bool) -> nn.Module:
    """Deprecated: ``quantize_model(model, config=...)`` then
    ``insert_distribution_alignment(model, where="cross")`` (what this function always did).

    Examples:
        >>> from qdetr.models import create_model
        >>> from qdetr.quant import QuantConfig, quantize_model
        >>> model = quantize_model(create_model("detr_tiny"), config=QuantConfig(bits=4))
        >>> any(key.endswith("weight_quantizer.scale") for key in model.state_dict())
        True
    """
    _deprecated("apply_quantization", "qdetr.quant.quantize_model and qdetr.distill.insert_distribution_alignment")
    if quant is not None:
        from qdetr.quant import QuantConfig, quantize_model

        quantize_model(model, config=quant if isinstance(quant, QuantConfig) else QuantConfig.from_dict(quant))
    if alignment:
        from qdetr.distill import insert_distribution_alignment

        insert_distribution_alignment(model, where="cross")
    return model


def save_model_file(
    path: str | Path,
    model: nn.Module,
    *,
    model_name: str,
    model_config: dict,
    num_classes: int,
    quant: dict | None,
    alignment: bool,
    categories: dict[int, str],
    preprocessing: dict | None = None,
) -> Path:
    """Deprecated: writes a qdetr 0.1 ``model_final.pt``; save models with ``model.save_pretrained(dir)``.

    Examples:
        >>> import tempfile
        >>> from qdetr.models import create_model
        >>> from qdetr.zoo import resolve_model
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = create_model("detr_tiny").save_pretrained(tmp)
        ...     resolve_model(tmp).training
        False
    """
    from qdetr.engine.checkpoint import save_checkpoint_atomic

    _deprecated("save_model_file", "model.save_pretrained(directory)")
    state = {
        "format": MODEL_FILE_FORMAT,
        "version": 1,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_name": model_name,
        "model_config": dict(model_config),
        "num_classes": int(num_classes),
        "quant": quant,
        "alignment": bool(alignment),
        "categories": {int(k): str(v) for k, v in categories.items()},
        "preprocessing": dict(preprocessing or {}),
    }
    return save_checkpoint_atomic(state, path)


def load_model_file(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Deprecated: ``qdetr.zoo.resolve_model(path)`` (the model carries ``id2label`` and its
    ``config.json`` dict, including ``preprocessing``).

    Returns:
        ``(model in eval mode, metadata dict without the weights)``.

    Examples:
        >>> from qdetr.zoo import resolve_model
        >>> resolve_model("missing.pt")
        Traceback (most recent call last):
        ...
        qdetr.errors.ConfigError: 'missing.pt' is not a zoo name (see qdetr.list_pretrained()), an existing run folder, model folder or file, or a Hugging Face Hub repo id ('org/name')
    """
    from qdetr.zoo.run_files import load_legacy_model_file
    from qdetr.zoo.safe_load import load_checkpoint_file

    _deprecated("load_model_file", "qdetr.zoo.resolve_model")
    model = load_legacy_model_file(path, map_location=map_location)
    meta = {k: v for k, v in load_checkpoint_file(Path(path)).items() if k != "model"}
    return model, meta
