"""Parity with a compact reference of the original algorithms built on nn.MultiheadAttention.

The reference layers below follow the published descriptions (method.md 5.1-5.2): post-norm
DETR layers on ``torch.nn.MultiheadAttention`` (as facebookresearch/detr uses) and the SMCA
Gaussian prior computed in the original's (B*h) head-interleaved layout and passed as an
additive 3-D ``attn_mask``. They are loaded with our weights (``strict=True``: the names
match) and must give the same outputs in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qdetr.models import create_model
from qdetr.testing import example_inputs


class RefEncoderLayer(nn.Module):
    def __init__(self, d, h, f):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, h)
        self.linear1, self.linear2 = nn.Linear(d, f), nn.Linear(f, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, src, mask, pos):
        q = k = src + pos
        src = self.norm1(src + self.self_attn(q, k, src, key_padding_mask=mask)[0])
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class RefDecoderLayer(nn.Module):
    def __init__(self, d, h, f):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, h)
        self.multihead_attn = nn.MultiheadAttention(d, h)
        self.linear1, self.linear2 = nn.Linear(d, f), nn.Linear(f, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, tgt, memory, mask, pos, query_pos, attn_mask=None):
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, k, tgt)[0])
        if attn_mask is not None:  # same mask type for both (float), as torch asks
            mask = torch.zeros(mask.shape, dtype=tgt.dtype).masked_fill(mask, float("-inf"))
        tgt2 = self.multihead_attn(tgt + query_pos, memory + pos, memory, key_padding_mask=mask, attn_mask=attn_mask)[0]
        tgt = self.norm2(tgt + tgt2)
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class RefSmcaDecoderLayer(RefDecoderLayer):
    """SMCA layer: predictors on norm4(tgt + query_pos), prior in the (B*h) layout."""

    def __init__(self, d, h, f, index):
        super().__init__(d, h, f)
        self.h = h
        self.norm4 = nn.LayerNorm(d)
        if index == 0:
            self.point1 = nn.Module()
            self.point1.layers = nn.ModuleList([nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 2)])
        self.point2 = nn.Linear(d, 2 * h)
        self.point3 = nn.Linear(d, 2 * h)  # type3

    def forward(self, tgt, memory, mask, pos, query_pos, grid, h_w, ref_prev):
        nq = tgt.shape[0]
        out = self.norm4(tgt + query_pos)
        offset = self.point2(out)
        ref_logits = None
        if ref_prev is None:
            x = out
            for i, layer in enumerate(self.point1.layers):
                x = layer(x) if i == 2 else F.relu(layer(x))
            ref_logits = x
            ref = (h_w * x.sigmoid() / 32).repeat(1, 1, self.h)  # (Q, B, 2h)
        else:
            ref = ref_prev
        point = (ref + offset).view(nq, -1, 2)  # (Q, B*h, 2)
        distance = (point.unsqueeze(1) - grid.unsqueeze(0)).pow(2)  # (Q, S, B*h, 2)
        scale = self.point3(out)
        scale = (scale * scale).reshape(nq, -1, 2).unsqueeze(1)
        distance = (distance * scale).sum(-1)  # (Q, S, B*h)
        gaussian = -distance.abs() / 8.0
        attn_mask = gaussian.permute(2, 0, 1)  # (B*h, Q, S)
        return super().forward(tgt, memory, mask, pos, query_pos, attn_mask), ref, ref_logits


def _prepare(model, pixel_values, pixel_mask):
    padding = pixel_mask == 0
    feats, mask, pos = model.backbone(pixel_values, padding)
    src = model.input_proj(feats)
    bs, _, h, w = src.shape
    return src.flatten(2).permute(2, 0, 1), mask.flatten(1), pos.flatten(2).permute(2, 0, 1), bs, h, w


def test_detr_transformer_matches_nn_multihead_attention_reference():
    model = create_model("detr_tiny").eval().double()
    cfg = model.config
    enc = nn.ModuleList(RefEncoderLayer(cfg.hidden_dim, cfg.nheads, cfg.dim_feedforward) for _ in range(cfg.enc_layers))
    dec = nn.ModuleList(RefDecoderLayer(cfg.hidden_dim, cfg.nheads, cfg.dim_feedforward) for _ in range(cfg.dec_layers))
    enc.load_state_dict(model.transformer.encoder.layers.state_dict(), strict=True)
    dec.load_state_dict(model.transformer.decoder.layers.state_dict(), strict=True)
    enc.double().eval()
    dec.double().eval()
    pixel_values, pixel_mask = example_inputs(3, dtype=torch.float64)
    with torch.no_grad():
        out = model(pixel_values, pixel_mask)
        src, mask, pos, bs, _, _ = _prepare(model, pixel_values, pixel_mask)
        memory = src
        for layer in enc:
            memory = layer(memory, mask, pos)
        query_pos = model.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        tgt = torch.zeros_like(query_pos)
        for layer in dec:
            tgt = layer(tgt, memory, mask, pos, query_pos)
        hidden = model.transformer.decoder.norm(tgt).transpose(0, 1)
    torch.testing.assert_close(out["decoder_hidden_states"][-1], hidden, rtol=0, atol=1e-10)
    torch.testing.assert_close(out["pred_boxes"], model.bbox_embed(hidden).sigmoid(), rtol=0, atol=1e-10)


def test_smca_matches_reference_in_original_head_layout():
    model = create_model("smca_detr_tiny", query_width=64).eval().double()
    cfg = model.config
    with torch.no_grad():  # non-trivial scales and offsets
        for layer in model.transformer.decoder.layers:
            layer.point3.weight.normal_(0, 0.05)
            layer.point2.weight.normal_(0, 0.05)
    d, h, f = cfg.hidden_dim, cfg.nheads, cfg.dim_feedforward
    enc = nn.ModuleList(RefEncoderLayer(d, h, f) for _ in range(cfg.enc_layers))
    dec = nn.ModuleList(RefSmcaDecoderLayer(d, h, f, i) for i in range(cfg.dec_layers))
    enc.load_state_dict(model.transformer.encoder.layers.state_dict(), strict=True)
    dec.load_state_dict(model.transformer.decoder.layers.state_dict(), strict=True)
    enc.double().eval()
    dec.double().eval()
    pixel_values, pixel_mask = example_inputs(3, dtype=torch.float64)
    with torch.no_grad():
        out = model(pixel_values, pixel_mask)
        src, mask, pos, bs, fh, fw = _prepare(model, pixel_values, pixel_mask)
        memory = src
        for layer in enc:
            memory = layer(memory, mask, pos)
        gy, gx = torch.meshgrid(torch.arange(fh), torch.arange(fw), indexing="ij")
        grid = torch.stack((gx, gy), 2).double().reshape(-1, 2).unsqueeze(1).repeat(1, bs * h, 1)
        sizes_hw = [(96, 128), (80, 100), (64, 120)]  # example_inputs defaults
        h_w = torch.tensor([[w, hh] for hh, w in sizes_hw]).unsqueeze(0)  # (1, B, 2) in (w, h)
        weight = model.query_embed.weight
        query_pos = weight[:, :d].unsqueeze(1).repeat(1, bs, 1)
        tgt = weight[:, d:].unsqueeze(1).repeat(1, bs, 1)
        ref, ref_logits = None, None
        for layer in dec:
            tgt, ref, logits = layer(tgt, memory, mask, pos, query_pos, grid, h_w, ref)
            ref_logits = logits if logits is not None else ref_logits
        hidden = model.transformer.decoder.norm(tgt).transpose(0, 1)
        raw = model.bbox_embed(hidden)
        boxes = torch.cat([raw[..., :2] + ref_logits.transpose(0, 1), raw[..., 2:]], -1).sigmoid()
    # Gaussian logits reach -1e2, so the different order of the 1/sqrt(d_h) scaling costs
    # ~1e-9 in float64; a wrong prior or head layout would show O(1) differences.
    torch.testing.assert_close(out["decoder_hidden_states"][-1], hidden, rtol=0, atol=1e-8)
    torch.testing.assert_close(out["pred_boxes"], boxes, rtol=0, atol=1e-8)
