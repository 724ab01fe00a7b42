"""``qdetr.from_pretrained``: one entry point for every kind of pretrained weights.

``name_or_path`` may be:

===============================  ==========================================================
kind                             what happens
===============================  ==========================================================
zoo name                         ``list_pretrained()``; release checkpoints are downloaded
(``qdetr_smca_r50.w4a4...``)     (verified, resumable, cached), loaded safely, converted and
                                 cached in the packed qdetr format, so later loads read only
                                 safetensors; Hub entries go through ``huggingface_hub``
local directory                  a directory written by ``model.save_pretrained``
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

import hashlib
import logging
import os
import re
import shutil
import tempfile
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdetr.models.pretrained_methods import PretrainedMethodsMixin
from qdetr.zoo.cache import default_cache_dir
from qdetr.zoo.download import download_url, gdrive_download_url, gdrive_view_url
from qdetr.zoo.hub import CONFIG_NAME, WEIGHTS_NAME, load_from_hub, load_pretrained_dir
from qdetr.zoo.hub import push_to_hub as _push_to_hub
from qdetr.zoo.hub import save_pretrained as _save_pretrained
from qdetr.zoo.prediction import attach_predict
from qdetr.zoo.registry import PretrainedEntry, get_pretrained_entry, is_registered
from qdetr.zoo.release import load_release_checkpoint

__all__ = ["from_pretrained", "attach_pretrained_methods", "converted_cache_dir"]

logger = logging.getLogger(__name__)

_HUB_ID_RE = re.compile(r"^(hf-hub:)?[A-Za-z0-9][\w.-]*/[\w.-]+$")
_RELEASE_SUFFIXES = (".pth", ".pt", ".bin", ".tar")


def _save_pretrained_method(self: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
    """``save_pretrained(dir, **kwargs)``; see :func:`qdetr.zoo.hub.save_pretrained`."""
    return _save_pretrained(self, save_directory, **kwargs)


def _push_to_hub_method(self: nn.Module, repo_id: str, **kwargs: Any):
    """``push_to_hub(repo_id, **kwargs)``; see :func:`qdetr.zoo.hub.push_to_hub`."""
    return _push_to_hub(self, repo_id, **kwargs)


def attach_pretrained_methods(model: nn.Module) -> nn.Module:
    """Give ``model`` ``save_pretrained``, ``push_to_hub`` and ``predict`` methods and return it.

    qdetr's :class:`~qdetr.models.Detr` and :class:`~qdetr.models.SmcaDetr` already have them
    (:class:`~qdetr.models.pretrained_methods.PretrainedMethodsMixin`) and are returned
    unchanged; another module with the same ``forward(pixel_values, pixel_mask)`` contract and
    a qdetr ``config`` gets the three methods bound to the instance.

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
    model.save_pretrained = types.MethodType(_save_pretrained_method, model)
    model.push_to_hub = types.MethodType(_push_to_hub_method, model)
    return attach_predict(model)


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
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        sha256 = digest.hexdigest()
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
    model = load_release_checkpoint(path, bits=entry.bits, sha256=meta_sha, provenance=_entry_provenance(entry),
                                    model_name=entry.arch)
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
            ``save_pretrained``, a local Q-DETR release ``.pth`` file, or a Hugging Face Hub
            repo id (``org/name``, optionally prefixed ``hf-hub:``).
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
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        model = load_pretrained_dir(path)
    elif path.is_file():
        if path.suffix == ".safetensors":
            raise ValueError(f"{path} is a weights file; pass the directory that holds it and its {CONFIG_NAME}")
        if path.suffix not in _RELEASE_SUFFIXES:
            raise ValueError(f"{path}: expected a release checkpoint ({', '.join(_RELEASE_SUFFIXES)}) or a "
                             f"directory saved by save_pretrained")
        model = _from_release_file(path, bits=bits, cache_dir=cache_dir)
    elif is_registered(text):
        model = _from_zoo(get_pretrained_entry(text), revision=revision, cache_dir=cache_dir, bits=bits)
    elif _HUB_ID_RE.match(text) and not text.endswith(_RELEASE_SUFFIXES):
        model = load_from_hub(text.removeprefix("hf-hub:"), revision=revision, cache_dir=cache_dir)
    else:
        try:
            get_pretrained_entry(text)
            hint = ""
        except KeyError as err:  # carries close matches, if any
            hint = f" ({err.args[0]})" if "Did you mean" in err.args[0] else ""
        raise ValueError(
            f"{text!r} is not a zoo name (see qdetr.list_pretrained()), an existing local directory or "
            f".pth file, or a Hugging Face Hub repo id ('org/name'){hint}"
        )
    if device is not None:
        model.to(device)
    model.eval()
    return attach_pretrained_methods(model)
