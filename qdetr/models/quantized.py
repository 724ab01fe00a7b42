"""Quantized SMCA-DETR as in Q-DETR (method.md 4, 5.3, 6): built with :mod:`qdetr.quant`.

``build_qdetr_smca(config, bits=4, profile="seed")``:

1. builds :class:`~qdetr.models.smca.SmcaDetr` from ``config`` (for the release layout:
   ``backbone_unit="bireal"``, ``query_width = 2 * hidden_dim``);
2. places :class:`qdetr.distill.alignment.DistributionAlignment` (``head_dim``) in the
   ``q_align`` slot of every decoder **self**-attention (``"seed"`` profile, unbiased variance
   as in the released checkpoints) or every decoder **cross**-attention (``"paper"``
   profile, biased variance), as :data:`qdetr.distill.alignment.ALIGNMENT_BY_PROFILE` says
   (the trainer and the loaders use the same definition);
3. calls :func:`qdetr.quant.quantize_model` with ``bits`` and ``profile`` (or a full
   ``QuantConfig``), which decides which layers get which bits.
"""

from __future__ import annotations

from torch import nn

from qdetr.models.config import SmcaConfig
from qdetr.models.smca import SmcaDetr

__all__ = ["build_qdetr_smca", "place_distribution_alignment", "PROFILES_DA_SLOT"]

#: Which decoder attention gets distribution alignment in each profile (derived from
#: :data:`qdetr.distill.alignment.ALIGNMENT_BY_PROFILE`, the one definition; kept for
#: compatibility).
PROFILES_DA_SLOT = {"seed": "self_attn", "paper": "multihead_attn"}


def place_distribution_alignment(model: SmcaDetr, profile: str) -> list[str]:
    """Deprecated: use ``qdetr.distill.insert_distribution_alignment(model, profile=profile)``.

    Returns:
        Qualified names of the attention modules that received one.

    Examples:
        >>> from qdetr.models import create_model
        >>> from qdetr.models.quantized import place_distribution_alignment
        >>> place_distribution_alignment(create_model("smca_detr_tiny"), "seed")[0]  # doctest: +SKIP
        'transformer.decoder.layers.0.self_attn'
    """
    import warnings

    from qdetr.distill.alignment import insert_distribution_alignment

    warnings.warn(
        "place_distribution_alignment is deprecated; use qdetr.distill.insert_distribution_alignment(model, "
        "profile=...)",
        DeprecationWarning,
        stacklevel=2,
    )
    return insert_distribution_alignment(model, profile=profile)


def build_qdetr_smca(
    config: SmcaConfig,
    *,
    bits: int = 4,
    profile: str = "seed",
    quant_config=None,
) -> nn.Module:
    """Quantized SMCA-DETR.

    Args:
        config: the float architecture (:class:`~qdetr.models.config.SmcaConfig`).
        bits: b of "W b / A b / Attn 8" (2, 3 or 4 for the Q-DETR settings).
        profile: ``"seed"`` (released checkpoints) or ``"paper"``. The default differs from
            :func:`qdetr.quant.quantize_model`'s ``"paper"`` on purpose: this builder makes the
            release layout (the ``qdetr_*`` registry entries, :mod:`qdetr.zoo.release`), whose
            checkpoints were trained with the seed profile; ``quantize_model`` applies the method
            as published to any detector.
        quant_config: a full ``qdetr.quant.QuantConfig``; overrides ``bits`` and ``profile``
            (its ``profile`` decides the alignment slot).

    Returns:
        The quantized model (quantizer steps of activations still to be calibrated or loaded).
        Inputs and outputs are those of :class:`~qdetr.models.smca.SmcaDetr`:
        ``pixel_values`` (B, 3, H, W) -> ``pred_logits`` (B, Q, C+1), ``pred_boxes``
        (B, Q, 4) normalised cxcywh.

    Raises:
        TypeError: if ``config`` is not an ``SmcaConfig``.
        ValueError: for an unknown ``profile``.

    Examples:
        >>> import torch
        >>> from qdetr.models import build_qdetr_smca, model_config
        >>> from qdetr.quant import calibrate
        >>> model = build_qdetr_smca(model_config("qdetr_smca_tiny"), bits=4, profile="seed")
        >>> type(model.transformer.decoder.layers[0].self_attn.q_align).__name__
        'DistributionAlignment'
        >>> pixel_values = torch.randn(1, 3, 64, 64)
        >>> _ = calibrate(model, [pixel_values])
        >>> with torch.no_grad():
        ...     out = model.eval()(pixel_values)
        >>> out["pred_boxes"].shape
        torch.Size([1, 10, 4])
    """
    from qdetr.distill.alignment import insert_distribution_alignment
    from qdetr.quant import quantize_model

    if not isinstance(config, SmcaConfig):
        raise TypeError(f"build_qdetr_smca needs an SmcaConfig, got {type(config).__name__}")
    if quant_config is not None:
        profile = quant_config.profile
    model = SmcaDetr(config)
    insert_distribution_alignment(model, profile=profile)
    if quant_config is not None:
        quantize_model(model, config=quant_config)
    else:
        quantize_model(model, bits, profile=profile)
    return model
