"""Sine positional encoding of DETR (method.md 5.1).

The encoding is computed in float32 from the padding mask, whatever the model's dtype, and
the caller casts it to the feature dtype (method.md 9: computing it in float64 changes the
outputs of 2-bit models, because the original code always ran it in float32).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """Parameter-free 2-D sine/cosine encoding (facebookresearch/detr ``PositionEmbeddingSine``).

    Args:
        num_pos_feats: channels per axis; the output has ``2 * num_pos_feats`` channels
            (y first, then x).
        temperature: base of the frequency ladder, ``dim_t_i = T^(2 floor(i/2) / num_pos_feats)``.
        normalize: divide the cumulative sums by their last value (+1e-6) and multiply by
            ``scale``.
        scale: normalisation range, 2π by default; only valid with ``normalize=True``.

    Shapes:
        padding_mask: (B, H, W) bool, True on padded positions.
        output: (B, 2 * num_pos_feats, H, W), float32.

    Examples:
        >>> from qdetr.models.position_encoding import PositionEmbeddingSine
        >>> encoding = PositionEmbeddingSine(num_pos_feats=8)
        >>> padding_mask = torch.zeros(2, 4, 6, dtype=torch.bool)
        >>> padding_mask[1, :, 3:] = True       # the second image is padded on the right
        >>> pos = encoding(padding_mask)
        >>> pos.shape, pos.dtype
        (torch.Size([2, 16, 4, 6]), torch.float32)
        >>> len(list(encoding.parameters()))    # parameter-free
        0
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("scale is only used with normalize=True; pass normalize=True or scale=None")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def extra_repr(self) -> str:
        return f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, normalize={self.normalize}"

    def forward(self, padding_mask: torch.Tensor) -> torch.Tensor:
        if padding_mask.dim() != 3:
            raise ValueError(f"padding_mask must be (B, H, W), got shape {tuple(padding_mask.shape)}")
        not_mask = ~padding_mask.bool()
        y_embed = not_mask.cumsum(1, dtype=torch.float32)  # (B, H, W)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=padding_mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t  # (B, H, W, F)
        pos_y = y_embed[:, :, :, None] / dim_t
        # Interleave sin (even channels) and cos (odd channels).
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # (B, 2F, H, W)
