"""The one resolver: anything a user may pass as "the model" -> a ready model.

Every command and API that takes a model calls :func:`resolve_model` (``qdetr train
--float-checkpoint/--teacher`` read weights with :func:`qdetr.zoo.run_files.read_state_dict`,
which follows the same run-folder rules). ``source`` may be:

================================  =========================================================
source                            read by
================================  =========================================================
training run folder (``RUN/``)    ``RUN/model/`` (final model), else ``RUN/model_final.pt``
                                  (qdetr 0.1 runs), else ``RUN/checkpoint.pt`` (in progress)
``save_pretrained`` directory     :func:`qdetr.zoo.load_pretrained_dir`
``model_final.pt``                :func:`qdetr.zoo.run_files.load_legacy_model_file`
``checkpoint.pt`` of a run        :func:`qdetr.zoo.run_files.load_training_checkpoint`
release ``.pth`` (Q-DETR seed)    converted once, cached packed (:mod:`qdetr.zoo.release`)
zoo name                          :func:`qdetr.list_pretrained` entries (downloaded, cached)
Hub repo id (``org/name``)        :func:`qdetr.zoo.load_from_hub`
================================  =========================================================
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from qdetr.errors import CheckpointError, ConfigError
from qdetr.zoo.run_files import (
    LEGACY_MODEL_FILE,
    LEGACY_MODEL_FORMAT,
    RUN_CHECKPOINT_NAME,
    is_run_folder,
    load_legacy_model_file,
    load_training_checkpoint,
    run_model_path,
)

__all__ = ["resolve_model", "resolve_state_dict"]

_HUB_ID_RE = re.compile(r"^(hf-hub:)?[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar")


def _holds_train_config(directory: Path) -> bool:
    """Whether ``directory/config.json`` is a training run's TrainConfig (not a model config)."""
    path = directory / "config.json"
    if not path.is_file() or path.stat().st_size > 1_000_000:
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "library_name" not in data and ("output_dir" in data or "config_version" in data)


def _load_run_file(path: Path, map_location) -> nn.Module:
    """A ``.pt`` file of a run folder: the legacy final model or a training checkpoint."""
    from qdetr.zoo.safe_load import load_checkpoint_file

    if path.name == LEGACY_MODEL_FILE:
        return load_legacy_model_file(path, map_location=map_location)
    if path.name == RUN_CHECKPOINT_NAME:
        return load_training_checkpoint(path, map_location=map_location)
    state = load_checkpoint_file(path)
    if isinstance(state, dict) and state.get("format") == LEGACY_MODEL_FORMAT:
        return load_legacy_model_file(path, map_location=map_location)
    if isinstance(state, dict) and "model_spec" in state:
        return load_training_checkpoint(path, map_location=map_location)
    raise CheckpointError(
        f"{path} is neither a final model ({LEGACY_MODEL_FILE}) nor a training checkpoint of this qdetr; pass the "
        "run folder itself"
    )


def _load_local(path: Path, *, bits, cache_dir, map_location) -> nn.Module:
    from qdetr.zoo.hub import CONFIG_NAME, WEIGHTS_NAME, load_pretrained_dir
    from qdetr.zoo.pretrained import _from_release_file

    if path.is_dir():
        if (path / WEIGHTS_NAME).is_file():
            return load_pretrained_dir(path, device=map_location)
        if is_run_folder(path):
            return _load_local(run_model_path(path), bits=bits, cache_dir=cache_dir, map_location=map_location)
        if _holds_train_config(path):
            raise FileNotFoundError(
                f"{path} is a training run folder without a model yet (no model/, {LEGACY_MODEL_FILE} or "
                f"{RUN_CHECKPOINT_NAME}); let the run finish or pass another folder"
            )
        return load_pretrained_dir(path, device=map_location)  # names what is missing
    if path.suffix == ".safetensors":
        raise ConfigError(f"{path} is a weights file; pass the directory that holds it and its {CONFIG_NAME}")
    if path.suffix not in _TORCH_SUFFIXES:
        raise ConfigError(
            f"{path}: expected a run folder, a save_pretrained folder, a training file ({LEGACY_MODEL_FILE}, "
            f"{RUN_CHECKPOINT_NAME}) or a release checkpoint ({', '.join(_TORCH_SUFFIXES)})"
        )
    if path.name in (LEGACY_MODEL_FILE, RUN_CHECKPOINT_NAME) or _holds_train_config(path.parent):
        return _load_run_file(path, map_location)
    return _from_release_file(path, bits=bits, cache_dir=cache_dir)


def resolve_model(
    source: str | os.PathLike,
    *,
    bits: int | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Turn a run folder, ``save_pretrained`` folder, model or checkpoint file, release
    ``.pth``, zoo name or Hub id into a model in eval mode.

    Args:
        source: what the user passed (see the module docstring for the accepted kinds;
            local paths win over zoo names and Hub ids).
        bits: bit width of a release ``.pth`` that does not record it (must agree when it does).
        revision: Hub branch, tag or commit (Hub sources only).
        cache_dir: cache root for downloads and conversions.
        device: where to put the model (default CPU).

    Returns:
        The model in eval mode, with ``id2label``, its ``config.json`` dict
        (``qdetr_pretrained_config``, including the recorded ``preprocessing``), and the
        ``predict`` / ``save_pretrained`` / ``push_to_hub`` methods.

    Raises:
        FileNotFoundError: a local path that holds no model (the message says what is missing).
        ValueError: an unrecognised name (:class:`qdetr.errors.ConfigError`), or a file that is
            not a qdetr model (:class:`qdetr.errors.CheckpointError`).
        qdetr.errors.OfflineModeError: offline and the files are not cached.

    Examples:
        A run folder is the model it produced:

        >>> import tempfile
        >>> from pathlib import Path
        >>> from qdetr.models import create_model
        >>> from qdetr.zoo import resolve_model
        >>> with tempfile.TemporaryDirectory() as run:
        ...     _ = create_model("detr_tiny", num_classes=5).save_pretrained(Path(run) / "model")
        ...     model = resolve_model(run)
        >>> type(model).__name__, model.training, model.config.num_classes
        ('Detr', False, 5)
        >>> resolve_model("no-such-model")
        Traceback (most recent call last):
        ...
        qdetr.errors.ConfigError: 'no-such-model' is not a zoo name (see qdetr.list_pretrained()), an existing run folder, model folder or file, or a Hugging Face Hub repo id ('org/name')
    """
    from qdetr.zoo.hub import load_from_hub
    from qdetr.zoo.pretrained import _from_zoo, attach_pretrained_methods
    from qdetr.zoo.registry import get_pretrained_entry, is_registered

    text = os.fspath(source)
    path = Path(text).expanduser()
    map_location = device if device is not None else "cpu"
    if path.exists():
        model = _load_local(path, bits=bits, cache_dir=cache_dir, map_location=map_location)
    elif is_registered(text):
        model = _from_zoo(get_pretrained_entry(text), revision=revision, cache_dir=cache_dir, bits=bits)
    elif _HUB_ID_RE.match(text) and not text.endswith(_TORCH_SUFFIXES):
        model = load_from_hub(text.removeprefix("hf-hub:"), revision=revision, cache_dir=cache_dir)
    else:
        try:
            get_pretrained_entry(text)
            hint = ""
        except KeyError as err:  # carries close matches, if any
            hint = f" ({err.args[0]})" if "Did you mean" in err.args[0] else ""
        raise ConfigError(
            f"{text!r} is not a zoo name (see qdetr.list_pretrained()), an existing run folder, model folder or file, "
            f"or a Hugging Face Hub repo id ('org/name'){hint}"
        )
    if device is not None:
        model.to(device)
    model.eval()
    return attach_pretrained_methods(model)


def resolve_state_dict(source: str | os.PathLike, **kwargs) -> dict[str, torch.Tensor]:
    """The weights of any model source, for loading into a model built elsewhere (QAT start, teacher).

    Local files and folders are read without building a model
    (:func:`qdetr.zoo.run_files.read_state_dict`); zoo names and Hub ids go through
    :func:`resolve_model`.

    Args:
        source: as for :func:`resolve_model`.
        **kwargs: forwarded to :func:`resolve_model` (``revision``, ``cache_dir``, ``bits``).

    Returns:
        name -> tensor.

    Examples:
        >>> import tempfile
        >>> from qdetr.models import create_model
        >>> from qdetr.zoo import resolve_state_dict
        >>> model = create_model("detr_tiny")
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = model.save_pretrained(tmp)
        ...     weights = resolve_state_dict(tmp)
        >>> weights.keys() == model.state_dict().keys()
        True
    """
    from qdetr.zoo.run_files import read_state_dict

    if Path(os.fspath(source)).expanduser().exists():
        return read_state_dict(Path(os.fspath(source)).expanduser())
    return resolve_model(source, **kwargs).state_dict()
