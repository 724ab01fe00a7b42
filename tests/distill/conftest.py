"""Tiny detectors for the distillation tests (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qdetr.layers import MultiheadAttention


class ToyDecoderLayer(nn.Module):
    """Post-norm DETR decoder layer built from qdetr.layers.MultiheadAttention."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, num_heads)
        self.multihead_attn = MultiheadAttention(d_model, num_heads)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, tgt, memory, query_pos):  # tgt (Q, B, d), memory (S, B, d)
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, q, tgt, need_weights=False)[0])
        out, _, values = self.multihead_attn.forward_with_values(tgt + query_pos, memory, memory)
        tgt = self.norm2(tgt + out)
        return tgt, values  # values (Q, B, d)


class ToyDecoder(nn.Module):
    def __init__(self, d_model: int, num_heads: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ToyDecoderLayer(d_model, num_heads) for _ in range(num_layers))


class ToyDetector(nn.Module):
    """Images are replaced by token sets (B, S, in_dim); returns the qdetr native output keys."""

    def __init__(self, d_model=32, num_heads=4, num_layers=2, num_queries=12, in_dim=8) -> None:
        super().__init__()
        self.backbone = nn.Linear(in_dim, d_model)
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.decoder = ToyDecoder(d_model, num_heads, num_layers)
        self.bbox_embed = nn.Linear(d_model, 4)

    def forward(self, tokens):  # (B, S, in_dim)
        memory = self.backbone(tokens).transpose(0, 1)  # (S, B, d)
        bsz = tokens.shape[0]
        query_pos = self.query_embed.weight[:, None].expand(-1, bsz, -1)
        tgt = torch.zeros_like(query_pos)
        values = []
        for layer in self.decoder.layers:
            tgt, v = layer(tgt, memory, query_pos)
            values.append(v.transpose(0, 1))  # (B, Q, d)
        hidden = tgt.transpose(0, 1)  # (B, Q, d)
        return {
            "pred_boxes": self.bbox_embed(hidden).sigmoid(),
            "co_attn_features": torch.stack(values),  # (L, B, Q, d)
            "last_hidden_state": hidden,
        }


@pytest.fixture
def toy_detector():
    def build(seed=0, **kwargs):
        torch.manual_seed(seed)
        return ToyDetector(**kwargs)

    return build


@pytest.fixture
def random_boxes():
    """``random_boxes(generator, *shape)``: random valid normalised cxcywh boxes (*shape, 4), float64."""

    def make(generator, *shape, dtype=torch.float64):
        centre = torch.rand(*shape, 2, generator=generator, dtype=dtype) * 0.8 + 0.1
        size = torch.rand(*shape, 2, generator=generator, dtype=dtype) * 0.5 + 0.02
        return torch.cat([centre, size], dim=-1)

    return make


def hf_detr_config(kind="detr", num_queries=10, d_model=32, decoder_layers=2):
    """Tiny Hugging Face DETR / ConditionalDETR config; no download (HF ResNet, random init)."""
    transformers = pytest.importorskip("transformers")
    backbone = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", out_features=["stage2"]
    )
    common = dict(
        backbone_config=backbone,
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        d_model=d_model,
        encoder_layers=1,
        decoder_layers=decoder_layers,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_queries=num_queries,
        num_labels=5,
    )
    if kind == "detr":
        return transformers.DetrConfig(**common), transformers.DetrForObjectDetection
    return transformers.ConditionalDetrConfig(**common), transformers.ConditionalDetrForObjectDetection


@pytest.fixture
def hf_detector():
    def build(kind="detr", seed=0, **kwargs):
        config, cls = hf_detr_config(kind, **kwargs)
        torch.manual_seed(seed)
        model = cls(config)
        # A freshly initialised DETR predicts nearly the same box for every query; spread the
        # boxes as a trained model would so that matching has no ties.
        with torch.no_grad():
            model.bbox_predictor.layers[-1].weight.normal_(0.0, 0.5)
        return model

    return build
