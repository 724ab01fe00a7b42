"""Multi-head attention with an explicit data path and named quantization slots.

`MultiheadAttention` is a drop-in replacement for :class:`torch.nn.MultiheadAttention`
(same constructor arguments for the supported subset, same ``forward`` signature and
return value, same ``state_dict`` names: ``in_proj_weight``, ``in_proj_bias``,
``out_proj.weight``, ``out_proj.bias``), so facebookresearch/detr checkpoints load into
it with ``strict=True``.

Unlike the PyTorch module, every intermediate tensor passes through a named *slot*
(an ``nn.Identity`` by default) that :mod:`qdetr.quant` and :mod:`qdetr.distill` fill:

==========================  ===============================================  =================
slot                        tensor                                           shape
==========================  ===============================================  =================
``in_proj_weight_quantizer`` packed q/k/v projection weight                  (3E, E)
``q_input_quantizer``       input of the q projection (query)                (..., E)
``k_input_quantizer``       input of the k projection (key)                  (..., E)
``v_input_quantizer``       input of the v projection (value)                (..., E)
``q_align``                 per-head query, before its quantizer             (B, h, L, d_h)
``q_quantizer``             per-head query                                   (B, h, L, d_h)
``k_quantizer``             per-head key                                     (B, h, S, d_h)
``v_quantizer``             per-head value                                   (B, h, S, d_h)
``prob_quantizer``          softmax probabilities (after dropout)            (B, h, L, S)
==========================  ===============================================  =================

The data path follows ``method.md`` section 4: the q quantizer sees the *unscaled*
query and the logits are scaled after the ``q @ k^T`` product.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qdetr.layers.recompute import recompute_saved, slot_recipes

__all__ = ["MultiheadAttention", "AttentionSlots"]

#: Names of the quantization / alignment slots, in data-path order.
AttentionSlots = (
    "in_proj_weight_quantizer",
    "q_input_quantizer",
    "k_input_quantizer",
    "v_input_quantizer",
    "q_align",
    "q_quantizer",
    "k_quantizer",
    "v_quantizer",
    "prob_quantizer",
)


class MultiheadAttention(nn.Module):
    """Multi-head attention, ``nn.MultiheadAttention``-compatible, with quantization slots.

    Args:
        embed_dim: model width E.
        num_heads: number of heads h; E must be divisible by h (d_h = E / h).
        dropout: dropout on the attention probabilities (training only).
        bias: whether the projections have biases.
        batch_first: if True, inputs and outputs are (B, L, E), else (L, B, E).

    Examples:
        >>> attn = MultiheadAttention(64, 8)
        >>> x = torch.randn(10, 2, 64)               # (L, B, E)
        >>> out, _ = attn(x, x, x, need_weights=False)
        >>> out.shape
        torch.Size([10, 2, 64])
        >>> attn.q_quantizer                          # slots are identities until filled
        Identity()
        >>> sorted(attn.state_dict()) == sorted(nn.MultiheadAttention(64, 8).state_dict())
        True
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = False,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        # nn.TransformerEncoderLayer takes a fused C++ fast path in eval mode that reads the
        # projection weights directly and would bypass every slot; this flag (checked by
        # that fast path) turns it off.
        self._qkv_same_embed_dim = False
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        for slot in AttentionSlots:
            setattr(self, slot, nn.Identity())
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Same initialisation as torch.nn.MultiheadAttention.
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
            f"batch_first={self.batch_first}"
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same contract as :meth:`torch.nn.MultiheadAttention.forward`.

        Args:
            query: (L, B, E), or (B, L, E) with ``batch_first``.
            key: (S, B, E), or (B, S, E).
            value: (S, B, E), or (B, S, E).
            key_padding_mask: (B, S); True (or non-zero) marks padded keys that are ignored.
                A float mask is added to the logits instead.
            need_weights: also return the attention probabilities.
            attn_mask: (L, S) or (B * h, L, S); a bool mask (True = not allowed) or an
                additive float mask (SMCA passes its Gaussian prior here).
            average_attn_weights: average the returned probabilities over heads.
            is_causal: apply a causal mask (``attn_mask`` may be None then).

        Returns:
            ``(output, weights)``: output (L, B, E) or (B, L, E); weights (B, L, S) when
            averaged, (B, h, L, S) otherwise, or None when ``need_weights`` is False.

        Examples:
            >>> attn = MultiheadAttention(32, 4, batch_first=True)
            >>> query, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)   # (B, L, E), (B, S, E)
            >>> padding = torch.zeros(2, 7, dtype=torch.bool)
            >>> out, weights = attn(query, memory, memory, key_padding_mask=padding)
            >>> out.shape, weights.shape
            (torch.Size([2, 5, 32]), torch.Size([2, 5, 7]))
        """
        out, weights, _ = self.forward_with_values(
            query,
            key,
            value,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            need_weights=need_weights,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        return out, weights

    def forward_with_values(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        attn_bias: torch.Tensor | None = None,
        need_weights: bool = False,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Attention that also returns the co-attended values ``A @ V`` before ``out_proj``.

        Args:
            query, key, value, key_padding_mask, attn_mask, need_weights,
                average_attn_weights, is_causal: as in :meth:`forward`.
            attn_bias: optional additive logit bias, (B, h, L, S) or broadcastable to it,
                added after key-padding masking and before the softmax (SMCA's Gaussian
                prior G).

        Returns:
            ``(output, weights, values)`` where ``values`` is the concatenation of the
            per-head co-attended features ``Â·V̂`` (the Q-DETR distillation feature),
            shaped like ``output``: (L, B, E), or (B, L, E) with ``batch_first``.

        Raises:
            ValueError: for unbatched inputs or masks of the wrong shape.

        Examples:
            >>> attn = MultiheadAttention(32, 4)
            >>> query, memory = torch.randn(5, 2, 32), torch.randn(7, 2, 32)   # (L, B, E), (S, B, E)
            >>> bias = torch.zeros(2, 4, 5, 7)                                 # (B, h, L, S)
            >>> out, weights, values = attn.forward_with_values(query, memory, memory, attn_bias=bias)
            >>> out.shape, values.shape, weights is None
            (torch.Size([5, 2, 32]), torch.Size([5, 2, 32]), True)
            >>> torch.allclose(attn.out_proj(values), out)
            True
        """
        if query.dim() != 3:
            raise ValueError(
                f"MultiheadAttention expects batched 3-D inputs, got query of shape {tuple(query.shape)}"
            )
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        bsz, tgt_len, _ = query.shape
        src_len = key.shape[1]
        h, d = self.num_heads, self.head_dim

        q, k, v = self._in_projections(query, key, value)
        q = q.view(bsz, tgt_len, h, d).transpose(1, 2)  # (B, h, L, d_h)
        k = k.view(bsz, src_len, h, d).transpose(1, 2)  # (B, h, S, d_h)
        v = v.view(bsz, src_len, h, d).transpose(1, 2)  # (B, h, S, d_h)

        q_aligned = self.q_align(q)
        q_hat, k_hat, v_hat = self.q_quantizer(q_aligned), self.k_quantizer(k), self.v_quantizer(v)

        mask = self._merged_additive_mask(key_padding_mask, attn_mask, attn_bias, is_causal, bsz, tgt_len, src_len, q)
        # Logits are scaled *after* the product so that the q quantizer sees the unscaled
        # query (method.md section 4, step 4). Quantized q/k/v/probabilities are recomputed
        # in backward rather than saved (see qdetr.layers.recompute).
        with recompute_saved(slot_recipes((q_hat, self.q_quantizer, q_aligned), (k_hat, self.k_quantizer, k))):
            logits = torch.matmul(q_hat, k_hat.transpose(-2, -1)) * (1.0 / math.sqrt(d))  # (B, h, L, S)
        if mask is not None:
            logits = logits + mask
        probs = torch.softmax(logits, dim=-1)
        if self.training and self.dropout > 0:
            probs = F.dropout(probs, p=self.dropout)
        p_hat = self.prob_quantizer(probs)
        with recompute_saved(slot_recipes((p_hat, self.prob_quantizer, probs), (v_hat, self.v_quantizer, v))):
            values = torch.matmul(p_hat, v_hat)  # (B, h, L, d_h)
        values = values.transpose(1, 2).reshape(bsz, tgt_len, self.embed_dim)  # (B, L, E)
        out = self.out_proj(values)

        weights = None
        if need_weights:
            weights = probs.mean(dim=1) if average_attn_weights else probs
        if not self.batch_first:
            out = out.transpose(0, 1)
            values = values.transpose(0, 1)
        return out, weights, values

    def _in_projections(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The q, k, v projections through their slots: (B, L, E), (B, S, E), (B, S, E) -> same shapes."""
        weight = self.in_proj_weight_quantizer(self.in_proj_weight)
        w_q, w_k, w_v = weight.chunk(3)
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        else:
            b_q = b_k = b_v = None
        q = F.linear(self.q_input_quantizer(query), w_q, b_q)
        k = F.linear(self.k_input_quantizer(key), w_k, b_k)
        v = F.linear(self.v_input_quantizer(value), w_v, b_v)
        return q, k, v

    def _merged_additive_mask(
        self,
        key_padding_mask: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
        attn_bias: torch.Tensor | None,
        is_causal: bool,
        bsz: int,
        tgt_len: int,
        src_len: int,
        ref: torch.Tensor,
    ) -> torch.Tensor | None:
        """Combine all masks into one additive float tensor broadcastable to (B, h, L, S)."""
        h = self.num_heads
        mask = None
        if key_padding_mask is not None:
            if key_padding_mask.shape != (bsz, src_len):
                raise ValueError(
                    f"key_padding_mask must have shape (B, S) = {(bsz, src_len)}, "
                    f"got {tuple(key_padding_mask.shape)}"
                )
            if key_padding_mask.dtype == torch.bool:
                kpm = torch.zeros(bsz, src_len, dtype=ref.dtype, device=ref.device).masked_fill(
                    key_padding_mask, float("-inf")
                )
            else:
                kpm = key_padding_mask.to(ref.dtype)
            mask = kpm.view(bsz, 1, 1, src_len)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(tgt_len, src_len, dtype=torch.bool, device=ref.device).triu(1)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                am = torch.zeros(attn_mask.shape, dtype=ref.dtype, device=ref.device).masked_fill(
                    attn_mask, float("-inf")
                )
            else:
                am = attn_mask.to(ref.dtype)
            if am.dim() == 2:
                am = am.view(1, 1, tgt_len, src_len)
            elif am.dim() == 3:
                am = am.view(bsz, h, tgt_len, src_len)
            else:
                raise ValueError(f"attn_mask must be 2-D or 3-D, got shape {tuple(attn_mask.shape)}")
            mask = am if mask is None else mask + am
        if attn_bias is not None:
            mask = attn_bias.to(ref.dtype) if mask is None else mask + attn_bias.to(ref.dtype)
        return mask

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> "MultiheadAttention":
        """Wrap an ``nn.MultiheadAttention``, sharing its parameters (no copy).

        Raises:
            ValueError: for configurations the explicit data path does not support
                (different key/value widths, ``add_bias_kv``, ``add_zero_attn``).

        Examples:
            >>> torch_attn = nn.MultiheadAttention(32, 4).eval()
            >>> attn = MultiheadAttention.from_torch(torch_attn)
            >>> attn.in_proj_weight is torch_attn.in_proj_weight
            True
            >>> x = torch.randn(5, 2, 32)                                       # (L, B, E)
            >>> torch.allclose(attn(x, x, x)[0], torch_attn(x, x, x)[0], atol=1e-5)
            True
        """
        if not module._qkv_same_embed_dim:
            raise ValueError(
                "nn.MultiheadAttention with kdim/vdim different from embed_dim is not supported; "
                "keep this module in float with QuantConfig(keep_float=(<name>,))"
            )
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError(
                "nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported; "
                "keep this module in float with QuantConfig(keep_float=(<name>,))"
            )
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.embed_dim = module.embed_dim
        new.num_heads = module.num_heads
        new.head_dim = module.head_dim
        new.dropout = module.dropout
        new.batch_first = module.batch_first
        new._qkv_same_embed_dim = False
        new.in_proj_weight = module.in_proj_weight
        new.in_proj_bias = module.in_proj_bias
        out = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(out)
        out.in_features = module.out_proj.in_features
        out.out_features = module.out_proj.out_features
        out.weight = module.out_proj.weight
        out.bias = module.out_proj.bias
        new.out_proj = out
        for slot in AttentionSlots:
            setattr(new, slot, nn.Identity())
        new.train(module.training)
        return new
