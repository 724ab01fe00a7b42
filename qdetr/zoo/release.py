"""Q-DETR release checkpoints (``ckpt_4_bit_smca_detr_coco.pth``, ...) -> ready qdetr models.

Steps (checkpoints.md section 2.6):

1. load the pickle safely (:func:`qdetr.zoo.safe_load.load_checkpoint_file`: tensors and
   ``argparse.Namespace`` only);
2. take ``ckpt["model"]`` (or a bare state dict); keep ``epoch``/``args`` as provenance and
   ignore ``optimizer``/``lr_scheduler``;
3. resolve the bit width, which the state dict does not store: the explicit ``bits``
   argument, ``args.n_bit``, and the file name ``ckpt_<b>_bit`` must agree; with none of
   them the load fails (never a silent guess);
4. convert the keys and check the release semantics
   (:func:`qdetr.zoo.release_format.convert_release_state_dict`);
5. build ``qdetr_smca_r50`` (seed profile) at that width, load strictly, eval, and run a
   smoke forward that must give finite outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdetr.errors import CheckpointError
from qdetr.zoo.hashing import sha256_file
from qdetr.zoo.safe_load import load_checkpoint_file
from qdetr.zoo.size_limits import check_layer_indices

__all__ = [
    "RELEASE_MODEL_NAME",
    "BitWidthError",
    "resolve_release_bits",
    "release_state_dict",
    "load_release_checkpoint",
    "model_from_release_state_dict",
]

logger = logging.getLogger(__name__)

#: Registry name of the model the release checkpoints load into.
RELEASE_MODEL_NAME = "qdetr_smca_r50"
_FILE_BITS_RE = re.compile(r"ckpt_(\d+)_bit")


class BitWidthError(CheckpointError):
    """The bit width of a release checkpoint is missing or contradictory.

    A subclass of :class:`qdetr.errors.CheckpointError` (and so of ``ValueError``).

    Examples:
        >>> from qdetr.zoo import BitWidthError
        >>> from qdetr.zoo.release import resolve_release_bits
        >>> try:
        ...     resolve_release_bits({"model": {}}, bits=4, filename="ckpt_2_bit_smca_detr_coco.pth")
        ... except BitWidthError as err:
        ...     print("contradictory" in str(err))
        True
    """


def resolve_release_bits(
    checkpoint: Any, *, bits: int | None = None, filename: str | os.PathLike | None = None
) -> tuple[int, str]:
    """Bit width of a release checkpoint and where it came from.

    Args:
        checkpoint: the loaded object (dict with optional ``args``, or a state dict).
        bits: bit width given by the caller.
        filename: the checkpoint's file name (``ckpt_<b>_bit...`` carries the width).

    Returns:
        ``(bits, source)`` with source ``"argument"``, ``"args.n_bit"`` or ``"file name"``.

    Raises:
        BitWidthError: no source gives the width, or two sources disagree.
    """
    found: list[tuple[str, int]] = []
    if bits is not None:
        if isinstance(bits, bool) or not isinstance(bits, int):
            raise BitWidthError(f"bits must be an int such as 2 or 4; got {bits!r}")
        found.append(("argument", bits))
    args = checkpoint.get("args") if isinstance(checkpoint, Mapping) else None
    n_bit = getattr(args, "n_bit", None)
    if n_bit is not None:
        if isinstance(n_bit, bool) or not isinstance(n_bit, (int, float)) or n_bit not in (2, 3, 4):
            raise BitWidthError(
                f"the checkpoint's args.n_bit is {n_bit!r}, not a bit width 2, 3 or 4; the file is damaged or "
                "was not written by the Q-DETR release code"
            )
        found.append(("args.n_bit", int(n_bit)))
    if filename is not None:
        match = _FILE_BITS_RE.search(Path(filename).name)
        if match:
            found.append(("file name", int(match.group(1))))
    if not found:
        raise BitWidthError(
            "the checkpoint does not store its bit width (no args.n_bit, no 'ckpt_<b>_bit' file name); "
            "pass bits=2 or bits=4"
        )
    values = {value for _, value in found}
    if len(values) > 1:
        listing = ", ".join(f"{source}={value}" for source, value in found)
        raise BitWidthError(f"contradictory bit widths for this checkpoint ({listing}); pass the right bits= "
                            f"or check that the file is the one you meant")
    return found[0][1], found[0][0]


def release_state_dict(checkpoint: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a loaded release checkpoint into its state dict and provenance extras.

    Returns:
        ``(state_dict, {"epoch": ..., "args": {...}, "ignored_top_level": [...]})``.

    Raises:
        ValueError: neither a dict with ``model`` nor a bare state dict of tensors.
    """
    if isinstance(checkpoint, Mapping) and "model" in checkpoint:
        state = checkpoint["model"]
        extras: dict[str, Any] = {
            "ignored_top_level": sorted(k for k in checkpoint if k not in ("model", "epoch", "args")),
        }
        if "epoch" in checkpoint:
            extras["epoch"] = checkpoint["epoch"]
        if isinstance(checkpoint.get("args"), argparse.Namespace):
            extras["args"] = _jsonable(vars(checkpoint["args"]))
    else:
        state, extras = checkpoint, {}
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            "not a release checkpoint: expected a dict with a 'model' state dict or a bare state dict of tensors"
        )
    return dict(state), extras


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if hasattr(value, "to_dict"):
        return _jsonable(value.to_dict())
    return repr(value)


def _conversion_summary(report: Any) -> dict[str, Any]:
    """Compact JSON view of the converter's report (counts, not every dropped key)."""
    summary: dict[str, Any] = {}
    if hasattr(report, "summary") and callable(report.summary):
        summary["summary"] = report.summary()
    for name in ("dropped_aliases", "dropped_dead", "dropped_other"):
        value = _report_field(report, name)
        if value is not None:
            summary[f"num_{name}"] = len(value)
    for name in ("renamed", "warnings"):
        value = _report_field(report, name)
        if value is not None:
            summary[name] = _jsonable(value)
    return summary


def _report_field(report: Any, name: str) -> Any:
    if isinstance(report, Mapping):
        return report.get(name)
    return getattr(report, name, None)


def _build_release_model(bits: int, config: Any, model_name: str) -> nn.Module:
    """``create_model(model_name, bits, profile="seed")`` with the architecture the converter inferred."""
    from qdetr.models import create_model, model_config

    overrides: dict[str, Any] = {}
    if config is not None:
        base = model_config(model_name)
        for field in dataclasses.fields(base):
            value = getattr(config, field.name, getattr(base, field.name))
            if value != getattr(base, field.name):
                overrides[field.name] = value
    return create_model(model_name, bits=bits, profile="seed", **overrides)


@torch.no_grad()
def _smoke_check(model: nn.Module) -> None:
    """A 2-image synthetic forward must give finite logits and boxes."""
    param = next(model.parameters())
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(param)
    pixel_mask = torch.ones(2, 64, 64, dtype=torch.int64, device=param.device)
    pixel_mask[1, 48:, :] = 0
    out = model(pixel_values, pixel_mask)
    for key in ("pred_logits", "pred_boxes"):
        if not torch.isfinite(out[key]).all():
            raise ValueError(f"the converted model produces non-finite {key} on a synthetic batch; the checkpoint "
                             f"holds invalid values (uncalibrated quantizers?) and was not loaded")


def model_from_release_state_dict(
    state: Mapping[str, torch.Tensor],
    *,
    bits: int,
    provenance: dict[str, Any] | None = None,
    model_name: str = RELEASE_MODEL_NAME,
) -> nn.Module:
    """Convert a release-layout state dict and load it into a fresh quantized model (eval).

    Args:
        state: release-layout state dict (``ckpt["model"]``).
        bits: resolved bit width.
        provenance: recorded on the model (``qdetr_pretrained_config["provenance"]``).
        model_name: registry entry to build (``qdetr_smca_r50``; ``qdetr_smca_tiny`` in tests);
            architecture fields the converter infers from the tensor shapes override its config.

    Returns:
        The model in eval mode, with ``id2label`` and provenance attached.
    """
    from qdetr.zoo.release_format import convert_release_state_dict
    from qdetr.zoo.hub import PRETRAINED_INFO_ATTR, model_config_dict
    from qdetr.zoo.labels import default_id2label

    converted, report = convert_release_state_dict(dict(state), bits=bits)
    model = _build_release_model(bits, _report_field(report, "config"), model_name)
    model.load_state_dict(converted, strict=True)
    model.eval()
    _smoke_check(model)
    model.id2label = default_id2label(model.config.num_classes)
    info = dict(provenance or {})
    info["conversion"] = _conversion_summary(report)
    setattr(model, PRETRAINED_INFO_ATTR, model_config_dict(model, provenance=info))
    return model


def load_release_checkpoint(
    path: str | os.PathLike,
    *,
    bits: int | None = None,
    sha256: str | None = None,
    provenance: dict[str, Any] | None = None,
    model_name: str = RELEASE_MODEL_NAME,
) -> nn.Module:
    """Load a release ``.pth`` file into a ready quantized model.

    Args:
        path: the release checkpoint.
        bits: bit width (required unless ``args.n_bit`` or the file name gives it).
        sha256: the file's SHA-256 if already known (computed otherwise).
        provenance: extra provenance entries (zoo name, source URL, ...).
        model_name: registry entry to build (see :func:`model_from_release_state_dict`).

    Returns:
        The model in eval mode (``model.id2label`` holds the COCO names).

    Raises:
        BitWidthError: missing or contradictory bit width.
        UnsafeCheckpointError: the pickle needs a global outside the allow-list.
        ValueError: the file is not in the release layout (the converter says why).

    Examples:
        A test-sized file in the release layout (``ckpt_4_bit`` in the name gives the width):

        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from qdetr.models import model_config
        >>> from qdetr.testing import make_release_state_dict
        >>> from qdetr.zoo import load_release_checkpoint
        >>> state = make_release_state_dict(config=model_config("qdetr_smca_tiny"))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = Path(tmp) / "ckpt_4_bit_tiny.pth"
        ...     torch.save({"model": state, "epoch": 49}, path)
        ...     model = load_release_checkpoint(path, model_name="qdetr_smca_tiny")
        >>> provenance = model.qdetr_pretrained_config["provenance"]
        >>> model.training, provenance["bits"], provenance["bits_source"], provenance["epoch"]
        (False, 4, 'file name', 49)
        >>> model = load_release_checkpoint("ckpt_4_bit_smca_detr_coco.pth")  # doctest: +SKIP
    """
    path = Path(path)
    checkpoint = load_checkpoint_file(path)
    resolved, source = resolve_release_bits(checkpoint, bits=bits, filename=path.name)
    try:
        state, extras = release_state_dict(checkpoint)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from err
    check_layer_indices(state.keys(), source=str(path))
    info = {
        "source_format": "qdetr-release (Hzbupahaozi/Q-DETR seed layout)",
        "source_file": path.name,
        "source_sha256": sha256 or sha256_file(path),
        "bits": resolved,
        "bits_source": source,
        **extras,
        **(provenance or {}),
    }
    logger.info("converting %s at %d bits (from %s)", path.name, resolved, source)
    return model_from_release_state_dict(state, bits=resolved, provenance=json.loads(json.dumps(_jsonable(info))),
                                         model_name=model_name)
