"""Explicit calibration of activation quantizers.

Activation steps and zero points are initialised from data (method.md section 3.3): either
by an explicit pass (this module) or on the first training forward of a quantizer that was
never calibrated. Under ``torch.distributed`` the statistics are all-reduced inside each
quantizer, so every rank ends with identical steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from qdetr.quant.quantizers import LSQActQuantizer

__all__ = ["calibration", "calibrate"]


@contextlib.contextmanager
def calibration(model: nn.Module, *, recalibrate: bool = False) -> Iterator[nn.Module]:
    """Context in which the next forward calibrates activation quantizers.

    Every :class:`LSQActQuantizer` of ``model`` initialises its step and zero point from
    the next tensor it sees (method.md section 3.3), in train or eval mode; the flags are
    cleared on exit.

    Args:
        model: a quantized model.
        recalibrate: also re-initialise quantizers that are already calibrated.

    Yields:
        ``model``.

    Examples:
        >>> from qdetr.quant import quantize_model
        >>> _ = torch.manual_seed(0)
        >>> model = quantize_model(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), bits=4).eval()
        >>> images = torch.randn(32, 16)                  # (B, in_features)
        >>> with calibration(model), torch.no_grad():
        ...     _ = model(images)
        >>> model[2].input_quantizer.is_initialized, model(images).shape
        (True, torch.Size([32, 4]))
    """
    quantizers = [m for m in model.modules() if isinstance(m, LSQActQuantizer)]
    for q in quantizers:
        q.calibrating = recalibrate or not q.is_initialized
    try:
        yield model
    finally:
        for q in quantizers:
            q.calibrating = False


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    recalibrate: bool = False,
) -> nn.Module:
    """Calibrate every activation quantizer of ``model`` from the first batch of ``batches``.

    Each quantizer is initialised from the first batch that reaches it (method.md section 3.3:
    the seed rule uses one batch). The model's train/eval mode is left unchanged.

    Args:
        model: a quantized model.
        batches: an iterable of inputs (e.g. image batches (B, 3, H, W)); each is passed to
            ``forward_fn(model, batch)`` (default: ``model(batch)``, or ``model(*batch)`` for
            tuples, ``model(**batch)`` for dicts).
        forward_fn: custom call.
        recalibrate: re-initialise quantizers that are already calibrated.

    Returns:
        ``model``.

    Raises:
        ValueError: if ``batches`` is empty.

    Examples:
        >>> import qdetr
        >>> _ = torch.manual_seed(0)
        >>> model = qdetr.quantize_model(qdetr.create_model("detr_tiny"), bits=4).eval()
        >>> batches = [torch.randn(2, 3, 64, 64)]        # images (B, 3, H, W)
        >>> model = calibrate(model, batches)
        >>> model(batches[0])["pred_logits"].shape       # eval works once calibrated
        torch.Size([2, 10, 6])
    """
    if forward_fn is None:

        def forward_fn(m: nn.Module, batch: Any) -> Any:
            if isinstance(batch, dict):
                return m(**batch)
            if isinstance(batch, (tuple, list)):
                return m(*batch)
            return m(batch)

    seen = False
    with calibration(model, recalibrate=recalibrate):
        for batch in batches:
            seen = True
            forward_fn(model, batch)
            if all(not q.calibrating for q in model.modules() if isinstance(q, LSQActQuantizer)):
                break
    if not seen:
        raise ValueError("calibrate() needs at least one batch; got an empty iterable")
    return model
