"""``qdetr.from_pretrained``: one entry point for every kind of pretrained weights.

``name_or_path`` may be:

===============================  ==========================================================
kind                             what happens
===============================  ==========================================================
zoo name                         ``list_pretrained()``; release checkpoints are downloaded
(``qdetr_smca_r50.w4a4...``)     (verified, resumable, cached), loaded safely, converted and
                                 cached in the packed qdetr format, so later loads read only
                                 safetensors; Hub entries go through ``huggingface_hub``
local directory                  a directory written by ``model.save_pretrained``, or a
                                 training run folder (its ``model/``, ``model_final.pt`` or
                                 ``checkpoint.pt``; see :func:`qdetr.zoo.resolve_model`)
local ``.pth`` file              a Q-DETR release checkpoint (``bits=`` or ``args.n_bit`` or
                                 a ``ckpt_<b>_bit`` file name gives the width); converted
                                 once and cached by file digest
Hub repo id (``org/name``)       ``huggingface_hub.snapshot_download`` (``revision=``,
                                 ``HF_HUB_OFFLINE=1``), then as a local directory
===============================  ==========================================================

Every returned model is in eval mode and has ``id2label``, ``predict(images,
threshold=0.5)``, ``save_pretrained(dir)`` and ``push_to_hub(repo_id)``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdetr.errors import CheckpointError
from qdetr.models.pretrained_methods import PretrainedMethodsMixin
from qdetr.zoo.cache import default_cache_dir
from qdetr.zoo.download import download_url, gdrive_download_url, gdrive_view_url
from qdetr.zoo.hashing import sha256_file
from qdetr.zoo.hub import CONFIG_NAME, WEIGHTS_NAME, load_from_hub, load_pretrained_dir
from qdetr.zoo.hub import save_pretrained as _save_pretrained
from qdetr.zoo.registry import PretrainedEntry
from qdetr.zoo.release import load_release_checkpoint

__all__ = ["from_pretrained", "attach_pretrained_methods", "converted_cache_dir"]

#: Subclasses ``(PretrainedMethodsMixin, cls)`` made by :func:`attach_pretrained_methods`, per class.
_WITH_METHODS: dict[type, type] = {}

logger = logging.getLogger(__name__)



def attach_pretrained_methods(model: nn.Module) -> nn.Module:
    """Give ``model`` ``save_pretrained``, ``push_to_hub`` and ``predict`` methods and return it.

    There is one way a model gets them: the
    :class:`~qdetr.models.pretrained_methods.PretrainedMethodsMixin` class. qdetr's
    :class:`~qdetr.models.Detr` and :class:`~qdetr.models.SmcaDetr` derive from it and are
    returned unchanged; another module with the same ``forward(pixel_values, pixel_mask)``
    contract and a qdetr ``config`` is given a subclass of its own class and the mixin (one per
    class, cached), so ``isinstance`` checks keep working.

    Args:
        model: the detector.

    Returns:
        ``model``, with the three methods.

    Examples:
        >>> from qdetr.models import create_model
        >>> from qdetr.zoo import attach_pretrained_methods
        >>> model = attach_pretrained_methods(create_model("detr_tiny"))
        >>> all(callable(getattr(model, name)) for name in ("predict", "save_pretrained", "push_to_hub"))
        True
    """
    if isinstance(model, PretrainedMethodsMixin):
        return model
    cls = type(model)
    if cls not in _WITH_METHODS:
        _WITH_METHODS[cls] = type(cls.__name__, (PretrainedMethodsMixin, cls), {"__module__": cls.__module__,
                                                                              "__doc__": cls.__doc__})
    model.__class__ = _WITH_METHODS[cls]
    return model


def converted_cache_dir(key: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory holding the packed conversion of a release checkpoint (zoo name or file key)."""
    return default_cache_dir(cache_dir) / "converted" / key


def _is_saved_dir(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def _store_converted(model: nn.Module, target: Path) -> None:
    """Save ``model`` packed into ``target`` atomically (temporary directory, then rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _save_pretrained(model, tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process stored it first; keep theirs
            if not _is_saved_dir(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _from_release_file(path: Path, *, bits: int | None, cache_dir, provenance: dict | None = None,
                       cache_key: str | None = None, sha256: str | None = None) -> nn.Module:
    if sha256 is None:
        sha256 = sha256_file(path)
    key = cache_key or f"local-{sha256[:16]}-{'b' + str(bits) if bits else 'auto'}"
    target = converted_cache_dir(key, cache_dir)
    if _is_saved_dir(target):
        model = load_pretrained_dir(target)
        saved = model.qdetr_pretrained_config.get("provenance", {})
        if saved.get("source_sha256") == sha256 and (bits is None or saved.get("bits") == bits):
            return model
        logger.warning("converted cache %s does not match %s; converting again", target, path.name)
        shutil.rmtree(target, ignore_errors=True)
    model = load_release_checkpoint(path, bits=bits, sha256=sha256, provenance=provenance)
    _store_converted(model, target)
    return model


def _entry_provenance(entry: PretrainedEntry) -> dict[str, Any]:
    return {"zoo_name": entry.name, "source": entry.source, "license": entry.license, "recipe": entry.recipe}


def _entry_metrics(entry: PretrainedEntry) -> dict[str, Any]:
    if entry.box_ap is None:
        return {}
    return {"coco_val2017_box_ap": {"value": entry.box_ap, "source": entry.box_ap_source or entry.source}}


def _from_zoo(entry: PretrainedEntry, *, revision, cache_dir, bits: int | None) -> nn.Module:
    if bits is not None and entry.bits is not None and bits != entry.bits:
        raise ValueError(f"{entry.name} is a {entry.bits}-bit model; drop bits= or pass bits={entry.bits}")
    if entry.hf_hub_id:
        return load_from_hub(entry.hf_hub_id, revision=revision or entry.hf_revision, cache_dir=cache_dir)
    target = converted_cache_dir(entry.name, cache_dir)
    if _is_saved_dir(target):
        return load_pretrained_dir(target)
    if entry.gdrive_id:
        url = gdrive_download_url(entry.gdrive_id)
        hint = (f"If the download keeps failing, download {entry.filename} by hand from "
                f"{gdrive_view_url(entry.gdrive_id)} and pass its path to qdetr.from_pretrained().")
    else:
        url, hint = entry.url, f"You can also download {entry.url} by hand and pass its path."
    path = download_url(url, filename=entry.filename, subdir=entry.name, cache_dir=cache_dir, sha256=entry.sha256,
                        size=entry.size_bytes, gdrive=bool(entry.gdrive_id) or None, manual_hint=hint)
    meta_sha = _recorded_sha256(path)
    try:
        model = load_release_checkpoint(path, bits=entry.bits, sha256=meta_sha, provenance=_entry_provenance(entry),
                                        model_name=entry.arch)
    except CheckpointError as err:
        # A cached download that does not load must not be trusted (or pinned) again: evict it.
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".meta.json").unlink(missing_ok=True)
        raise CheckpointError(
            f"the downloaded file for {entry.name} does not load ({err}); it was removed from the cache ({path}) "
            f"so the next call downloads it again.{' ' + hint if hint else ''}"
        ) from err
    info = model.qdetr_pretrained_config
    info["name"] = entry.name
    info["metrics"] = _entry_metrics(entry)
    _store_converted(model, target)
    return model


def _recorded_sha256(path: Path) -> str | None:
    from qdetr.zoo.cache import read_json

    meta = read_json(path.with_name(path.name + ".meta.json"))
    return meta.get("sha256") if meta else None


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    bits: int | None = None,
) -> nn.Module:
    """Load pretrained weights into a ready model (eval mode).

    Args:
        name_or_path: a zoo name (:func:`qdetr.list_pretrained`), a local directory saved by
            ``save_pretrained``, a training run folder (or its ``model_final.pt`` /
            ``checkpoint.pt``), a local Q-DETR release ``.pth`` file, or a Hugging Face Hub
            repo id (``org/name``, optionally prefixed ``hf-hub:``); the same resolver as
            every command (:func:`qdetr.zoo.resolve_model`).
        revision: Hub branch, tag or commit (Hub sources only).
        cache_dir: cache root for downloads and conversions (default ``$QDETR_CACHE`` or
            ``~/.cache/qdetr``); for Hub sources the Hugging Face cache directory.
        device: device for the model (default CPU).
        bits: bit width of a release ``.pth`` file without ``args.n_bit`` or a
            ``ckpt_<b>_bit`` name; must agree with the file when it does tell.

    Returns:
        The model, with ``id2label``, ``predict``, ``save_pretrained`` and ``push_to_hub``.

    Raises:
        ValueError: an unrecognised name, or a bit width that is missing or contradicts
            the checkpoint.
        FileNotFoundError: a local path that is missing or not a model.
        qdetr.zoo.OfflineModeError: offline and the files are not cached.

    Examples:
        A directory written by ``save_pretrained``:

        >>> import tempfile
        >>> from qdetr.models import create_model
        >>> from qdetr.zoo import from_pretrained
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = create_model("detr_tiny").save_pretrained(tmp)
        ...     model = from_pretrained(tmp)
        >>> model.training, type(model).__name__
        (False, 'Detr')

        A released checkpoint (downloaded once, then read from the cache):

        >>> model = from_pretrained("qdetr_smca_r50.w4a4attn8_seed_coco_e50")  # doctest: +SKIP
        >>> model.predict(["street.jpg"], threshold=0.7)  # doctest: +SKIP
    """
    from qdetr.zoo.resolve import resolve_model

    return resolve_model(name_or_path, bits=bits, revision=revision, cache_dir=cache_dir, device=device)
