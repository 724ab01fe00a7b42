"""Helpers for tests and examples: tiny models, example inputs and synthetic checkpoints.

* :func:`tiny_detr`, :func:`tiny_smca`: test-sized float models (seconds on a CPU);
* :func:`example_inputs`: a padded batch of differently sized random images;
* :func:`example_targets`: random DETR-style targets (labels, normalised cxcywh boxes);
* :func:`make_release_state_dict`: a state dict in the Q-DETR release (seed) layout,
  with valid random values, built from the release manifest (full size) or from a config
  (tiny widths for unit tests).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdetr.zoo.release_format import release_layout_entries

__all__ = [
    "tiny_detr",
    "tiny_smca",
    "example_inputs",
    "example_targets",
    "release_manifest_path",
    "load_release_manifest",
    "release_layout_entries",
    "make_release_state_dict",
]


def tiny_detr(**overrides) -> nn.Module:
    """``create_model("detr_tiny", **overrides)`` in eval mode.

    Examples:
        >>> import torch
        >>> from qdetr.testing import example_inputs, tiny_detr
        >>> model = tiny_detr(num_queries=4)
        >>> with torch.no_grad():
        ...     out = model(*example_inputs(2))
        >>> model.training, out["pred_logits"].shape, out["pred_boxes"].shape
        (False, torch.Size([2, 4, 6]), torch.Size([2, 4, 4]))
    """
    from qdetr.models import create_model

    return create_model("detr_tiny", **overrides).eval()


def tiny_smca(**overrides) -> nn.Module:
    """``create_model("smca_detr_tiny", **overrides)`` in eval mode.

    Examples:
        >>> from qdetr.testing import tiny_smca
        >>> model = tiny_smca()
        >>> model.training, model.classification, model.config.hidden_dim
        (False, 'sigmoid', 32)
    """
    from qdetr.models import create_model

    return create_model("smca_detr_tiny", **overrides).eval()


def example_inputs(
    batch_size: int = 2,
    *,
    sizes_hw: Sequence[tuple[int, int]] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A zero-padded batch of random normalised images and its mask.

    Args:
        batch_size: B (ignored when ``sizes_hw`` is given).
        sizes_hw: per-image (height, width); default: 96x128 for the first image and
            smaller ones after it, so that all but the first are padded.
        seed: RNG seed.
        dtype: floating dtype of ``pixel_values``.

    Returns:
        ``(pixel_values (B, 3, H, W), pixel_mask (B, H, W) int64, 1 = real pixel)``.

    Examples:
        >>> from qdetr.testing import example_inputs
        >>> pixel_values, pixel_mask = example_inputs(3)
        >>> pixel_values.shape, pixel_mask.shape
        (torch.Size([3, 3, 96, 128]), torch.Size([3, 96, 128]))
        >>> pixel_mask.sum(dim=(1, 2)).tolist()  # 96*128, 80*100, 64*120 real pixels
        [12288, 8000, 7680]
    """
    from qdetr.models.preprocessing import pad_and_mask

    if sizes_hw is None:
        default = [(96, 128), (80, 100), (64, 120), (90, 70)]
        sizes_hw = [default[i % len(default)] for i in range(batch_size)]
    gen = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, h, w, generator=gen, dtype=torch.float64).to(dtype) for h, w in sizes_hw]
    return pad_and_mask(images)


def example_targets(
    batch_size: int = 2,
    *,
    num_classes: int = 5,
    boxes_per_image: int | Sequence[int] = 3,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Random targets: ``labels`` (T,) int64 in [0, num_classes) and ``boxes`` (T, 4) cxcywh.

    Args:
        batch_size: number of target dicts B (ignored when ``boxes_per_image`` is a sequence).
        num_classes: labels are drawn from ``[0, num_classes)``.
        boxes_per_image: T for every image, or one T per image.
        seed: RNG seed.

    Returns:
        B dicts with ``labels`` (T_b,) int64 and ``boxes`` (T_b, 4) normalised cxcywh
        (centres in [0.2, 0.8], sizes in [0.05, 0.35]).

    Examples:
        >>> from qdetr.testing import example_targets
        >>> targets = example_targets(boxes_per_image=[2, 0])
        >>> first, second = targets
        >>> tuple(first["boxes"].shape), tuple(second["boxes"].shape), first["labels"].dtype
        ((2, 4), (0, 4), torch.int64)
    """
    gen = torch.Generator().manual_seed(seed)
    counts = [boxes_per_image] * batch_size if isinstance(boxes_per_image, int) else list(boxes_per_image)
    targets = []
    for n in counts:
        centre = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
        size = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
        targets.append(
            {
                "labels": torch.randint(0, num_classes, (n,), generator=gen),
                "boxes": torch.cat([centre, size], dim=-1),
            }
        )
    return targets


def release_manifest_path() -> Path:
    """Path of the shared release manifest (``<repo>/../shared/fixtures/qdetr-seed-smca-r50``)."""
    return (
        Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "qdetr-seed-smca-r50"
        / "state_dict_manifest.json"
    )


def load_release_manifest(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read the release manifest JSON (default: :func:`release_manifest_path`)."""
    path = release_manifest_path() if path is None else Path(path)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _random_value(key: str, shape: Sequence[int], gen: torch.Generator) -> torch.Tensor:
    """A plausible random tensor for a release-layout key (positive steps and variances)."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "alpha":
        return torch.rand(shape, generator=gen) * 0.05 + 0.01
    if leaf == "zero_point":
        return torch.randn(shape, generator=gen) * 0.3
    if leaf == "running_var":
        return torch.rand(shape, generator=gen) * 0.5 + 0.75
    if leaf == "running_mean":
        return torch.randn(shape, generator=gen) * 0.05
    if key.endswith("norm_q.scale") or key.endswith("prelu.weight") or ".prelu" in key:
        return torch.rand(shape, generator=gen) * 0.5 + 0.25
    if (key.split(".")[-2].startswith("norm") or key.split(".")[-2].startswith("bn") or ".downsample.1." in key) and leaf == "weight":
        return 1.0 + 0.05 * torch.randn(shape, generator=gen)
    if len(shape) >= 2:
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        return torch.randn(shape, generator=gen) / max(fan_in, 1) ** 0.5
    return torch.randn(shape, generator=gen) * 0.02


def make_release_state_dict(
    manifest: str | os.PathLike | Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    config=None,
) -> dict[str, torch.Tensor]:
    """A state dict in the Q-DETR release layout with valid random values.

    Steps are positive, BN variances positive, ``init_state``/``signed`` flags are those
    of the manifest (calibrated, 1, for every live quantizer, 0 for the dead ones), and the
    ``in_proj_weight``/``in_proj_bias`` aliases are the same tensors as ``in_proj.weight`` /
    ``in_proj.bias``, as in a saved release file.

    Args:
        manifest: path or parsed manifest (its ``entries``); None with ``config`` builds the
            entries from the config (:func:`~qdetr.zoo.release_format.release_layout_entries`), None without
            ``config`` reads the shared manifest.
        seed: RNG seed.
        config: an ``SmcaConfig`` (``backbone_unit="bireal"``) for other sizes (tests use
            tiny widths); ignored when ``manifest`` is given.

    Returns:
        ``{key: tensor}`` in manifest order, float32.

    Examples:
        >>> from qdetr.models import model_config
        >>> from qdetr.zoo.release_format import load_release_state_dict
        >>> from qdetr.testing import make_release_state_dict
        >>> state = make_release_state_dict(config=model_config("qdetr_smca_tiny"))
        >>> state["transformer.encoder.layers.0.self_attn.in_proj_weight"] is state[
        ...     "transformer.encoder.layers.0.self_attn.in_proj.weight"]
        True
        >>> model, report = load_release_state_dict(state, bits=4)
        >>> report.config.hidden_dim
        32
        >>> full_size = make_release_state_dict()  # doctest: +SKIP
    """
    if manifest is None and config is not None:
        entries = release_layout_entries(config)
    else:
        data = manifest if isinstance(manifest, Mapping) else load_release_manifest(manifest)
        entries = data["entries"]
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for entry in entries:
        key, shape = entry["key"], entry["shape"]
        if "value" in entry:
            state[key] = torch.full(shape, float(entry["value"]))
        else:
            state[key] = _random_value(key, shape, gen)
    for key in list(state):
        for alias, target in ((".in_proj_weight", ".in_proj.weight"), (".in_proj_bias", ".in_proj.bias")):
            if key.endswith(alias):
                state[key] = state[key[: -len(alias)] + target]
    return state
