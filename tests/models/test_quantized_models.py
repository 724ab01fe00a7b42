"""Quantized SMCA entries built with qdetr.quant (seed and paper profiles)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qdetr.distill.alignment import DistributionAlignment
from qdetr.models import create_model, list_models
from qdetr.quant import LSQActQuantizer, LSQWeightQuantizer, QuantLinear, QuantMultiheadAttention
from qdetr.testing import example_inputs


def test_registered():
    assert {"qdetr_smca_r50", "qdetr_smca_tiny"} <= set(list_models())


def test_seed_profile_layout():
    model = create_model("qdetr_smca_tiny", bits=4, profile="seed")
    for layer in model.transformer.decoder.layers:
        sa, ca = layer.self_attn, layer.multihead_attn
        assert isinstance(sa, QuantMultiheadAttention) and isinstance(ca, QuantMultiheadAttention)
        assert isinstance(sa.q_align, DistributionAlignment) and sa.q_align.unbiased
        assert isinstance(ca.q_align, nn.Identity)
        # Cross-attention projections stay float; its per-head quantizers are live (8-bit).
        assert isinstance(ca.in_proj_weight_quantizer, nn.Identity)
        assert not isinstance(ca.out_proj, QuantLinear) or ca.out_proj.weight_quantizer is None
        assert isinstance(ca.q_quantizer, LSQActQuantizer) and ca.q_quantizer.bits == 8
        assert isinstance(sa.in_proj_weight_quantizer, LSQWeightQuantizer) and sa.in_proj_weight_quantizer.bits == 4
        assert isinstance(sa.q_input_quantizer, nn.Identity)
    body = model.backbone[0].body
    assert body.conv1.weight_quantizer.bits == 8
    assert body.layer1[0].conv2.weight_quantizer.bits == 4
    assert type(body.layer1[0].downsample[0]) is nn.Conv2d
    for name in ("input_proj", "class_embed"):
        assert type(getattr(model, name)) in (nn.Conv2d, nn.Linear)
    assert model.query_embed.weight.shape == (10, 64)


def test_paper_profile_moves_alignment_to_cross_attention():
    model = create_model("qdetr_smca_tiny", bits=2, profile="paper")
    for layer in model.transformer.decoder.layers:
        assert isinstance(layer.multihead_attn.q_align, DistributionAlignment)
        assert not layer.multihead_attn.q_align.unbiased
        assert isinstance(layer.self_attn.q_align, nn.Identity)
        assert isinstance(layer.multihead_attn.in_proj_weight_quantizer, LSQWeightQuantizer)
        assert isinstance(layer.multihead_attn.q_input_quantizer, LSQActQuantizer)


@pytest.mark.parametrize("profile", ["seed", "paper"])
def test_calibrate_then_any_batch_size(profile):
    model = create_model("qdetr_smca_tiny", bits=4, profile=profile).train()
    model(*example_inputs(2))  # first training forward calibrates the activation steps
    model.eval()
    with torch.no_grad():
        for bs in (1, 3):
            out = model(*example_inputs(bs))
            assert out["pred_logits"].shape == (bs, 10, 6)
            assert out["co_attn_features"].shape == (2, bs, 10, 32)
            assert torch.isfinite(out["pred_boxes"]).all()
        model.double()
        out64 = model(*example_inputs(2, dtype=torch.float64))
    assert out64["pred_logits"].dtype == torch.float64 and torch.isfinite(out64["pred_logits"]).all()


def test_bad_bits_and_profile():
    with pytest.raises(ValueError, match="bits"):
        create_model("qdetr_smca_tiny", bits=1)
    with pytest.raises(ValueError, match="profile"):
        create_model("qdetr_smca_tiny", profile="fast")
