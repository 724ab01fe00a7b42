"""The files a training run leaves in its folder, read as models.

A run folder written by ``qdetr train`` (:class:`qdetr.engine.Trainer`) looks like::

    RUN/
      config.json        the TrainConfig of the run (not a model config)
      checkpoint.pt      the resumable training checkpoint (weights, optimizer, RNG, ...)
      model/             the final model: a standard ``save_pretrained`` directory
                         (config.json + packed model.safetensors + README.md)
      log.jsonl, curves.png, detections_val.json

Runs written by qdetr 0.1 hold ``model_final.pt`` instead of ``model/`` (a ``torch.save``
dict, :data:`LEGACY_MODEL_FORMAT`); it still loads. A ``checkpoint.pt`` of a run still in
progress loads too when it records the model's structure (``"model_spec"``, the
``config.json`` dict of the model), which every checkpoint written by this version does.

This module only reads and checks files; :func:`qdetr.zoo.resolve_model` decides which
reader a path needs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdetr.errors import CheckpointError
from qdetr.zoo.size_limits import check_architecture_bounds, check_layer_indices

__all__ = [
    "RUN_MODEL_DIR",
    "RUN_CHECKPOINT_NAME",
    "LEGACY_MODEL_FILE",
    "LEGACY_MODEL_FORMAT",
    "is_run_folder",
    "run_model_path",
    "read_state_dict",
    "load_state_dict_checked",
    "load_legacy_model_file",
    "load_training_checkpoint",
]

#: Sub-directory of a run folder holding the final model (a ``save_pretrained`` directory).
RUN_MODEL_DIR = "model"
#: The resumable training checkpoint of a run folder.
RUN_CHECKPOINT_NAME = "checkpoint.pt"
#: The final model file of runs written by qdetr 0.1.
LEGACY_MODEL_FILE = "model_final.pt"
#: ``format`` entry of a :data:`LEGACY_MODEL_FILE`.
LEGACY_MODEL_FORMAT = "qdetr-train-model"


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a training run folder (it holds a final model or a checkpoint).

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from qdetr.zoo.run_files import is_run_folder
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     before = is_run_folder(tmp)
        ...     (Path(tmp) / "model").mkdir()
        ...     _ = (Path(tmp) / "model" / "config.json").write_text("{}")
        ...     after = is_run_folder(tmp)
        >>> before, after
        (False, True)
    """
    path = Path(path)
    return path.is_dir() and (
        (path / RUN_MODEL_DIR / "config.json").is_file()
        or (path / LEGACY_MODEL_FILE).is_file()
        or (path / RUN_CHECKPOINT_NAME).is_file()
    )


def run_model_path(run_dir: str | os.PathLike) -> Path:
    """The file or directory that holds the model of a run folder.

    In order of preference: ``model/`` (the final model), ``model_final.pt`` (runs of
    qdetr 0.1), ``checkpoint.pt`` (a run still in progress).

    Raises:
        FileNotFoundError: when the folder holds none of them.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from qdetr.zoo.run_files import run_model_path
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = (Path(tmp) / "checkpoint.pt").write_bytes(b"")
        ...     run_model_path(tmp).name
        'checkpoint.pt'
    """
    run_dir = Path(run_dir)
    for candidate in (run_dir / RUN_MODEL_DIR, run_dir / LEGACY_MODEL_FILE, run_dir / RUN_CHECKPOINT_NAME):
        if (candidate / "config.json").is_file() if candidate.name == RUN_MODEL_DIR else candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{run_dir} is not a training run folder with a model: it has no {RUN_MODEL_DIR}/ (final model), "
        f"{LEGACY_MODEL_FILE} or {RUN_CHECKPOINT_NAME}; wait for the run to write one or pass another folder"
    )


def _torch_load(path: Path) -> Any:
    from qdetr.zoo.safe_load import load_checkpoint_file

    return load_checkpoint_file(path)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads model weights from a training checkpoint, a model file, a bare state dict, a
    ``save_pretrained`` folder or a run folder.

    Quantized weights of a ``save_pretrained`` folder are packed; use
    :func:`qdetr.zoo.resolve_model` to get them as a model. This function is for float weights
    (the starting point of QAT, a teacher).

    Args:
        path: a ``.pt``/``.pth`` file, a ``.safetensors`` file, a ``save_pretrained`` folder or
            a run folder.

    Returns:
        The state dict (name -> tensor).

    Raises:
        FileNotFoundError: if nothing is found at ``path``.
        qdetr.errors.CheckpointError: if the file holds no state dict.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import torch
        >>> from qdetr.models import create_model
        >>> from qdetr.zoo.run_files import read_state_dict
        >>> model = create_model("detr_tiny", num_classes=5)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     torch.save({"model": model.state_dict(), "epoch": 1}, Path(tmp) / "checkpoint.pt")
        ...     from_file = read_state_dict(Path(tmp) / "checkpoint.pt")
        ...     from_run = read_state_dict(tmp)  # the run folder is enough
        >>> from_file.keys() == model.state_dict().keys() == from_run.keys()
        True
    """
    path = Path(path)
    if path.is_dir() and is_run_folder(path) and not (path / "model.safetensors").is_file():
        path = run_model_path(path)
    if path.is_dir():
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(
                f"{path} has no model.safetensors; pass a run folder, a checkpoint file or a save_pretrained folder"
            )
        from qdetr.zoo.packed_state import read_packed_state_dict

        return read_packed_state_dict(weights)
    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = _torch_load(path)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path} does not hold a model state dict (expected a dict of tensors or a 'model' entry)"
        )
    return state


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Loads ``state_dict`` with ``strict=True`` after comparing key sets and shapes.

    Args:
        model: the module to load into.
        state_dict: name -> tensor, with the model's keys and shapes.
        source: what the weights are called in error messages (e.g. the file path).

    Raises:
        qdetr.errors.CheckpointError: naming missing/unexpected keys or mismatched shapes,
            e.g. when the file belongs to another architecture, another ``num_classes`` or a
            quantized model.

    Examples:
        >>> from qdetr.models import create_model
        >>> from qdetr.zoo.run_files import load_state_dict_checked
        >>> model = create_model("detr_tiny", num_classes=5)
        >>> load_state_dict_checked(model, create_model("detr_tiny", num_classes=5).state_dict())
        >>> load_state_dict_checked(model, create_model("detr_tiny", num_classes=7).state_dict())
        Traceback (most recent call last):
        ...
        qdetr.errors.CheckpointError: checkpoint does not fit the model (...): 0 missing keys ... shape mismatches ...
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
        raise CheckpointError(
            f"{source} does not fit the model ({type(model).__name__}): "
            f"{len(missing)} missing keys {missing[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}, "
            f"{len(shapes)} shape mismatches {shapes[:3]}. "
            + ("; ".join(hints) + ". " if hints else "")
            + "Check model.name, model.num_classes and quant.bits against the run that wrote the file."
        )
    model.load_state_dict(state_dict, strict=True)


def _attach_info(model: nn.Module, categories: dict, preprocessing: dict | None, source: Path) -> nn.Module:
    from qdetr.zoo.hub import PRETRAINED_INFO_ATTR, model_config_dict

    model.id2label = {int(k): str(v) for k, v in categories.items()}
    info = model_config_dict(model, id2label=model.id2label, provenance={"source": str(source)})
    if preprocessing:
        from qdetr.models.preprocessing import PreprocessingConfig

        info["preprocessing"] = PreprocessingConfig.from_dict(preprocessing).to_dict()
    setattr(model, PRETRAINED_INFO_ATTR, info)
    return model.eval()


def load_legacy_model_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuilds the model of a qdetr 0.1 ``model_final.pt`` (quantized if it was) and loads it.

    The file holds ``format`` (:data:`LEGACY_MODEL_FORMAT`), ``version`` 1, ``model`` (state
    dict), ``model_name``, ``model_config`` (builder overrides), ``num_classes``, ``quant``
    (``QuantConfig`` dict or None), ``alignment`` (bool; those runs always placed DA on the
    decoder cross-attention), ``categories`` and ``preprocessing``.

    Args:
        path: the ``model_final.pt`` file.
        map_location: device the weights are loaded to.

    Returns:
        The model in eval mode, with ``id2label`` and its ``config.json`` dict (including
        ``preprocessing``) attached, as from :func:`qdetr.zoo.load_pretrained_dir`.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        qdetr.errors.CheckpointError: if the file is not such a model file.

    Examples:
        >>> from qdetr.zoo.run_files import load_legacy_model_file
        >>> load_legacy_model_file("missing.pt")
        Traceback (most recent call last):
        ...
        FileNotFoundError: model file not found: missing.pt
    """
    from qdetr.models import create_model, model_config

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    state = _torch_load(path)
    if not isinstance(state, dict) or state.get("format") != LEGACY_MODEL_FORMAT:
        raise CheckpointError(
            f"{path} is not a qdetr model file (written by `qdetr train` as {LEGACY_MODEL_FILE}); pass the run "
            "folder, a save_pretrained folder or a release checkpoint"
        )
    if state.get("version", 1) != 1:
        raise CheckpointError(f"{path} is a model file of version {state.get('version')!r}; this qdetr reads version 1")
    try:  # the registry entry's sizes, with the file's overrides: checked before anything is built
        declared = model_config(state["model_name"]).to_dict()
    except (KeyError, ValueError, TypeError):
        declared = {}
    declared.update({**dict(state.get("model_config") or {}), "num_classes": state.get("num_classes")})
    check_architecture_bounds(declared, source=str(path), weights_bytes=path.stat().st_size)
    if isinstance(state.get("model"), dict):
        check_layer_indices(state["model"].keys(), source=str(path))
    model = create_model(state["model_name"], num_classes=int(state["num_classes"]), **dict(state["model_config"]))
    if state.get("quant") is not None:
        from qdetr.quant import QuantConfig, quantize_model

        quantize_model(model, config=QuantConfig.from_dict(state["quant"]))
    if state.get("alignment"):
        from qdetr.distill.alignment import insert_distribution_alignment

        insert_distribution_alignment(model, where="cross")  # what qdetr 0.1's trainer did, whatever the profile
    load_state_dict_checked(model, state["model"], source=str(path))
    model.to(map_location)
    return _attach_info(model, state.get("categories") or {}, state.get("preprocessing"), path)


def load_training_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """The model of a training checkpoint (``checkpoint.pt``) written by this qdetr.

    The checkpoint records the model's structure as ``model_spec`` (the ``config.json``
    dict of :func:`qdetr.zoo.hub.model_config_dict`, with ``id2label`` and ``preprocessing``);
    the model is rebuilt from it and the weights are loaded strictly.

    Args:
        path: the ``checkpoint.pt`` file.
        map_location: device of the model.

    Returns:
        The model in eval mode with ``id2label`` and its ``config.json`` dict attached.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        qdetr.errors.CheckpointError: for a checkpoint without ``model_spec`` (older qdetr),
            naming the file to use instead.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import torch
        >>> from qdetr.models import create_model
        >>> from qdetr.zoo.hub import model_config_dict
        >>> from qdetr.zoo.run_files import load_training_checkpoint
        >>> model = create_model("detr_tiny", num_classes=5)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = Path(tmp) / "checkpoint.pt"
        ...     torch.save({"model": model.state_dict(), "model_spec": model_config_dict(model)}, path)
        ...     loaded = load_training_checkpoint(path)
        >>> loaded.training, loaded.config.num_classes
        (False, 5)
    """
    from qdetr.zoo.hub import PRETRAINED_INFO_ATTR, build_model_from_config

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training checkpoint not found: {path}")
    state = _torch_load(path)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path} is not a qdetr training checkpoint (no 'model' entry)")
    spec = state.get("model_spec")
    if not isinstance(spec, dict):
        raise CheckpointError(
            f"{path} does not record the model's structure (written by an older qdetr); load the run's "
            f"{RUN_MODEL_DIR}/ or {LEGACY_MODEL_FILE} instead, or pass it as a float checkpoint "
            "(quant.float_checkpoint), which only needs the weights"
        )
    check_architecture_bounds(spec.get("architecture") or {}, source=str(path), weights_bytes=path.stat().st_size)
    check_layer_indices(state["model"].keys(), source=str(path))
    model = build_model_from_config(spec)
    load_state_dict_checked(model, state["model"], source=str(path))
    model.id2label = {int(k): str(v) for k, v in (spec.get("id2label") or {}).items()}
    setattr(model, PRETRAINED_INFO_ATTR, dict(spec))
    model.to(map_location)
    return model.eval()
