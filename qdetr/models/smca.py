"""Single-scale SMCA-DETR (gaopengcuhk/SMCA-DETR, as used by the Q-DETR release; method.md 5.2).

Differences from :class:`~qdetr.models.detr.Detr`:

* every decoder cross-attention is modulated by a Gaussian prior ``G`` added to the logits
  (after key-padding masking, before the softmax) through the ``attn_bias`` argument of
  :meth:`qdetr.layers.MultiheadAttention.forward_with_values`;
* decoder layer 0 predicts a reference point ``r = sigmoid(point1(o)) * (W_b, H_b) / stride``
  (in feature cells, from each image's *real* size taken from ``pixel_mask``), reused by all
  layers; ``point2`` gives per-head centre offsets and ``point3`` per-head scales
  (``dynamic_scale`` type1..type4); ``G = -dist / smooth``;
* box centres are regressed relative to the reference logits:
  ``box_l = sigmoid(bbox_embed(h_l) + [r_logit, 0, 0])``;
* sigmoid focal classification (classifier bias ``-log((1 - p) / p)``);
* ``query_embed`` is (Q, d) (official, content query 0) or (Q, 2d) (release layout:
  positional half, then content half), chosen by ``SmcaConfig.query_width``.

The output dict has the same keys as DETR's (see :mod:`qdetr.models.outputs`) plus nothing
else; the reference logits enter ``pred_boxes``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qdetr.models.config import SmcaConfig
from qdetr.models.detr import assemble_outputs, build_backbone
from qdetr.models.inputs import image_sizes_wh_from_pixel_mask, padding_mask_from_pixel_mask
from qdetr.models.mlp import MLP
from qdetr.models.outputs import DetectionOutput
from qdetr.models.pretrained_methods import PretrainedMethodsMixin
from qdetr.models.transformer import (
    TransformerDecoderLayer,
    TransformerEncoder,
    _with_pos,
    reset_transformer_parameters,
)

__all__ = ["SmcaDecoderLayer", "SmcaDecoder", "SmcaTransformer", "SmcaDetr", "gaussian_prior", "feature_grid_xy"]

#: Columns of ``point3`` per head for each dynamic-scale type.
_SCALES_PER_HEAD = {"type1": 0, "type2": 1, "type3": 2, "type4": 3}


def feature_grid_xy(height: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Integer cell coordinates (col, row) of an (height, width) map in row-major order: (h*w, 2)."""
    rows, cols = torch.meshgrid(
        torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij"
    )
    return torch.stack((cols, rows), dim=-1).reshape(-1, 2).to(dtype)


def gaussian_prior(
    centres_xy: torch.Tensor,
    scales: torch.Tensor | None,
    grid_xy: torch.Tensor,
    dynamic_scale: str,
    smooth: float,
) -> torch.Tensor:
    """SMCA's spatial prior ``G = -dist / smooth`` (method.md 5.2, step 4-5).

    Args:
        centres_xy: (Q, B, h, 2) per-head centres in feature cells (x, y).
        scales: (Q, B, h, k) raw ``point3`` outputs (k = 1, 2, 3 for type2/3/4), squared
            here; None for type1.
        grid_xy: (S, 2) key cell coordinates (col, row).
        dynamic_scale: ``"type1"`` .. ``"type4"``.
        smooth: β.

    Returns:
        (B, h, Q, S) additive attention-logit bias.
    """
    training = torch.is_grad_enabled() and (centres_xy.requires_grad or (scales is not None and scales.requires_grad))
    if training:
        # The original implementation's form (a trailing (x, y) axis): the same values as below,
        # and its backward sums in the order training has always used.
        diff2 = (centres_xy.unsqueeze(3) - grid_xy).pow(2)  # (Q, B, h, S, 2)
        if dynamic_scale == "type1":
            dist = diff2.sum(-1)
        else:
            s2 = (scales * scales).unsqueeze(3)  # (Q, B, h, 1, k)
            if dynamic_scale == "type2":
                dist = diff2.sum(-1) * s2[..., 0]
            elif dynamic_scale == "type3":
                dist = (diff2 * s2).sum(-1)
            else:  # type4: s_x² dx² + s_y² dy² + s_xy² dx² dy²
                dist = (torch.cat([diff2, diff2.prod(dim=-1, keepdim=True)], dim=-1) * s2).sum(-1)
    else:
        # Inference and export: x and y apart, each (Q, B, h, 1) against (S,), bit for bit the
        # same values; an exported graph's elementwise ops then broadcast over a contiguous last
        # axis instead of a trailing axis of 2 (several times faster in onnxruntime).
        dx2 = (centres_xy[..., 0:1] - grid_xy[:, 0]).pow(2)  # (Q, B, h, S)
        dy2 = (centres_xy[..., 1:2] - grid_xy[:, 1]).pow(2)
        if dynamic_scale == "type1":
            dist = dx2 + dy2
        else:
            s2 = scales * scales  # (Q, B, h, k)
            if dynamic_scale == "type2":
                dist = (dx2 + dy2) * s2[..., 0:1]
            elif dynamic_scale == "type3":
                dist = dx2 * s2[..., 0:1] + dy2 * s2[..., 1:2]
            else:
                dist = dx2 * s2[..., 0:1] + dy2 * s2[..., 1:2] + (dx2 * dy2) * s2[..., 2:3]
    gaussian = -dist.abs() / smooth  # (Q, B, h, S)
    return gaussian.permute(1, 2, 0, 3)


class SmcaDecoderLayer(TransformerDecoderLayer):
    """DETR decoder layer with SMCA's Gaussian-modulated cross-attention.

    Args:
        d_model, nhead, dim_feedforward, dropout: as in DETR.
        layer_index: layer 0 owns ``point1`` (the reference-point MLP).
        dynamic_scale: ``"type1"`` .. ``"type4"``.
        smooth: β.
        feature_stride: pixels per feature cell (32).

    Shapes:
        tgt, query_pos: (Q, B, d); memory, pos: (S, B, d); memory_key_padding_mask: (B, S);
        grid_xy: (S, 2); image_sizes_wh: (B, 2); reference_xy: (Q, B, 2) cells or None
        (layer 0 computes it).
        Returns ``(tgt, co_attn_values, reference_xy, reference_logits)``; the logits are
        (Q, B, 2) for layer 0 and None otherwise.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        *,
        layer_index: int,
        dynamic_scale: str = "type3",
        smooth: float = 8.0,
        feature_stride: int = 32,
    ) -> None:
        super().__init__(d_model, nhead, dim_feedforward, dropout)
        self.layer_index = layer_index
        self.dynamic_scale = dynamic_scale
        self.smooth = smooth
        self.feature_stride = feature_stride
        self.nhead = nhead
        self.norm4 = nn.LayerNorm(d_model)
        self.point1 = MLP(d_model, d_model, 2, 3) if layer_index == 0 else None
        self.point2 = nn.Linear(d_model, 2 * nhead)
        k = _SCALES_PER_HEAD[dynamic_scale]
        self.point3 = nn.Linear(d_model, k * nhead) if k else None

    def forward(  # type: ignore[override]
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        memory_key_padding_mask: torch.Tensor | None,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
        grid_xy: torch.Tensor,
        image_sizes_wh: torch.Tensor,
        reference_xy: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        q_len, bs, _ = tgt.shape
        h = self.nhead
        # The predictors read the layer *input* (before self-attention).
        o = self.norm4(tgt + query_pos)  # (Q, B, d)
        reference_logits = None
        if reference_xy is None:
            if self.point1 is None:
                raise ValueError("only decoder layer 0 can compute the reference point; pass reference_xy")
            reference_logits = self.point1(o)  # (Q, B, 2)
            # r = sigmoid(r_logit) * (W_b, H_b) / stride, in feature cells.
            reference_xy = image_sizes_wh.to(o.dtype) * reference_logits.sigmoid() / self.feature_stride
        centres = reference_xy.unsqueeze(2) + self.point2(o).view(q_len, bs, h, 2)  # (Q, B, h, 2)
        scales = None if self.point3 is None else self.point3(o).view(q_len, bs, h, -1)
        gaussian = gaussian_prior(centres, scales, grid_xy, self.dynamic_scale, self.smooth)  # (B, h, Q, S)

        tgt = self.self_attention_block(tgt, query_pos)
        tgt2, _, values = self.multihead_attn.forward_with_values(
            _with_pos(tgt, query_pos),
            _with_pos(memory, pos),
            memory,
            key_padding_mask=memory_key_padding_mask,
            attn_bias=gaussian,
        )
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        return self.feed_forward_block(tgt), values, reference_xy, reference_logits


class SmcaDecoder(nn.Module):
    """SMCA decoder stack with the shared final ``norm``.

    Returns:
        ``(hidden_states, co_attn_values, reference_logits)``: (L, Q, B, d), (L, Q, B, d) and
        (Q, B, 2).
    """

    def __init__(
        self,
        num_layers: int,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        dropout: float,
        *,
        dynamic_scale: str,
        smooth: float,
        feature_stride: int,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [
                SmcaDecoderLayer(
                    d_model,
                    nhead,
                    dim_feedforward,
                    dropout,
                    layer_index=i,
                    dynamic_scale=dynamic_scale,
                    smooth=smooth,
                    feature_stride=feature_stride,
                )
                for i in range(num_layers)
            ]
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        memory_key_padding_mask: torch.Tensor | None,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
        grid_xy: torch.Tensor,
        image_sizes_wh: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden, values = [], []
        out = tgt
        reference_xy = None
        reference_logits = None
        for layer in self.layers:
            out, v, reference_xy, logits = layer(
                out, memory, memory_key_padding_mask, pos, query_pos, grid_xy, image_sizes_wh, reference_xy
            )
            if logits is not None:
                reference_logits = logits
            hidden.append(self.norm(out))
            values.append(v)
        assert reference_logits is not None  # layer 0 always computes it
        return torch.stack(hidden), torch.stack(values), reference_logits


class SmcaTransformer(nn.Module):
    """DETR encoder + SMCA decoder.

    Args:
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout:
            as in :class:`~qdetr.models.transformer.Transformer`.
        dynamic_scale, smooth, feature_stride: SMCA prior settings.

    Shapes:
        src: (B, d, h, w); padding_mask: (B, h, w) bool; query_pos: (Q, d); pos: (B, d, h, w);
        tgt: (Q, d) or None (zeros); image_sizes_wh: (B, 2) real image sizes in pixels.
        Returns ``(hidden_states, co_attn_values, reference_logits)``: (L, B, Q, d) twice and
        (B, Q, 2).
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        *,
        dynamic_scale: str = "type3",
        smooth: float = 8.0,
        feature_stride: int = 32,
    ) -> None:
        super().__init__()
        self.encoder = TransformerEncoder(num_encoder_layers, d_model, nhead, dim_feedforward, dropout)
        self.decoder = SmcaDecoder(
            num_decoder_layers,
            d_model,
            nhead,
            dim_feedforward,
            dropout,
            dynamic_scale=dynamic_scale,
            smooth=smooth,
            feature_stride=feature_stride,
        )
        self.d_model = d_model
        self.nhead = nhead
        reset_transformer_parameters(self)
        # After the Xavier reset: every initial scale is 1 (method.md 5.2, step 4).
        for layer in self.decoder.layers:
            if layer.point3 is not None:
                nn.init.zeros_(layer.point3.weight)
                nn.init.ones_(layer.point3.bias)

    def forward(
        self,
        src: torch.Tensor,
        padding_mask: torch.Tensor,
        query_pos: torch.Tensor,
        pos: torch.Tensor,
        image_sizes_wh: torch.Tensor,
        tgt: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bs, _, h, w = src.shape
        grid = feature_grid_xy(h, w, src.dtype, src.device)  # (S, 2)
        src = src.flatten(2).permute(2, 0, 1)  # (S, B, d)
        pos = pos.flatten(2).permute(2, 0, 1)
        mask = padding_mask.flatten(1)  # (B, S)
        query_pos = query_pos.unsqueeze(1).repeat(1, bs, 1)  # (Q, B, d)
        tgt = torch.zeros_like(query_pos) if tgt is None else tgt.unsqueeze(1).repeat(1, bs, 1)
        memory = self.encoder(src, src_key_padding_mask=mask, pos=pos)
        hidden, values, ref_logits = self.decoder(tgt, memory, mask, pos, query_pos, grid, image_sizes_wh)
        return hidden.transpose(1, 2), values.transpose(1, 2), ref_logits.transpose(0, 1)


class SmcaDetr(PretrainedMethodsMixin, nn.Module):
    """Single-scale SMCA-DETR with the original module names.

    Args:
        config: :class:`~qdetr.models.config.SmcaConfig`.

    ``forward(pixel_values, pixel_mask=None)`` returns the same dict as
    :class:`~qdetr.models.detr.Detr`; each image's real size (for the reference point) is
    the number of rows/columns of ``pixel_mask`` that hold a real pixel, so any batch size
    and any bottom/right padding work.

    Shapes:
        pixel_values: (B, 3, H, W); pixel_mask: (B, H, W), 1 = real pixel.
        returns ``pred_logits`` (B, Q, C+1) sigmoid-focal logits, ``pred_boxes`` (B, Q, 4)
        normalised cxcywh, ``decoder_hidden_states`` and ``co_attn_features`` (L, B, Q, d).

    Raises:
        TypeError: if ``config`` is not an ``SmcaConfig``.

    Examples:
        >>> import torch
        >>> from qdetr.models import create_model
        >>> model = create_model("smca_detr_tiny").eval()
        >>> pixel_values = torch.randn(2, 3, 64, 96)
        >>> pixel_mask = torch.ones(2, 64, 96, dtype=torch.int64)
        >>> pixel_mask[1, :, 64:] = 0  # the second image is 64x64, padded on the right
        >>> with torch.no_grad():
        ...     out = model(pixel_values, pixel_mask)
        >>> out.classification, out["pred_logits"].shape, out["pred_boxes"].shape
        ('sigmoid', torch.Size([2, 10, 6]), torch.Size([2, 10, 4]))
    """

    def __init__(self, config: SmcaConfig) -> None:
        super().__init__()
        if not isinstance(config, SmcaConfig):
            raise TypeError(f"SmcaDetr needs an SmcaConfig, got {type(config).__name__}")
        self.config = config
        d = config.hidden_dim
        self.transformer = SmcaTransformer(
            d_model=d,
            nhead=config.nheads,
            num_encoder_layers=config.enc_layers,
            num_decoder_layers=config.dec_layers,
            dim_feedforward=config.dim_feedforward,
            dropout=config.dropout,
            dynamic_scale=config.dynamic_scale,
            smooth=config.smooth,
            feature_stride=config.resolved_feature_stride,
        )
        self.class_embed = nn.Linear(d, config.num_classes + 1)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - config.prior_prob) / config.prior_prob))
        self.bbox_embed = MLP(d, d, 4, 3)
        self.query_embed = nn.Embedding(config.num_queries, config.resolved_query_width)
        # The backbone is registered before input_proj so that its stem is the first Conv2d
        # in module order (quantize_model's stem rule); state-dict keys are unaffected.
        self.backbone = build_backbone(config)
        self.input_proj = nn.Conv2d(self.backbone.num_channels, d, kernel_size=1)

    @property
    def classification(self) -> str:
        """``"sigmoid"``: the head is trained with a sigmoid focal loss."""
        return "sigmoid"

    def query_split(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(positional (Q, d), content (Q, d) or None)`` from ``query_embed``."""
        weight = self.query_embed.weight
        d = self.config.hidden_dim
        if weight.shape[1] == d:
            return weight, None
        return weight[:, :d], weight[:, d:]

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> DetectionOutput:
        """Detect objects; see :meth:`qdetr.models.detr.Detr.forward` for the arguments."""
        padding_mask = padding_mask_from_pixel_mask(pixel_values, pixel_mask)
        image_sizes_wh = image_sizes_wh_from_pixel_mask(padding_mask)  # (B, 2)
        features, mask, pos = self.backbone(pixel_values, padding_mask)
        query_pos, tgt = self.query_split()
        hidden, values, ref_logits = self.transformer(
            self.input_proj(features), mask, query_pos, pos, image_sizes_wh, tgt=tgt
        )
        logits = self.class_embed(hidden)  # (L, B, Q, C+1)
        raw = self.bbox_embed(hidden)  # (L, B, Q, 4)
        # Centres are relative to layer 0's reference logits, for every layer.
        boxes = torch.cat([raw[..., :2] + ref_logits, raw[..., 2:]], dim=-1).sigmoid()
        return assemble_outputs(
            logits, boxes, hidden, values, aux_loss=self.config.aux_loss, classification=self.classification
        )
