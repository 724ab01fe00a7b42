"""Output keys, shapes and internal consistency of the float models."""

from __future__ import annotations

import pytest
import torch

from qdetr.models import OUTPUT_KEYS, DetectionOutput, create_model
from qdetr.testing import example_inputs

TINY = ["detr_tiny", "smca_detr_tiny"]


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_output_keys_and_shapes(name, batch_size):
    model = create_model(name).eval()
    cfg = model.config
    pixel_values, pixel_mask = example_inputs(batch_size)
    with torch.no_grad():
        out = model(pixel_values, pixel_mask)
    assert isinstance(out, DetectionOutput)
    assert set(OUTPUT_KEYS) <= set(out)
    q, c, d, n_layers = cfg.num_queries, cfg.num_classes + 1, cfg.hidden_dim, cfg.dec_layers
    assert out["pred_logits"].shape == (batch_size, q, c)
    assert out["pred_boxes"].shape == (batch_size, q, 4)
    assert out["decoder_hidden_states"].shape == (n_layers, batch_size, q, d)
    assert out["co_attn_features"].shape == (n_layers, batch_size, q, d)
    assert len(out["aux_outputs"]) == n_layers - 1
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (batch_size, q, c)
        assert aux["pred_boxes"].shape == (batch_size, q, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    # The heads read the normalised decoder states.
    torch.testing.assert_close(model.class_embed(out["decoder_hidden_states"][-1]), out["pred_logits"])
    torch.testing.assert_close(model.class_embed(out["decoder_hidden_states"][0]), out["aux_outputs"][0]["pred_logits"])
    # HF-style attribute aliases.
    assert out.logits is out["pred_logits"]
    assert torch.equal(out.last_hidden_state, out["decoder_hidden_states"][-1])
    assert out.classification == ("sigmoid" if "smca" in name else "softmax")


@pytest.mark.parametrize("name", TINY)
def test_co_attn_features_are_pre_out_proj_values(name):
    """co_attn_features[l] @ out_proj == the cross-attention output of layer l."""
    model = create_model(name).eval()
    layer = model.transformer.decoder.layers[-1]
    captured = {}
    original = layer.multihead_attn.forward_with_values

    def wrapped(*args, **kwargs):
        res = original(*args, **kwargs)
        captured["out"] = res[0]
        return res

    layer.multihead_attn.forward_with_values = wrapped
    pixel_values, pixel_mask = example_inputs(2)
    with torch.no_grad():
        out = model(pixel_values, pixel_mask)
    values = out["co_attn_features"][-1]  # (B, Q, d)
    expected = captured["out"].transpose(0, 1)  # (Q, B, d) -> (B, Q, d)
    torch.testing.assert_close(layer.multihead_attn.out_proj(values), expected)


def test_no_aux_outputs_when_disabled():
    model = create_model("detr_tiny", aux_loss=False).eval()
    out = model(*example_inputs(1))
    assert out["aux_outputs"] == []


def test_smca_query_layouts():
    official = create_model("smca_detr_tiny").eval()
    release = create_model("smca_detr_tiny", query_width=64).eval()
    assert official.query_embed.weight.shape == (10, 32)
    assert release.query_embed.weight.shape == (10, 64)
    pos, tgt = release.query_split()
    assert pos.shape == tgt.shape == (10, 32)
    out = release(*example_inputs(2))
    assert out["pred_logits"].shape == (2, 10, 6)
    with pytest.raises(ValueError, match="query_width"):
        create_model("smca_detr_tiny", query_width=48)


def test_smca_dynamic_scale_types_build_and_run():
    for kind, cols in (("type1", None), ("type2", 4), ("type3", 8), ("type4", 12)):
        model = create_model("smca_detr_tiny", dynamic_scale=kind).eval()
        point3 = model.transformer.decoder.layers[0].point3
        if cols is None:
            assert point3 is None
        else:
            assert point3.weight.shape == (cols, 32)
            assert torch.all(point3.weight == 0) and torch.all(point3.bias == 1)
        out = model(*example_inputs(2))
        assert torch.isfinite(out["pred_boxes"]).all()


def test_smca_classifier_prior_bias():
    model = create_model("smca_detr_tiny")
    torch.testing.assert_close(model.class_embed.bias, torch.full((6,), -4.59511985013459), rtol=0, atol=1e-6)
