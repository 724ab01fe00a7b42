"""Building models for training and reading/writing the model files of training runs.

A *model file* (``model_final.pt``, written by the trainer) holds the weights plus what is
needed to rebuild the module before loading them:

=================  ==========================================================
key                content
=================  ==========================================================
``format``         ``"qdetr-train-model"``
``version``        1
``model``          state dict
``model_name``     registry name (``qdetr.models.create_model``)
``model_config``   builder overrides
``num_classes``    DETR num_classes (largest category id + 1)
``quant``          ``QuantConfig.to_dict()`` or None (float)
``alignment``      whether distribution alignment modules are present
``categories``     {category id: name} of the training set
``preprocessing``  evaluation sizes: {"eval_size", "max_size", "mean", "std"}
=================  ==========================================================

Weights are always loaded with ``strict=True`` after checking the key sets, so a file of
another architecture fails with a message that lists what differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "MODEL_FILE_FORMAT",
    "build_model",
    "apply_quantization",
    "read_state_dict",
    "load_state_dict_checked",
    "save_model_file",
    "load_model_file",
]

MODEL_FILE_FORMAT = "qdetr-train-model"


def build_model(name: str, num_classes: int, overrides: dict | None = None) -> nn.Module:
    """``qdetr.models.create_model(name, num_classes=num_classes, **overrides)``.

    Args:
        name: registry name, e.g. ``"detr_tiny"``.
        num_classes: DETR ``num_classes`` (largest category id + 1).
        overrides: builder keyword arguments (e.g. ``{"hidden_dim": 32}``).

    Returns:
        The float detector; ``model(pixel_values (B, 3, H, W), pixel_mask (B, H, W))`` gives
        ``pred_logits`` (B, Q, num_classes + 1) and ``pred_boxes`` (B, Q, 4) normalised cxcywh.

    Examples:
        >>> import torch
        >>> from qdetr.engine.model_files import build_model
        >>> model = build_model("detr_tiny", num_classes=5, overrides={"hidden_dim": 32})
        >>> outputs = model(torch.rand(1, 3, 64, 64), torch.ones(1, 64, 64, dtype=torch.int64))
        >>> outputs["pred_logits"].shape, outputs["pred_boxes"].shape
        (torch.Size([1, 10, 6]), torch.Size([1, 10, 4]))
    """
    from qdetr.models import create_model

    return create_model(name, num_classes=num_classes, **dict(overrides or {}))


def apply_quantization(model: nn.Module, quant: dict | Any | None, alignment: bool) -> nn.Module:
    """Quantizes ``model`` in place with a ``QuantConfig`` (or its dict) and inserts DA if asked.

    Distribution alignment goes on the decoder cross-attention query (the paper's placement).

    Args:
        model: the float detector.
        quant: a ``QuantConfig``, its ``to_dict()``, or None to stay float.
        alignment: insert distribution alignment modules.

    Returns:
        ``model`` itself, modified in place.

    Examples:
        >>> from qdetr.engine.model_files import apply_quantization, build_model
        >>> from qdetr.quant import QuantConfig
        >>> model = apply_quantization(build_model("detr_tiny", 5), QuantConfig(bits=4), alignment=False)
        >>> any(key.endswith("weight_quantizer.scale") for key in model.state_dict())
        True
        >>> float_model = apply_quantization(build_model("detr_tiny", 5), None, alignment=False)
        >>> any(key.endswith("_quantizer.scale") for key in float_model.state_dict())
        False
    """
    if quant is not None:
        from qdetr.quant import QuantConfig, quantize_model

        config = quant if isinstance(quant, QuantConfig) else QuantConfig.from_dict(quant)
        quantize_model(model, config=config)
    if alignment:
        from qdetr.distill import insert_distribution_alignment

        insert_distribution_alignment(model, where="cross")
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads model weights from a training checkpoint, a model file, a bare state dict or a
    ``save_pretrained`` folder (``model.safetensors``).

    Args:
        path: a ``.pt``/``.pth`` file, a ``.safetensors`` file or a ``save_pretrained`` folder.

    Returns:
        The state dict (name -> tensor).

    Raises:
        FileNotFoundError: if nothing is found at ``path``.
        ValueError: if the file holds no state dict.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import torch
        >>> from qdetr.engine.model_files import build_model, read_state_dict
        >>> model = build_model("detr_tiny", 5)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     torch.save({"model": model.state_dict(), "epoch": 1}, Path(tmp) / "checkpoint.pt")
        ...     state_dict = read_state_dict(Path(tmp) / "checkpoint.pt")
        >>> state_dict.keys() == model.state_dict().keys()
        True
    """
    path = Path(path)
    if path.is_dir():
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{path} has no model.safetensors; pass a checkpoint file or a save_pretrained folder")
        from safetensors.torch import load_file

        return load_file(str(weights))
    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a model state dict (expected a dict of tensors or a 'model' entry)")
    return state


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Loads ``state_dict`` with ``strict=True`` after comparing key sets and shapes.

    Args:
        model: the module to load into.
        state_dict: name -> tensor, with the model's keys and shapes.
        source: what the weights are called in error messages (e.g. the file path).

    Raises:
        ValueError: naming missing/unexpected keys or mismatched shapes, e.g. when the file
            belongs to another architecture, another ``num_classes`` or a quantized model.

    Examples:
        >>> from qdetr.engine.model_files import build_model, load_state_dict_checked
        >>> load_state_dict_checked(build_model("detr_tiny", 5), build_model("detr_tiny", 5).state_dict())
        >>> load_state_dict_checked(build_model("detr_tiny", 5), build_model("detr_tiny", 7).state_dict())
        Traceback (most recent call last):
        ...
        ValueError: checkpoint does not fit the model (...): 0 missing keys ... shape mismatches ...
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)
    ]
    if missing or unexpected or shapes:
        hints = []
        if any("_quantizer." in k for k in missing):
            hints.append("the model is quantized but the file is float (start QAT from float weights)")
        if any("_quantizer." in k for k in unexpected):
            hints.append("the file is quantized but the model is float (set the bit width)")
        raise ValueError(
            f"{source} does not fit the model ({type(model).__name__}): "
            f"{len(missing)} missing keys {missing[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}, "
            f"{len(shapes)} shape mismatches {shapes[:3]}. "
            + ("; ".join(hints) + ". " if hints else "")
            + "Check model.name, model.num_classes and quant.bits against the run that wrote the file."
        )
    model.load_state_dict(state_dict, strict=True)


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
    """Writes a model file (see the module docstring).

    Args:
        path: destination (``model_final.pt`` by convention); written atomically.
        model: the trained detector (its state dict is stored on the CPU).
        model_name: registry name to rebuild it with.
        model_config: builder overrides.
        num_classes: DETR ``num_classes``.
        quant: ``QuantConfig.to_dict()`` for a quantized model, None for a float one.
        alignment: whether distribution alignment modules are in ``model``.
        categories: category id -> name of the training set.
        preprocessing: evaluation sizes ``{"eval_size", "max_size", "mean", "std"}``.

    Returns:
        ``path``.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from qdetr.engine import load_model_file, save_model_file
        >>> from qdetr.engine.model_files import build_model
        >>> model = build_model("detr_tiny", num_classes=5, overrides={"hidden_dim": 32})
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = save_model_file(
        ...         Path(tmp) / "model_final.pt", model, model_name="detr_tiny", model_config={"hidden_dim": 32},
        ...         num_classes=5, quant=None, alignment=False, categories={1: "rectangle"},
        ...     )
        ...     loaded, meta = load_model_file(path)
        >>> path.name, meta["format"], meta["categories"]
        ('model_final.pt', 'qdetr-train-model', {1: 'rectangle'})
    """
    from qdetr.engine.checkpoint import save_checkpoint_atomic

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
    """Rebuilds the model of a model file (quantized if it was) and loads its weights.

    Args:
        path: a model file written by :func:`save_model_file` (``model_final.pt``).
        map_location: device the weights are loaded to.

    Returns:
        ``(model in eval mode, metadata dict without the weights)``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a model file.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from qdetr.engine import load_model_file, save_model_file
        >>> from qdetr.engine.model_files import apply_quantization, build_model
        >>> from qdetr.quant import QuantConfig
        >>> quant = QuantConfig(bits=4).to_dict()
        >>> model_4bit = apply_quantization(build_model("detr_tiny", 5), quant, alignment=False)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = save_model_file(
        ...         Path(tmp) / "model_final.pt", model_4bit, model_name="detr_tiny",
        ...         model_config={}, num_classes=5, quant=quant, alignment=False, categories={},
        ...     )
        ...     model, meta = load_model_file(path)  # rebuilt quantized, loaded with strict=True
        >>> quant_dict = meta["quant"]
        >>> model.training, meta["num_classes"], quant_dict["bits"], "model" in meta
        (False, 5, 4, False)
        >>> load_model_file("missing.pt")
        Traceback (most recent call last):
        ...
        FileNotFoundError: model file not found: missing.pt
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != MODEL_FILE_FORMAT:
        raise ValueError(
            f"{path} is not a qdetr model file (written by `qdetr train` as model_final.pt); "
            "for training checkpoints use the matching model_final.pt, for packed models a save_pretrained folder"
        )
    model = build_model(state["model_name"], state["num_classes"], state["model_config"])
    apply_quantization(model, state["quant"], state["alignment"])
    load_state_dict_checked(model, state["model"], source=str(path))
    model.eval()
    meta = {k: v for k, v in state.items() if k != "model"}
    return model, meta
