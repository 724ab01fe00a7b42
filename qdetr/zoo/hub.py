"""qdetr's own format on disk and on the Hugging Face Hub.

A saved model is a directory::

    config.json         format_version, qdetr version, architecture (DetrConfig/SmcaConfig
                        dict), quantization (QuantConfig dict), distribution-alignment slots,
                        id2label, provenance, metrics
    model.safetensors   the state dict with quantized weights bit-packed
                        (see :mod:`qdetr.zoo.packed_state`)
    README.md           model card (see :mod:`qdetr.zoo.model_card`)

Loading rebuilds the (quantized) structure from ``config.json`` first, then loads the
weights strictly; the fake-quant forward is reproduced bit-exactly. The same directory is a
Hub repository: :func:`push_to_hub` uploads it, :func:`load_from_hub` reads it through
``huggingface_hub.snapshot_download`` (so ``revision=`` pins and ``HF_HUB_OFFLINE=1`` uses
the local Hub cache).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from qdetr.atomic_write import atomic_path
from qdetr.errors import CheckpointError
from qdetr.zoo.cache import write_json_atomic
from qdetr.zoo.labels import default_id2label
from qdetr.zoo.model_card import render_model_card
from qdetr.zoo.packed_state import find_quantized_weights, load_packed_state, save_packed_state
from qdetr.zoo.size_limits import check_architecture_bounds

__all__ = [
    "FORMAT_VERSION",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "MODEL_CARD_NAME",
    "PRETRAINED_INFO_ATTR",
    "model_config_dict",
    "build_model_from_config",
    "read_config",
    "save_pretrained",
    "load_pretrained_dir",
    "load_from_hub",
    "push_to_hub",
]

logger = logging.getLogger(__name__)

#: Version of the directory layout / config.json schema written by this qdetr.
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_CARD_NAME = "README.md"
#: Attribute of loaded models holding their ``config.json`` dict (provenance, metrics, name).
PRETRAINED_INFO_ATTR = "qdetr_pretrained_config"
_HUB_FILES = [CONFIG_NAME, WEIGHTS_NAME, MODEL_CARD_NAME, "preprocessor_config.json"]


def _qdetr_version() -> str:
    import qdetr

    return getattr(qdetr, "__version__", "unknown")


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def model_config_dict(
    model: nn.Module,
    *,
    id2label: dict[int, str] | None = None,
    provenance: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    name: str | None = None,
    preprocessing: Any = None,
) -> dict[str, Any]:
    """The ``config.json`` content for ``model``.

    Args:
        model: a qdetr detector (``model.config`` is its architecture dataclass).
        id2label: class names; default ``model.id2label``, else COCO names for 91 classes.
        provenance: where the weights come from (source file, SHA-256, bits source, ...).
        metrics: evaluation results, e.g. ``{"coco_val2017_box_ap": {"value": 38.5, "source": ...}}``.
        name: zoo or display name.
        preprocessing: the image preprocessing the model expects at inference (a
            :class:`qdetr.models.PreprocessingConfig` or its dict); default: the one recorded
            on the model, else none (``predict`` then uses 800/1333).

    Raises:
        TypeError: if ``model`` has no architecture config (``model.config.to_dict``).

    Examples:
        >>> from qdetr.models import PreprocessingConfig, create_model
        >>> from qdetr.zoo.hub import model_config_dict
        >>> config = model_config_dict(create_model("detr_tiny"), preprocessing=PreprocessingConfig(shortest_edge=64))
        >>> config["architecture"]["hidden_dim"], config["preprocessing"]["shortest_edge"], config["quantization"]
        (32, 64, None)
    """
    from qdetr.models.preprocessing import PreprocessingConfig
    from qdetr.distill.alignment import alignment_slots
    from qdetr.quant.api import CONFIG_ATTR

    arch = getattr(model, "config", None)
    if arch is None or not hasattr(arch, "to_dict"):
        raise TypeError(
            f"{type(model).__name__} has no architecture config (model.config with to_dict()); save_pretrained "
            f"supports qdetr models built by qdetr.create_model / qdetr.models"
        )
    previous = getattr(model, PRETRAINED_INFO_ATTR, None) or {}
    quant = getattr(model, CONFIG_ATTR, None)
    labels = id2label if id2label is not None else getattr(model, "id2label", None)
    if labels is None:
        labels = default_id2label(arch.num_classes)
    labels = {int(k): str(v) for k, v in labels.items()}
    if preprocessing is None:
        preprocessing = previous.get("preprocessing")
    if isinstance(preprocessing, dict):
        preprocessing = PreprocessingConfig.from_dict(preprocessing)
    return {
        "format_version": FORMAT_VERSION,
        "library_name": "qdetr",
        "qdetr_version": _qdetr_version(),
        "name": name if name is not None else previous.get("name"),
        "torch_dtype": str(_float_dtype(model)).removeprefix("torch."),
        "architecture": arch.to_dict(),
        "quantization": quant.to_dict() if quant is not None else None,
        "alignment": alignment_slots(model),
        "id2label": {str(k): v for k, v in sorted(labels.items())},
        "weights": {
            "file": WEIGHTS_NAME,
            "packed_weights": len(find_quantized_weights(model)),
            "packing": "integer codes stored as (code - qmin) in an LSB-first bit stream; see qdetr.zoo.packing",
        },
        "provenance": provenance if provenance is not None else previous.get("provenance", {}),
        "metrics": metrics if metrics is not None else previous.get("metrics", {}),
        "preprocessing": preprocessing.to_dict() if preprocessing is not None else None,
    }


def build_model_from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuild the (quantized) module structure described by a ``config.json`` dict.

    The float model comes from ``architecture``, distribution-alignment modules are placed
    in the recorded ``q_align`` slots, then ``quantize_model`` applies the saved
    ``QuantConfig``. Weights are random until loaded.

    Raises:
        ValueError: for a newer ``format_version`` or an invalid config.
    """
    from qdetr.distill.alignment import restore_alignment_slots
    from qdetr.models import build_model, config_from_dict
    from qdetr.quant import QuantConfig, quantize_model

    version = int(config.get("format_version", 0))
    if version < 1 or version > FORMAT_VERSION:
        raise ValueError(
            f"config.json has format_version {config.get('format_version')!r}; this qdetr reads 1..{FORMAT_VERSION}"
            f" (upgrade qdetr for newer files)"
        )
    model = build_model(config_from_dict(config["architecture"]))
    restore_alignment_slots(model, config.get("alignment", []))
    if config.get("quantization"):
        quantize_model(model, config=QuantConfig.from_dict(config["quantization"]))
    dtype = getattr(torch, str(config.get("torch_dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"config.json torch_dtype {config.get('torch_dtype')!r} is not a floating dtype")
    return model.to(dtype)


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    id2label: dict[int, str] | None = None,
    provenance: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    name: str | None = None,
    base_model: str | None = None,
    repo_id: str | None = None,
    model_card: bool = True,
    preprocessing: Any = None,
) -> Path:
    """Save ``model`` as ``config.json`` + packed ``model.safetensors`` (+ ``README.md``).

    Args:
        model: a qdetr detector, quantized or float.
        save_directory: created if missing; existing files of the same names are replaced
            atomically (weights first, ``config.json`` last).
        id2label, provenance, metrics, name, preprocessing: see :func:`model_config_dict`.
        base_model: Hub id of the float model it derives from (model card front matter).
        repo_id: Hub id used in the card's usage snippet.
        model_card: also write ``README.md``.

    Returns:
        The directory.

    Examples:
        >>> import tempfile
        >>> from qdetr.models import create_model
        >>> from qdetr.zoo import save_pretrained
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     directory = save_pretrained(create_model("detr_tiny"), tmp)
        ...     print(sorted(path.name for path in directory.iterdir()))
        ['README.md', 'config.json', 'model.safetensors']
    """
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model_config_dict(
        model, id2label=id2label, provenance=provenance, metrics=metrics, name=name, preprocessing=preprocessing
    )
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_packed_state(model, tmp, extra_metadata={"qdetr_version": config["qdetr_version"]})
    if model_card:
        card = render_model_card(model, config, repo_id=repo_id, base_model=base_model)
        with atomic_path(directory / MODEL_CARD_NAME) as tmp:
            tmp.write_text(card, encoding="utf-8")
    write_json_atomic(directory / CONFIG_NAME, config)
    return directory


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and minimally validate ``config.json`` of a saved model directory."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} has no {CONFIG_NAME}; it is not a qdetr model directory (save one with "
            f"model.save_pretrained(dir), or pass a release .pth file)"
        )
    config = _read_json_bounded(path)
    if not isinstance(config, dict) or config.get("library_name") != "qdetr" or "architecture" not in config:
        raise CheckpointError(f"{path} is not a qdetr config (library_name/architecture missing)")
    return config


def _read_json_bounded(path: Path, max_bytes: int = 10_000_000) -> Any:
    """Parse a small JSON file; a huge, binary or malformed file is a :class:`CheckpointError`."""
    size = path.stat().st_size
    if size > max_bytes:
        raise CheckpointError(f"{path} is {size:,} bytes; a config.json is a few kB (limit {max_bytes:,}), so "
                              "this is not a qdetr config")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); delete the folder and save or download it again") from err


def load_pretrained_dir(directory: str | os.PathLike, *, device: str | torch.device | None = None) -> nn.Module:
    """Load a model saved by :func:`save_pretrained`, in eval mode.

    Args:
        directory: the saved directory (or a Hub snapshot of it).
        device: where to put the model (default CPU).

    Returns:
        The model, with ``id2label`` and the ``config.json`` dict attached.

    Raises:
        FileNotFoundError: no ``config.json`` or no ``model.safetensors`` in ``directory``.
        ValueError: a ``config.json`` that is not a qdetr config.

    Examples:
        A calibrated 4-bit model survives the packed round trip bit-exactly:

        >>> import tempfile, torch
        >>> from qdetr.models import create_model
        >>> from qdetr.quant import calibrate
        >>> from qdetr.zoo import load_pretrained_dir, save_pretrained
        >>> model = create_model("qdetr_smca_tiny", bits=4)
        >>> pixel_values = torch.randn(1, 3, 64, 64)
        >>> _ = calibrate(model, [pixel_values])
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = save_pretrained(model.eval(), tmp)
        ...     loaded = load_pretrained_dir(tmp)
        >>> with torch.no_grad():
        ...     torch.equal(model(pixel_values)["pred_boxes"], loaded(pixel_values)["pred_boxes"])
        True
    """
    directory = Path(directory)
    config = read_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    check_architecture_bounds(config["architecture"], source=str(directory / CONFIG_NAME),
                              weights_bytes=weights.stat().st_size)
    model = build_model_from_config(config)
    try:
        load_packed_state(model, weights)
    except SafetensorError as err:
        raise CheckpointError(
            f"{weights} is truncated or damaged ({err}); delete {directory} and save or download the model again"
        ) from None
    bad = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{weights} holds NaN or infinite values in {bad[:5]}; the weights are damaged (a "
                              "diverged training run or a corrupted file): save or download them again")
    model.id2label = {int(k): v for k, v in config.get("id2label", {}).items()}
    setattr(model, PRETRAINED_INFO_ATTR, config)
    if device is not None:
        model.to(device)
    return model.eval()


def load_from_hub(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    token: str | bool | None = None,
) -> nn.Module:
    """Load a qdetr model from a Hugging Face Hub repository.

    Files go through ``huggingface_hub.snapshot_download``: they are cached in the Hub cache
    (``cache_dir`` or ``$HF_HUB_CACHE``), ``revision`` pins a branch, tag or commit, and with
    ``HF_HUB_OFFLINE=1`` (or ``QDETR_OFFLINE=1``) only the cache is used.

    Args:
        repo_id: ``"org/name"`` of a repository written by :func:`push_to_hub`.
        revision: branch, tag or commit to pin.
        cache_dir: Hugging Face cache directory.
        device: where to put the model (default CPU).
        token: Hub token for private repositories.

    Returns:
        The model in eval mode, as from :func:`load_pretrained_dir`.

    Raises:
        OfflineModeError: offline mode is on and the repository is not in the cache.

    Examples:
        >>> import os, tempfile
        >>> from unittest import mock
        >>> from qdetr.zoo import OfflineModeError, load_from_hub
        >>> with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ, {"QDETR_OFFLINE": "1"}):
        ...     try:
        ...         load_from_hub("my-org/qdetr-smca-tiny", cache_dir=tmp)
        ...     except OfflineModeError as err:
        ...         print("not in the Hugging Face cache" in str(err))
        True
        >>> model = load_from_hub("my-org/qdetr-smca-r50-w4", revision="main")  # doctest: +SKIP
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from qdetr.zoo.cache import OfflineModeError, is_offline

    offline = is_offline()  # read now: huggingface_hub reads HF_HUB_OFFLINE once, at import
    try:
        snapshot = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=str(cache_dir) if cache_dir is not None else None,
            allow_patterns=_HUB_FILES,
            token=token,
            local_files_only=offline,
        )
    except LocalEntryNotFoundError as err:
        if not offline:
            raise
        raise OfflineModeError(
            f"offline mode is on (HF_HUB_OFFLINE or QDETR_OFFLINE) and {repo_id!r}"
            f"{'@' + revision if revision else ''} is not in the Hugging Face cache; unset the variable to "
            f"download it"
        ) from err
    return load_pretrained_dir(snapshot, device=device)


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload qdetr model",
    create_repo: bool = True,
    **save_kwargs: Any,
):
    """Save ``model`` (packed) to a temporary directory and upload it to the Hub.

    Args:
        model: the model to upload.
        repo_id: ``"user/name"``.
        private: visibility when the repository is created.
        token: Hub token (default: the logged-in one).
        revision: branch to commit to.
        commit_message: commit message.
        create_repo: create the repository if missing.
        **save_kwargs: forwarded to :func:`save_pretrained` (``metrics``, ``base_model``, ...).

    Returns:
        The ``huggingface_hub`` commit info.

    Examples:
        >>> from qdetr.models import create_model
        >>> from qdetr.zoo import push_to_hub
        >>> model = create_model("qdetr_smca_tiny", bits=4)
        >>> push_to_hub(model, "my-org/qdetr-smca-tiny-w4", private=True)  # doctest: +SKIP
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    if create_repo:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(prefix="qdetr-push-") as tmp:
        save_pretrained(model, tmp, repo_id=repo_id, **save_kwargs)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message,
                                 revision=revision, repo_type="model")
