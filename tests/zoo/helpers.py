"""Tiny quantized detectors for the zoo tests."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["tiny_quantized_smca", "detector_outputs"]


def tiny_quantized_smca(bits: int, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                        profile: str = "seed") -> nn.Module:
    """A calibrated tiny SMCA-DETR at ``bits``, with distribution alignment in the decoder self-attention.

    Built from the float ``smca_detr_tiny`` + ``quantize_model`` (not from the
    ``qdetr_smca_tiny`` registry entry), so the round trip is tested on a model assembled
    by hand as a user would.
    """
    from qdetr.distill.alignment import DistributionAlignment
    from qdetr.models import create_model
    from qdetr.quant import quantize_model

    torch.manual_seed(seed)
    model = create_model("smca_detr_tiny")
    quantize_model(model, bits=bits, profile=profile)
    for i, layer in enumerate(model.transformer.decoder.layers):
        align = DistributionAlignment(layer.self_attn.head_dim)
        with torch.no_grad():
            align.weight.uniform_(0.5, 1.5)
            align.bias.normal_(0.0, 0.1)
        layer.self_attn.q_align = align
    model.to(dtype).train()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64, generator=gen, dtype=torch.float64).to(dtype))  # calibrates
    return model.eval()


def detector_outputs(model: nn.Module, *, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pred_logits, pred_boxes)`` on a fixed padded batch of two images."""
    from qdetr.testing import example_inputs

    dtype = next(model.parameters()).dtype
    pixel_values, pixel_mask = example_inputs(2, sizes_hw=[(64, 80), (48, 64)], seed=seed, dtype=dtype)
    with torch.no_grad():
        out = model(pixel_values, pixel_mask)
    return out["pred_logits"], out["pred_boxes"]
