"""DistributionAlignment and its insertion into decoder attention slots."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qdetr.distill import DistributionAlignment, insert_distribution_alignment


def test_alignment_standardises_per_token_and_head():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 8, dtype=torch.float64) * 3 + 1
    out = DistributionAlignment(8)(q)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 4, 5, dtype=torch.float64), atol=1e-12, rtol=0)
    expected = (q - q.mean(-1, keepdim=True)) / torch.sqrt(q.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(out, expected)
    unbiased = DistributionAlignment(8, unbiased=True)(q)
    torch.testing.assert_close(
        unbiased, (q - q.mean(-1, keepdim=True)) / torch.sqrt(q.var(-1, unbiased=True, keepdim=True) + 1e-5)
    )
    assert not torch.allclose(out, unbiased)


@pytest.mark.parametrize("where, attr", [("cross", "multihead_attn"), ("self", "self_attn")])
def test_insert_fills_only_the_requested_decoder_slots(toy_detector, where, attr):
    model = toy_detector(num_layers=2)
    x = torch.randn(2, 16, 8)
    before = model(x)["co_attn_features"]
    names = insert_distribution_alignment(model, where=where, unbiased=True)
    assert names == [f"decoder.layers.{i}.{attr}" for i in range(2)]
    other = "self_attn" if attr == "multihead_attn" else "multihead_attn"
    for layer in model.decoder.layers:
        align = getattr(layer, attr).q_align
        assert isinstance(align, DistributionAlignment) and align.unbiased and align.head_dim == 8
        assert isinstance(getattr(layer, other).q_align, nn.Identity)
    assert any(k.endswith(f"{attr}.q_align.weight") for k in model.state_dict())
    after = model(x)["co_attn_features"]
    assert not torch.allclose(before, after)  # DA is in the data path
    with pytest.raises(ValueError, match="already holds DistributionAlignment"):
        insert_distribution_alignment(model, where=where)


def test_insert_follows_dtype_and_skips_encoder(toy_detector):
    model = toy_detector().double()
    # an encoder attention with the same leaf name must not be touched
    from qdetr.layers import MultiheadAttention

    model.encoder = nn.Module()
    model.encoder.layers = nn.ModuleList([nn.Module()])
    model.encoder.layers[0].self_attn = MultiheadAttention(32, 4).double()
    insert_distribution_alignment(model, where="self")
    assert isinstance(model.encoder.layers[0].self_attn.q_align, nn.Identity)
    assert model.decoder.layers[0].self_attn.q_align.weight.dtype == torch.float64
    assert model(torch.randn(1, 16, 8, dtype=torch.float64))["pred_boxes"].dtype == torch.float64


def test_insert_errors():
    with pytest.raises(ValueError, match="where must be"):
        insert_distribution_alignment(nn.Linear(2, 2), where="encoder")
    with pytest.raises(ValueError, match="q_align"):
        insert_distribution_alignment(nn.Sequential(nn.Linear(2, 2)), where="cross")
