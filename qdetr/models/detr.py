"""DETR (facebookresearch/detr ``models/detr.py``), any batch size, HF-style inputs.

``Detr(config)`` has the original module names, so a facebookresearch/detr ``detr-r50``
state dict loads with ``strict=True``:
``transformer.*``, ``class_embed``, ``bbox_embed.layers.{0,1,2}``, ``query_embed``,
``input_proj``, ``backbone.0.body.*``.

``forward(pixel_values, pixel_mask=None)`` returns a :class:`~qdetr.models.outputs.DetectionOutput`
(a dict) with:

* ``pred_logits`` (B, Q, C+1): class logits, the last column is "no object";
* ``pred_boxes`` (B, Q, 4): normalised cxcywh boxes in [0, 1];
* ``aux_outputs``: list of ``{"pred_logits", "pred_boxes"}`` for decoder layers 0..L-2;
* ``decoder_hidden_states`` (L, B, Q, d): each decoder layer's output after ``decoder.norm``;
* ``co_attn_features`` (L, B, Q, d): each decoder layer's cross-attention ``Â·V̂`` before
  ``out_proj`` (the distillation feature).
"""

from __future__ import annotations

import torch
from torch import nn

from qdetr.models.backbone import Backbone, BackboneWithPositionEncoding
from qdetr.models.config import DetrConfig
from qdetr.models.inputs import padding_mask_from_pixel_mask
from qdetr.models.mlp import MLP
from qdetr.models.outputs import DetectionOutput
from qdetr.models.position_encoding import PositionEmbeddingSine
from qdetr.models.pretrained_methods import PretrainedMethodsMixin
from qdetr.models.transformer import Transformer

__all__ = ["Detr", "build_backbone", "assemble_outputs"]


def build_backbone(config: DetrConfig) -> BackboneWithPositionEncoding:
    """ResNet trunk + sine position encoding for ``config`` (never downloads weights)."""
    backbone = Backbone(
        config.backbone,
        unit=config.backbone_unit,
        train_backbone=config.train_backbone,
        dilation=config.dilation,
    )
    return BackboneWithPositionEncoding(backbone, PositionEmbeddingSine(config.hidden_dim // 2, normalize=True))


def assemble_outputs(
    logits: torch.Tensor,
    boxes_cxcywh: torch.Tensor,
    hidden_states: torch.Tensor,
    co_attn_values: torch.Tensor,
    *,
    aux_loss: bool,
    classification: str,
) -> DetectionOutput:
    """Build the output dict from per-layer predictions.

    Args:
        logits: (L, B, Q, C+1).
        boxes_cxcywh: (L, B, Q, 4), normalised.
        hidden_states: (L, B, Q, d).
        co_attn_values: (L, B, Q, d).
        aux_loss: include layers 0..L-2 under ``aux_outputs``.
        classification: ``"softmax"`` or ``"sigmoid"``.
    """
    aux = []
    if aux_loss:
        aux = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes_cxcywh[:-1])]
    return DetectionOutput(
        classification=classification,
        pred_logits=logits[-1],
        pred_boxes=boxes_cxcywh[-1],
        aux_outputs=aux,
        decoder_hidden_states=hidden_states,
        co_attn_features=co_attn_values,
    )


class Detr(PretrainedMethodsMixin, nn.Module):
    """DEtection TRansformer.

    Args:
        config: architecture settings (:class:`~qdetr.models.config.DetrConfig`).

    Examples:
        >>> model = Detr(DetrConfig(backbone="resnet_tiny", hidden_dim=32, nheads=4,
        ...                         enc_layers=1, dec_layers=1, dim_feedforward=64, num_queries=5))
        >>> out = model(torch.randn(2, 3, 64, 64))
        >>> out["pred_boxes"].shape
        torch.Size([2, 5, 4])
    """

    def __init__(self, config: DetrConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_dim
        self.transformer = Transformer(
            d_model=d,
            nhead=config.nheads,
            num_encoder_layers=config.enc_layers,
            num_decoder_layers=config.dec_layers,
            dim_feedforward=config.dim_feedforward,
            dropout=config.dropout,
        )
        self.class_embed = nn.Linear(d, config.num_classes + 1)
        self.bbox_embed = MLP(d, d, 4, 3)
        self.query_embed = nn.Embedding(config.num_queries, d)
        # The backbone is registered before input_proj so that its stem is the first Conv2d
        # in module order (quantize_model's stem rule); state-dict keys are unaffected.
        self.backbone = build_backbone(config)
        self.input_proj = nn.Conv2d(self.backbone.num_channels, d, kernel_size=1)

    @property
    def classification(self) -> str:
        """``"softmax"``: the head is trained with cross-entropy over C+1 classes."""
        return "softmax"

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> DetectionOutput:
        """Detect objects.

        Args:
            pixel_values: (B, 3, H, W) normalised images (ImageNet mean/std), zero-padded at
                the bottom/right.
            pixel_mask: (B, H, W), 1 on real pixels, 0 on padding; None = no padding.

        Returns:
            A :class:`DetectionOutput` (see the module docstring for the keys).
        """
        padding_mask = padding_mask_from_pixel_mask(pixel_values, pixel_mask)
        features, mask, pos = self.backbone(pixel_values, padding_mask)
        hidden, values, _ = self.transformer(self.input_proj(features), mask, self.query_embed.weight, pos)
        logits = self.class_embed(hidden)  # (L, B, Q, C+1)
        boxes = self.bbox_embed(hidden).sigmoid()  # (L, B, Q, 4)
        return assemble_outputs(
            logits, boxes, hidden, values, aux_loss=self.config.aux_loss, classification=self.classification
        )
