"""DETR's post-norm encoder-decoder transformer (method.md 5.1).

Attention is :class:`qdetr.layers.MultiheadAttention`, so the state-dict names equal those of
facebookresearch/detr (``transformer.encoder.layers.{i}.self_attn.in_proj_weight``,
``linear1``, ``norm1``, ..., ``transformer.decoder.norm``) and :func:`qdetr.quant.quantize_model`
reaches every projection and attention tensor through the named slots.

Internal layout is sequence-first, as in the original: tokens are (L, B, d).
The decoder also returns, for every layer, the cross-attention co-attended values
``Â·V̂`` before ``out_proj`` (the Q-DETR distillation feature, method.md 6.1).
"""

from __future__ import annotations

import torch
from torch import nn

from qdetr.layers import MultiheadAttention

__all__ = [
    "TransformerEncoderLayer",
    "TransformerEncoder",
    "TransformerDecoderLayer",
    "TransformerDecoder",
    "Transformer",
    "reset_transformer_parameters",
]


def reset_transformer_parameters(module: nn.Module) -> None:
    """Xavier-uniform init of every parameter with more than one dimension (DETR's reset).

    Examples:
        >>> from qdetr.models.transformer import reset_transformer_parameters
        >>> _ = torch.manual_seed(0)
        >>> layer = nn.Linear(4, 4)
        >>> _ = nn.init.zeros_(layer.weight)
        >>> reset_transformer_parameters(layer)
        >>> bool(layer.weight.detach().abs().sum() > 0), bool(layer.bias.detach().abs().sum() > 0)
        (True, True)
    """
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


def _with_pos(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return x if pos is None else x + pos


class TransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer.

    ``src = norm1(src + drop(SA(q=k=src+pos, v=src)))``;
    ``src = norm2(src + drop(linear2(drop(relu(linear1(src))))))``.

    Args:
        d_model: width d.
        nhead: attention heads.
        dim_feedforward: FFN hidden width.
        dropout: dropout rate (attention probabilities, residual branches, FFN).

    Shapes:
        src, pos: (S, B, d); src_key_padding_mask: (B, S) bool, True on padding.

    Examples:
        >>> from qdetr.models.transformer import TransformerEncoderLayer
        >>> _ = torch.manual_seed(0)
        >>> layer = TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0)
        >>> src, pos = torch.randn(6, 2, 16), torch.randn(6, 2, 16)
        >>> mask = torch.zeros(2, 6, dtype=torch.bool)
        >>> layer(src, src_key_padding_mask=mask, pos=pos).shape
        torch.Size([6, 2, 16])
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = nn.ReLU()

    def forward(
        self,
        src: torch.Tensor,
        src_key_padding_mask: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q = k = _with_pos(src, pos)
        src2 = self.self_attn(q, k, src, key_padding_mask=src_key_padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout2(src2))


class TransformerEncoder(nn.Module):
    """Stack of post-norm encoder layers, no final norm.

    Shapes:
        src, pos: (S, B, d); src_key_padding_mask: (B, S). Output (S, B, d).

    Examples:
        >>> from qdetr.models.transformer import TransformerEncoder
        >>> _ = torch.manual_seed(0)
        >>> encoder = TransformerEncoder(num_layers=2, d_model=16, nhead=2, dim_feedforward=32, dropout=0.0)
        >>> len(encoder.layers)
        2
        >>> encoder(torch.randn(6, 2, 16), pos=torch.randn(6, 2, 16)).shape
        torch.Size([6, 2, 16])
    """

    def __init__(self, num_layers: int, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout) for _ in range(num_layers)]
        )

    def forward(
        self,
        src: torch.Tensor,
        src_key_padding_mask: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = src
        for layer in self.layers:
            out = layer(out, src_key_padding_mask=src_key_padding_mask, pos=pos)
        return out


class TransformerDecoderLayer(nn.Module):
    """Post-norm DETR decoder layer.

    Self-attention with ``q = k = tgt + query_pos``, ``v = tgt`` then norm1; cross-attention
    with ``q = tgt + query_pos``, ``k = memory + pos``, ``v = memory`` then norm2; FFN then norm3.

    Args:
        d_model, nhead, dim_feedforward, dropout: as in :class:`TransformerEncoderLayer`.

    Shapes:
        tgt, query_pos: (Q, B, d); memory, pos: (S, B, d); memory_key_padding_mask: (B, S).
        Returns ``(tgt, co_attn_values)``, both (Q, B, d); ``co_attn_values`` is the
        cross-attention ``Â·V̂`` before ``out_proj``.

    Examples:
        >>> from qdetr.models.transformer import TransformerDecoderLayer
        >>> _ = torch.manual_seed(0)
        >>> layer = TransformerDecoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0)
        >>> tgt, query_pos = torch.zeros(3, 2, 16), torch.randn(3, 2, 16)
        >>> memory, pos = torch.randn(6, 2, 16), torch.randn(6, 2, 16)
        >>> out, values = layer(tgt, memory, pos=pos, query_pos=query_pos)
        >>> out.shape, values.shape
        (torch.Size([3, 2, 16]), torch.Size([3, 2, 16]))
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = nn.ReLU()

    def self_attention_block(self, tgt: torch.Tensor, query_pos: torch.Tensor | None) -> torch.Tensor:
        """``norm1(tgt + drop(SA(tgt)))``; (Q, B, d) -> (Q, B, d)."""
        q = k = _with_pos(tgt, query_pos)
        tgt2 = self.self_attn(q, k, tgt, need_weights=False)[0]
        return self.norm1(tgt + self.dropout1(tgt2))

    def feed_forward_block(self, tgt: torch.Tensor) -> torch.Tensor:
        """``norm3(tgt + drop(FFN(tgt)))``; (Q, B, d) -> (Q, B, d)."""
        tgt2 = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(tgt2))

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        memory_key_padding_mask: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
        query_pos: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tgt = self.self_attention_block(tgt, query_pos)
        tgt2, _, values = self.multihead_attn.forward_with_values(
            _with_pos(tgt, query_pos),
            _with_pos(memory, pos),
            memory,
            key_padding_mask=memory_key_padding_mask,
        )
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        return self.feed_forward_block(tgt), values


class TransformerDecoder(nn.Module):
    """Stack of DETR decoder layers with the shared final ``norm``.

    Shapes:
        Returns ``(hidden_states, co_attn_values)``, each (L_dec, Q, B, d); hidden states are
        normalised by ``norm`` at every layer (heads and auxiliary losses read them).

    Examples:
        >>> from qdetr.models.transformer import TransformerDecoder
        >>> _ = torch.manual_seed(0)
        >>> decoder = TransformerDecoder(num_layers=2, d_model=16, nhead=2, dim_feedforward=32, dropout=0.0)
        >>> tgt, memory = torch.zeros(3, 2, 16), torch.randn(6, 2, 16)
        >>> hidden, values = decoder(tgt, memory, query_pos=torch.randn(3, 2, 16))
        >>> hidden.shape, values.shape
        (torch.Size([2, 3, 2, 16]), torch.Size([2, 3, 2, 16]))
    """

    def __init__(self, num_layers: int, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout) for _ in range(num_layers)]
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        memory_key_padding_mask: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
        query_pos: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, values = [], []
        out = tgt
        for layer in self.layers:
            out, v = layer(out, memory, memory_key_padding_mask=memory_key_padding_mask, pos=pos, query_pos=query_pos)
            hidden.append(self.norm(out))
            values.append(v)
        return torch.stack(hidden), torch.stack(values)


class Transformer(nn.Module):
    """DETR transformer: encoder over image tokens, decoder over object queries.

    Args:
        d_model: width d (256).
        nhead: heads (8).
        num_encoder_layers, num_decoder_layers: depths (6, 6).
        dim_feedforward: FFN width (2048).
        dropout: dropout rate (0.1).

    Shapes:
        src: (B, d, h, w) projected features; padding_mask: (B, h, w) bool, True on padding;
        query_pos: (Q, d) positional queries; pos: (B, d, h, w); tgt: optional (Q, d) content
        queries (zeros when None).
        Returns ``(hidden_states, co_attn_values, memory)``: (L_dec, B, Q, d) twice and
        (S, B, d).

    Examples:
        >>> from qdetr.models.transformer import Transformer
        >>> _ = torch.manual_seed(0)
        >>> transformer = Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=2,
        ...                           dim_feedforward=32, dropout=0.0)
        >>> src, pos = torch.randn(1, 16, 4, 5), torch.randn(1, 16, 4, 5)
        >>> padding_mask = torch.zeros(1, 4, 5, dtype=torch.bool)
        >>> hidden, values, memory = transformer(src, padding_mask, torch.randn(3, 16), pos)
        >>> hidden.shape, values.shape, memory.shape
        (torch.Size([2, 1, 3, 16]), torch.Size([2, 1, 3, 16]), torch.Size([20, 1, 16]))
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.encoder = TransformerEncoder(num_encoder_layers, d_model, nhead, dim_feedforward, dropout)
        self.decoder = TransformerDecoder(num_decoder_layers, d_model, nhead, dim_feedforward, dropout)
        self.d_model = d_model
        self.nhead = nhead
        reset_transformer_parameters(self)

    def forward(
        self,
        src: torch.Tensor,
        padding_mask: torch.Tensor,
        query_pos: torch.Tensor,
        pos: torch.Tensor,
        tgt: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bs = src.shape[0]
        src = src.flatten(2).permute(2, 0, 1)  # (S, B, d)
        pos = pos.flatten(2).permute(2, 0, 1)  # (S, B, d)
        mask = padding_mask.flatten(1)  # (B, S)
        query_pos = query_pos.unsqueeze(1).repeat(1, bs, 1)  # (Q, B, d)
        tgt = torch.zeros_like(query_pos) if tgt is None else tgt.unsqueeze(1).repeat(1, bs, 1)
        memory = self.encoder(src, src_key_padding_mask=mask, pos=pos)
        hidden, values = self.decoder(tgt, memory, memory_key_padding_mask=mask, pos=pos, query_pos=query_pos)
        return hidden.transpose(1, 2), values.transpose(1, 2), memory
